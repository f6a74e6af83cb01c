"""Shard jobs over several servers, re-queue what a failing or stalled server had, keep one result per job.

Plain asyncio, no HTTP: a server is anything with the :class:`Transport` methods,
so the policy is tested with fake transports and used with real ComfyUI servers
by :mod:`antipure.remote`.

Policy:

* each server runs ``per_server`` jobs at a time, taking the next job from one
  shared queue (a fast server takes more jobs);
* :class:`ServerGone` (refused, transient error, disappeared) puts the job back
  at the front of the queue, to be taken by *another* live server when there is
  one; after ``attempts`` tries the job fails with every server's message;
* liveness: every ``report`` of a job (progress, a node starting, a queue
  change) counts for its whole server. A job whose server reported nothing for
  ``stall_timeout`` seconds is *stalled*: its run is cancelled (the transport
  interrupts and deletes it there if the server still answers) and the job is
  re-queued like a :class:`ServerGone`. A server that stalls ``max_stalls``
  times gets no more work;
* a server that failed pauses (``backoff`` seconds, doubling up to
  ``max_backoff``) and must answer :meth:`Transport.check` before it takes a job
  again, so a server restarted on the same address is used again.
  ``max_server_failures`` failed *jobs* in a row, or no answer for
  ``down_timeout`` seconds, drop it. When every server is dropped the jobs left fail;
* a job's result is taken once: when a moved job finishes twice (the old run
  could not be stopped), the second result is a ``"duplicate"`` event, never a
  second ``"done"``; reports of a run that was moved away are dropped;
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
        """Return when the server answers and can run the jobs; raise :class:`ServerGone` otherwise."""

    async def run(self, item: Any, report: Callable[[str, dict], None]) -> Any:
        """Run one job and return its result; ``report(event, data)`` passes progress on and is the
        server's sign of life (``"alive"`` for a sign with nothing to show).

        On cancellation (the job stalled) it should stop the job on the server if it can, within
        a few seconds, and re-raise.

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
    finished: bool = False  # a result was taken (or it failed for good)
    run_id: int = 0  # the current attempt; reports of older ones are dropped


@dataclass
class _Server:
    transport: Transport
    failures: int = 0  # failed jobs in a row
    stalls: int = 0
    down: bool = False  # must answer check() before the next job
    dropped: bool = False
    last_sign: float = 0.0  # loop time of the last report from any of its jobs
    recovering: asyncio.Lock = field(default_factory=asyncio.Lock)


