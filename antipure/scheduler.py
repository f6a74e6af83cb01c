"""Shard jobs over several servers, re-queue what a failing server had, never run a job twice to success.

Plain asyncio, no HTTP: a server is anything with the :class:`Transport` methods,
so the policy is tested with fake transports and used with real ComfyUI servers
by :mod:`antipure.remote`.

Policy:

* each server runs ``per_server`` jobs at a time, taking the next job from one
  shared queue (a fast server takes more jobs);
* :class:`ServerGone` (refused, transient error, disappeared) puts the job back
  at the front of the queue, to be taken by *another* live server when there is
  one; after ``attempts`` tries the job fails with every server's message;
* the failing server pauses (``backoff`` seconds, doubling) and must answer
  :meth:`Transport.check` before it takes a job again; ``max_server_failures``
  failures in a row drop it. When every server is dropped the jobs left fail;
* :class:`JobError` (the workflow itself failed on this input) is final: the job
  fails with that message, no retry;
* any other exception (a bug, or an interrupt raised from a callback) cancels
  the whole run and propagates.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

__all__ = ["ServerGone", "JobError", "Transport", "Job", "Scheduler"]


class ServerGone(Exception):
    """The server refused the job, failed transiently or disappeared: try the job elsewhere."""


class JobError(Exception):
    """The job itself failed (e.g. a node raised, the prompt is invalid): final, not retried.

    Args:
        message: what the server said.
        status: the results-table status (``"error"``, ``"invalid"`` ...).
    """

    def __init__(self, message: str, status: str = "error"):
        super().__init__(message)
        self.status = status


class Transport(Protocol):
    """One server. ``name`` identifies it in messages (e.g. its URL)."""

    name: str

    async def check(self) -> None:
        """Return when the server answers; raise :class:`ServerGone` otherwise."""

    async def run(self, item: Any, report: Callable[[str, dict], None]) -> Any:
        """Run one job and return its result; ``report(event, data)`` passes progress on.

        Raises:
            ServerGone: try again elsewhere.
            JobError: the job failed for good.
        """


@dataclass
class Job:
    """A job and its history: the servers that failed it and their messages."""

    item: Any
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    avoid: set[str] = field(default_factory=set)


@dataclass
class _Server:
    transport: Transport
    failures: int = 0  # in a row
    dropped: bool = False
    recovering: asyncio.Lock = field(default_factory=asyncio.Lock)


class Scheduler:
    """Runs ``items`` over ``transports``.

    Args:
        transports: the servers (distinct ``name`` each).
        per_server: jobs in flight on each server.
        attempts: tries per job when servers fail (>= 1).
        max_server_failures: failures in a row (job or check) that drop a server.
        backoff: first pause in seconds after a server failed; doubles on each failed check.
        on_event: ``on_event(event, server_name, item, data)`` for ``"start"``, ``"progress"``
            (``data`` from the transport), ``"done"`` (``data["result"]``), ``"failed"``
            (``data["status"]``, ``data["error"]``), ``"retry"`` (``data["error"]``) and
            ``"server_dropped"`` (item ``None``); ``server_name`` is ``None`` for jobs failed
            because no server was left. A plain function called in the worker: what it raises
            stops the run (an interrupt, or a test's kill switch).
    """

    def __init__(self, transports: Sequence[Transport], per_server: int = 1, attempts: int = 3,
                 max_server_failures: int = 3, backoff: float = 0.5, on_event: Callable[[str, str | None, Any, dict], None] | None = None):
        if per_server < 1 or attempts < 1 or max_server_failures < 1:
            raise ValueError("per_server, attempts and max_server_failures must be >= 1")
        names = [t.name for t in transports]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"transports: need at least one, with distinct names; got {names}")
        self.servers = [_Server(t) for t in transports]
        self.per_server, self.attempts = per_server, attempts
        self.max_server_failures, self.backoff = max_server_failures, backoff
        self.on_event = on_event
        self._pending: deque[Job] = deque()
        self._in_flight = 0
        self._changed: asyncio.Condition | None = None

    def _emit(self, event: str, server: str | None, item: Any, data: dict | None = None) -> None:
        if self.on_event is not None:
            self.on_event(event, server, item, data or {})

    def _live(self) -> list[str]:
        return [s.transport.name for s in self.servers if not s.dropped]

    async def _take(self, server: _Server) -> Job | None:
        """The next job this server may run, or ``None`` when there is nothing left for it."""
        async with self._changed:
            while True:
                if server.dropped:
                    return None
                live = set(self._live())
                for job in self._pending:
                    # a job goes back to a server that failed it only when every live server did
                    if server.transport.name not in job.avoid or live <= job.avoid:
                        self._pending.remove(job)
                        self._in_flight += 1
                        return job
                if not self._pending and self._in_flight == 0:
                    return None
                await self._changed.wait()

    async def _release(self, job: Job | None = None) -> None:
        async with self._changed:
            self._in_flight -= 1
            if job is not None:
                self._pending.appendleft(job)
            self._changed.notify_all()

    async def _recover(self, server: _Server) -> None:
        """Pause, then wait until the server answers again or drop it."""
        async with server.recovering:  # the server's other slots wait for the same verdict
            delay = self.backoff
            while not server.dropped and server.failures > 0:
                if server.failures >= self.max_server_failures:
                    server.dropped = True
                    self._emit("server_dropped", server.transport.name, None)
                    async with self._changed:
                        self._changed.notify_all()
                    return
                await asyncio.sleep(delay)
                delay *= 2
                try:
                    await server.transport.check()
                    return  # answers again; failures stay counted until a job succeeds
                except ServerGone:
                    server.failures += 1

    async def _worker(self, server: _Server) -> None:
        name = server.transport.name
        while True:
            if server.failures:
                await self._recover(server)
            job = await self._take(server)
            if job is None:
                return
            job.attempts += 1
            self._emit("start", name, job.item, {"attempt": job.attempts})
            try:
                result = await server.transport.run(job.item, lambda event, data, _i=job.item:
                                                    self._emit(event, name, _i, data))
            except ServerGone as e:
                server.failures += 1
                job.errors.append(f"{name}: {e}")
                job.avoid.add(name)
                if job.attempts < self.attempts:
                    self._emit("retry", name, job.item, {"error": str(e)})
                    await self._release(job)
                    continue
                self._emit("failed", name, job.item, {"status": "error", "error": f"failed {job.attempts} "
                                                      f"times: " + "; ".join(job.errors)})
            except JobError as e:
                server.failures = 0
                self._emit("failed", name, job.item, {"status": e.status, "error": str(e)})
            else:
                server.failures = 0
                self._emit("done", name, job.item, {"result": result})
            await self._release()

    async def run(self, items: Iterable[Any]) -> None:
        """Run every item; returns when each one is done or failed (see ``on_event``)."""
        self._changed = asyncio.Condition()
        self._pending = deque(Job(item) for item in items)
        self._in_flight = 0
        tasks = [asyncio.ensure_future(self._worker(s)) for s in self.servers for _ in range(self.per_server)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        left, self._pending = list(self._pending), deque()
        for job in left:  # every server was dropped
            self._emit("failed", None, job.item, {"status": "error", "error": "no server left to run it: " + (
                "; ".join(job.errors) or "every server stopped answering")})
