"""Turn the core's per-step callback into the host's progress bar and cancel check."""
from __future__ import annotations

from .comfy_host import comfy_utils, model_management


def node_id(node_cls) -> str | None:
    """The running node's id for the progress bar; ``None`` when ``execute`` is called outside the executor."""
    return getattr(node_cls.hidden, "unique_id", None)


def host_callback(total: int, node_id=None):
    """A core callback advancing the host's progress bar and stopping on the host's cancel.

    The cancel check runs before the progress update, so an interrupted run
    raises the host's interrupt exception within one step and the node
    produces no output.
    """
    bar = comfy_utils.ProgressBar(max(total, 1), node_id=node_id)

    def callback(info):
        model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(info["i"] + 1, info.get("total", total))
    return callback