class Scheduler:
    """Runs ``items`` over ``transports``.

    Args:
        transports: the servers (distinct ``name`` each).
        per_server: jobs in flight on each server.
        attempts: tries per job when servers fail or stall (>= 1).
        max_server_failures: failed jobs in a row that drop a server.
        backoff: first pause in seconds after a server failed; doubles on each failed check.
        max_backoff: the longest pause between two checks of a server that is down.
        down_timeout: seconds a down server may go without answering a check before it is dropped.
        stall_timeout: seconds without a report from a server before its jobs are stalled (``None``: never).
        max_stalls: stalls that drop a server.
        cancel_grace: seconds a stalled run may take to stop (interrupt the server) before it is left.
        on_event: ``on_event(event, server_name, item, data)`` for ``"start"``, ``"progress"`` and the
            transport's other reports (``data`` from the transport; ``"alive"`` is not passed on),
            ``"stalled"`` (``data["error"]``, ``data["stalls"]``; sent before the run is stopped),
            ``"done"`` (``data["result"]``, once per item), ``"duplicate"`` (``data["result"]``: a
            second result of a moved job, to discard), ``"failed"`` (``data["status"]``,
            ``data["error"]``), ``"retry"`` (``data["error"]``), and, with item
            ``None``, ``"server_down"`` / ``"server_back"`` / ``"server_dropped"`` (``data["reason"]``);
            ``server_name`` is ``None`` for jobs failed because no server was left. A plain function
            called in the worker: what it raises stops the run (an interrupt, or a test's kill switch).
    """

    def __init__(self, transports: Sequence[Transport], per_server: int = 1, attempts: int = 3,
                 max_server_failures: int = 3, backoff: float = 0.5, max_backoff: float = 10.0,
                 down_timeout: float = 300.0, stall_timeout: float | None = None, max_stalls: int = 2,
                 cancel_grace: float = 30.0, on_event: Callable[[str, str | None, Any, dict], None] | None = None):
        if per_server < 1 or attempts < 1 or max_server_failures < 1 or max_stalls < 1:
            raise ValueError("per_server, attempts, max_server_failures and max_stalls must be >= 1")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0 seconds (or None); got {stall_timeout}")
        names = [t.name for t in transports]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"transports: need at least one, with distinct names; got {names}")
        self.servers = [_Server(t) for t in transports]
        self.per_server, self.attempts = per_server, attempts
        self.max_server_failures, self.backoff, self.max_backoff = max_server_failures, backoff, max_backoff
        self.down_timeout, self.stall_timeout, self.max_stalls = down_timeout, stall_timeout, max_stalls
        self.cancel_grace = cancel_grace
        self.on_event = on_event
        self._pending: deque[Job] = deque()
        self._in_flight = 0
        self._changed: asyncio.Condition | None = None
        self._idle: asyncio.Event | None = None
        self._left_running: set[asyncio.Future] = set()  # stalled runs that did not stop in time

    def _emit(self, event: str, server: str | None, item: Any, data: dict | None = None) -> None:
        if self.on_event is not None:
            self.on_event(event, server, item, data or {})

    def _notify(self) -> None:
        """Wake the workers; call with ``_changed`` held."""
        self._pending = deque(j for j in self._pending if not j.finished)  # a moved job that finished anyway
        if not self._pending and self._in_flight == 0:
            self._idle.set()
        self._changed.notify_all()

    async def _take(self, server: _Server) -> Job | None:
        """The next job this server may run, or ``None`` when there is nothing left for it."""
        async with self._changed:
            while True:
                if server.dropped or self._idle.is_set():
                    return None
                live = {s.transport.name for s in self.servers if not s.dropped}
                for job in self._pending:
                    # a job goes back to a server that failed it only when every live server did
                    if server.transport.name not in job.avoid or live <= job.avoid:
                        self._pending.remove(job)
                        self._in_flight += 1
                        return job
                await self._changed.wait()

    async def _release(self, job: Job | None = None) -> None:
        async with self._changed:
            self._in_flight -= 1
            if job is not None:
                self._pending.appendleft(job)
            self._notify()

    async def _drop(self, server: _Server, reason: str) -> None:
        server.dropped = True
        self._emit("server_dropped", server.transport.name, None, {"reason": reason})
        async with self._changed:
            self._notify()

    async def _recover(self, server: _Server) -> None:
        """Pause, then wait until the server answers a check again, or drop it."""
        async with server.recovering:  # the server's other slots wait for the same verdict
            loop = asyncio.get_running_loop()
            delay, since, reason = self.backoff, loop.time(), ""
            while server.down and not server.dropped:
                if server.failures >= self.max_server_failures:
                    return await self._drop(server, f"{server.failures} jobs failed there in a row")
                if loop.time() - since >= self.down_timeout:
                    return await self._drop(server, f"no answer for {self.down_timeout:g} s ({reason})")
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.max_backoff)
                try:
                    await server.transport.check()
                except ServerGone as e:
                    reason = str(e)
                    continue
                server.down = False  # failures stay counted until a job succeeds
                self._emit("server_back", server.transport.name, None, {"reason": "answers again"})

    async def _attempt(self, server: _Server, job: Job) -> tuple[str, Any]:
        """Run the job once: ``("done", result)``, ``("gone", ServerGone)``, ``("error", JobError)`` or
        ``("stalled", message)``."""
        loop = asyncio.get_running_loop()
        name, run_id, started = server.transport.name, job.run_id, loop.time()

        def report(event: str, data: dict) -> None:
            if job.run_id != run_id:
                return  # a moved job: its server's word no longer counts
            server.last_sign = loop.time()
            if event != "alive":
                self._emit(event, name, job.item, data)

        task = asyncio.ensure_future(server.transport.run(job.item, report))
        try:
            while not task.done():
                if self.stall_timeout is None:
                    await asyncio.wait({task})
                    break
                left = max(started, server.last_sign) + self.stall_timeout - loop.time()
                if left <= 0:
                    job.run_id += 1
                    server.stalls += 1
                    error = f"stalled: no progress or queue change for {self.stall_timeout - left:.0f} s"
                    self._emit("stalled", name, job.item, {"error": error, "stalls": server.stalls})
                    task.cancel()  # the transport stops the job there if the server answers
                    await asyncio.wait({task}, timeout=self.cancel_grace)
                    if not task.done():  # whichever run of the job ends first gives its result
                        self._left_running.add(asyncio.ensure_future(self._outlive(server, job, task)))
                    elif not task.cancelled() and task.exception() is None:
                        return "done", task.result()  # it finished while being stopped
                    return "stalled", error
                await asyncio.wait({task}, timeout=left)
            try:
                return "done", task.result()
            except ServerGone as e:
                return "gone", e
            except JobError as e:
                return "error", e
        finally:
            if not task.done() and job.run_id == run_id:
                task.cancel()  # the whole run stops

    async def _outlive(self, server: _Server, job: Job, task: asyncio.Future) -> None:
        """A stalled run that did not stop: its result, should it come, counts like any other."""
        try:
            await asyncio.wait({task})
        finally:
            task.cancel()  # the run ended first
        if task.cancelled() or task.exception() is not None:
            return
        self._finish(server, job, task.result())
        async with self._changed:
            self._notify()  # its re-queued copy need not run

    def _finish(self, server: _Server, job: Job, result: Any) -> None:
        server.failures = 0
        job.finished, first = True, not job.finished
        self._emit("done" if first else "duplicate", server.transport.name, job.item, {"result": result})

    async def _worker(self, server: _Server) -> None:
        name = server.transport.name
        while True:
            if server.down:
                await self._recover(server)
            job = await self._take(server)
            if job is None:
                return
            job.attempts += 1
            job.run_id += 1
            self._emit("start", name, job.item, {"attempt": job.attempts})
            outcome, value = await self._attempt(server, job)
            if outcome == "done":
                self._finish(server, job, value)
            elif outcome == "error":
                server.failures = 0
                job.finished = True
                self._emit("failed", name, job.item, {"status": value.status, "error": str(value)})
            elif job.finished:
                pass  # another run of it already ended it
            else:
                error = str(value)
                if outcome == "stalled" and server.stalls >= self.max_stalls:
                    await self._drop(server, f"stalled {server.stalls} times")
                elif outcome == "gone":
                    server.failures += 1
                if not server.dropped:
                    server.down = True
                    self._emit("server_down", name, None, {"reason": error})
                job.errors.append(f"{name}: {error}")
                job.avoid.add(name)
                if job.attempts < self.attempts:
                    self._emit("retry", name, job.item, {"error": error})
                    await self._release(job)
                    continue
                job.finished = True
                self._emit("failed", name, job.item, {"status": "error", "error": f"failed {job.attempts} "
                                                      f"times: " + "; ".join(job.errors)})
            await self._release()

    async def run(self, items: Iterable[Any]) -> None:
        """Run every item; returns when each one is done or failed (see ``on_event``)."""
        self._changed, self._idle = asyncio.Condition(), asyncio.Event()
        self._pending = deque(Job(item) for item in items)
        self._in_flight, self._left_running = 0, set()
        if not self._pending:
            return
        tasks = [asyncio.ensure_future(self._worker(s)) for s in self.servers for _ in range(self.per_server)]
        workers, idle = asyncio.gather(*tasks), asyncio.ensure_future(self._idle.wait())
        try:
            # idle: every job ended; servers still being checked need not be waited for
            await asyncio.wait({workers, idle}, return_when=asyncio.FIRST_COMPLETED)
            if workers.done():
                workers.result()  # a worker's exception stops the run
        finally:
            for t in [*tasks, idle, *self._left_running]:
                t.cancel()
            await asyncio.gather(workers, idle, *self._left_running, return_exceptions=True)
        left, self._pending = [j for j in self._pending if not j.finished], deque()
        for job in left:  # every server was dropped
            self._emit("failed", None, job.item, {"status": "error", "error": "no server left to run it: " + (
                "; ".join(job.errors) or "every server stopped answering")})
