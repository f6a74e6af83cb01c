"""Run a node graph in-process with the host's own validator and executor, recording what a UI would see.

Usage (the ``graph`` fixture of ``conftest.py`` builds the runner)::

    g = GraphBuilder(prefix="")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    ...
    g.node("SaveImage", images=img.out(0), filename_prefix="t")
    result = graph.run(g)                     # validates, executes, returns a GraphResult
    result.ok, result.events, result.outputs["5"], result.progress

Progress goes through a hook like the server's (``main.hijack_progress``):
it records ``(node_id, value, total)``, raises the host's interrupt exception
when processing was interrupted, and sends ``progress`` events.
:meth:`GraphRunner.interrupt_after` calls
``comfy.model_management.interrupt_current_processing()`` once N progress
updates have been seen, as the UI's cancel button does.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.utils
import execution
from comfy_execution.graph_utils import GraphBuilder
from comfy_execution.progress import get_progress_state

from antipure.comfyui import HeadlessServer

__all__ = ["GraphBuilder", "GraphResult", "GraphRunner", "StandInServer"]


class StandInServer(HeadlessServer):
    """The runner's stand-in for the server, recording every event it is sent."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, Any]] = []
        self.on_event = lambda event, data: self.events.append((event, data))


@dataclass
class GraphResult:
    prompt_id: str
    prompt: dict
    ok: bool                                  # validated and ran to execution_success
    events: list[tuple[str, Any]]             # (event, data) as sent to the client
    outputs: dict[str, list]                  # node id -> its output values (one list per output slot)
    progress: list[tuple[Any, int, int]] = field(default_factory=list)  # (node_id, value, total)
    validation: tuple | None = None           # validate_prompt's answer when it failed

    def event(self, name: str) -> list:
        """The data of every ``name`` event (e.g. ``"execution_error"``)."""
        return [d for e, d in self.events if e == name]

    @property
    def error(self) -> str | None:
        """The first execution error's message, or the validation error, or ``None``."""
        errs = self.event("execution_error")
        if errs:
            return errs[0]["exception_message"]
        if self.validation is not None:
            return str(self.validation[1]) + " " + str(self.validation[3])
        return None


class GraphRunner:
    """Validate and execute prompts with one :class:`execution.PromptExecutor` (its cache persists across runs)."""

    def __init__(self):
        self.server = StandInServer()
        self.executor = execution.PromptExecutor(self.server, cache_type=False)
        self._progress: list[tuple[Any, int, int]] = []
        self._interrupt_at: int | None = None

    def interrupt_after(self, n: int | None) -> None:
        """Interrupt processing once ``n`` progress updates were seen in the next run (``None``: never)."""
        self._interrupt_at = n

    def reset_cache(self) -> None:
        """Forget cached node outputs, so the next run executes every node again."""
        self.executor.reset()

    def _hook(self, value, total, preview, prompt_id=None, node_id=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        node_id = node_id if node_id is not None else self.server.last_node_id
        self._progress.append((node_id, value, total))
        get_progress_state().update_progress(node_id, value, total, preview)
        self.server.send_sync("progress", {"value": value, "max": total, "node": node_id,
                                           "prompt_id": self.server.last_prompt_id}, self.server.client_id)
        if self._interrupt_at is not None and len(self._progress) >= self._interrupt_at:
            self._interrupt_at = None
            comfy.model_management.interrupt_current_processing()

    def run(self, graph: GraphBuilder | dict, outputs: list[str] | None = None) -> GraphResult:
        """Validate and execute ``graph``; ``outputs`` limits the output nodes run (default: all)."""
        return asyncio.run(self.run_async(graph, outputs))

    async def run_async(self, graph: GraphBuilder | dict, outputs: list[str] | None = None) -> GraphResult:
        prompt = graph.finalize() if isinstance(graph, GraphBuilder) else graph
        prompt_id = str(uuid.uuid4())
        self.server.events = []
        self.server.last_prompt_id = prompt_id
        self._progress = []
        valid = await execution.validate_prompt(prompt_id, prompt, outputs)
        if not valid[0]:
            self._interrupt_at = None
            return GraphResult(prompt_id, prompt, False, self.server.events, {}, [], validation=valid)
        previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self._hook)
        try:
            await self.executor.execute_async(prompt, prompt_id, {"client_id": "antipure-tests"}, valid[2])
        finally:
            comfy.utils.set_progress_bar_global_hook(previous)
            self._interrupt_at = None
            comfy.model_management.interrupt_current_processing(False)
        values = {}
        for node_id in prompt:
            entry = self.executor.caches.outputs.get(node_id)
            if entry is not None:
                values[node_id] = getattr(entry, "outputs", entry)
        ok = any(e == "execution_success" for e, _ in self.server.events)
        return GraphResult(prompt_id, prompt, ok, list(self.server.events), values, list(self._progress))
