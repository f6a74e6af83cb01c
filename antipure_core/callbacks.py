"""Progress reporting and cancellation shared by every long-running core loop.

Each loop calls ``callback(info)`` once per step with a dict (``i``, ``total``
and loop-specific entries such as loss terms). A callback cancels the loop by
raising; :class:`Cancelled` is the exception the core itself uses, but any
exception (for example the host's interrupt) propagates unchanged and the loop
returns nothing, so no partial result escapes.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

Callback = Optional[Callable[[dict[str, Any]], Any]]


class Cancelled(Exception):
    """Raised by a callback to stop a loop; no partial output is produced."""


def report(callback: Callback, **info: Any) -> None:
    """Call ``callback`` with ``info`` if it is set."""
    if callback is not None:
        callback(info)
