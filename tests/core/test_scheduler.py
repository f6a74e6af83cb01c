"""The sharding/retry policy of ``antipure.scheduler`` with fake servers (no HTTP, no ComfyUI)."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from antipure.scheduler import JobError, Scheduler, ServerGone


class FakeServer:
    """Runs a job by yielding to the loop ``ticks`` times; ``fail(item, n)`` decides what the
    ``n``-th job of this server raises; ``down`` makes ``check`` fail; ``hang(item, n)`` true makes
    that job go silent (no report, no end) until cancelled, when ``on_cancel(item, report)`` runs
    and what it returns is the job's result (``None``: it re-raises, as a transport should)."""

    def __init__(self, name, ticks=1, fail=None, tick_seconds=0.0, hang=None, on_cancel=None):
        self.name, self.ticks, self.fail, self.tick_seconds = name, ticks, fail, tick_seconds
        self.hang, self.on_cancel = hang, on_cancel
        self.down = False
        self.ran: list = []
        self.cancelled: list = []
        self.checks = 0
        self.running = self.max_running = 0

    async def check(self):
        self.checks += 1
        if self.down:
            raise ServerGone("connection refused")

    async def run(self, item, report):
        n = len(self.ran)
        self.ran.append(item)
        if self.down:
            raise ServerGone("connection refused")
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            for i in range(self.ticks):
                report("progress", {"value": i + 1, "max": self.ticks})
                await asyncio.sleep(self.tick_seconds)
            if self.hang and self.hang(item, n):
                try:
                    await asyncio.Event().wait()  # a node that never returns nor reports
                except asyncio.CancelledError:
                    self.cancelled.append(item)
                    late = self.on_cancel(item, report) if self.on_cancel else None
                    if late is None:
                        raise
                    return await late
            error = self.fail(item, n) if self.fail else None
            if error is not None:
                raise error
            return f"{item}@{self.name}"
        finally:
            self.running -= 1


def run(servers, items, **kw):
    events = []
    sched = Scheduler(servers, backoff=0.001, on_event=lambda *e: events.append(e), **kw)
    asyncio.run(asyncio.wait_for(sched.run(items), 20))  # a run that never ends fails, not hangs
    done = {item: data["result"] for ev, _, item, data in events if ev == "done"}
    failed = {item: data for ev, _, item, data in events if ev == "failed"}
    return done, failed, events


def test_jobs_are_sharded_over_all_servers_once_each():
    a, b = FakeServer("a", ticks=2), FakeServer("b", ticks=2)
    done, failed, events = run([a, b], range(10))
    assert set(done) == set(range(10)) and not failed
    assert a.ran and b.ran and sorted(a.ran + b.ran) == list(range(10))
    assert Counter(e[0] for e in events)["done"] == 10
    assert a.max_running == b.max_running == 1  # one job in flight per server by default
    assert any(e[0] == "progress" and e[1] == "a" for e in events)


def test_per_server_limits_jobs_in_flight():
    a = FakeServer("a", ticks=3)
    done, _, _ = run([a], range(7), per_server=3)
    assert len(done) == 7 and a.max_running == 3


def test_a_server_that_disappears_loses_no_job():
    a, b = FakeServer("a", ticks=3), FakeServer("b", ticks=3)

    def die(item, n):
        if n == 1:  # a's second job: the server goes away under it
            a.down = True
            return ServerGone("connection reset")
    a.fail = die
    done, failed, events = run([a, b], range(8))
    assert set(done) == set(range(8)) and not failed
    lost = a.ran[1]
    assert done[lost] == f"{lost}@b"  # re-queued on the other server
    assert ("server_down", "a") in [e[:2] for e in events]
    assert Counter(e[2] for e in events if e[0] == "done") == Counter(range(8))  # each exactly once
    assert len(a.ran) == 2  # a dead server takes no more jobs: it must answer check() first


def test_a_transient_error_is_retried_elsewhere_and_the_server_kept():
    a, b = FakeServer("a"), FakeServer("b", ticks=5, tick_seconds=0.02)  # b slow: a comes back in time
    a.fail = lambda item, n: ServerGone("HTTP 503") if n == 0 else None
    done, failed, events = run([a, b], range(6))
    assert set(done) == set(range(6)) and not failed
    first = a.ran[0]
    assert done[first].endswith("@b")
    assert len(a.ran) > 1 and not any(e[0] == "server_dropped" for e in events)


def test_retries_are_bounded_and_report_every_servers_message():
    a, b = FakeServer("a"), FakeServer("b")
    for s in (a, b):
        s.fail = lambda item, n, s=s: ServerGone(f"{s.name} says 500") if item == 3 else None
    done, failed, _ = run([a, b], range(5), attempts=3, max_server_failures=10)
    assert set(done) == {0, 1, 2, 4}
    assert failed[3]["status"] == "error"
    assert "failed 3 times" in failed[3]["error"]
    assert "a says 500" in failed[3]["error"] and "b says 500" in failed[3]["error"]
    assert (a.ran + b.ran).count(3) == 3


def test_a_job_error_is_final():
    a, b = FakeServer("a"), FakeServer("b")
    for s in (a, b):
        s.fail = lambda item, n: JobError("node 3 (KSampler): ValueError: bad", "error") if item == 2 else None
    done, failed, _ = run([a, b], range(4))
    assert set(done) == {0, 1, 3}
    assert failed == {2: {"status": "error", "error": "node 3 (KSampler): ValueError: bad"}}
    assert (a.ran + b.ran).count(2) == 1


def test_when_every_server_is_gone_the_rest_fails_with_the_reason():
    a = FakeServer("a")
    a.fail = lambda item, n: (setattr(a, "down", True), ServerGone("connection refused"))[1]
    done, failed, events = run([a], range(3), attempts=5, down_timeout=0.05)
    assert [e[3]["reason"] for e in events if e[0] == "server_dropped"] == [
        "no answer for 0.05 s (connection refused)"]
    assert not done and set(failed) == {0, 1, 2}
    assert all("connection refused" in f["error"] or "no server left" in f["error"] for f in failed.values())
    assert any("no server left" in f["error"] for f in failed.values())


def test_an_exception_from_a_callback_stops_the_run():
    a = FakeServer("a")

    class Stop(Exception):
        pass

    def on_event(event, server, item, data):
        if event == "done":
            raise Stop

    with pytest.raises(Stop):
        asyncio.run(Scheduler([a], on_event=on_event).run(range(5)))
    assert len(a.ran) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="distinct"):
        Scheduler([FakeServer("a"), FakeServer("a")])
    with pytest.raises(ValueError, match=">= 1"):
        Scheduler([FakeServer("a")], per_server=0)
    with pytest.raises(ValueError, match="stall_timeout"):
        Scheduler([FakeServer("a")], stall_timeout=0)


def test_a_restarted_server_answers_its_checks_again_and_gets_work():
    a, b = FakeServer("a", ticks=2, tick_seconds=0.01), FakeServer("b", ticks=2, tick_seconds=0.01)

    def die(item, n):
        if n == 0:
            a.down = True
            asyncio.get_running_loop().call_later(0.05, setattr, a, "down", False)  # back on the same address
            return ServerGone("connection reset")
    a.fail = die
    done, failed, events = run([a, b], range(12))
    assert set(done) == set(range(12)) and not failed
    assert [e[:2] for e in events if e[0].startswith("server_")] == [("server_down", "a"), ("server_back", "a")]
    assert done[a.ran[0]].endswith("@b") and any(r.endswith("@a") for r in done.values())


def test_a_silent_job_is_stalled_stopped_there_and_requeued_elsewhere():
    a = FakeServer("a", hang=lambda item, n: n == 0)
    b = FakeServer("b", ticks=3, tick_seconds=0.02)
    done, failed, events = run([a, b], range(4), stall_timeout=0.1)
    assert set(done) == set(range(4)) and not failed
    hung = a.ran[0]
    assert a.cancelled == [hung]  # the transport was told to stop it (interrupt and delete there)
    assert done[hung].endswith("@b")
    stalled = [e for e in events if e[0] == "stalled"]
    assert [(e[1], e[2]) for e in stalled] == [("a", hung)]
    assert "no progress or queue change" in stalled[0][3]["error"]
    assert not any(e[0] == "server_dropped" for e in events)  # one stall: checked and used again


def test_steady_progress_is_not_a_stall_however_long_the_job():
    a = FakeServer("a", ticks=20, tick_seconds=0.02)  # 0.4 s a job, a report every 0.02 s
    done, failed, events = run([a], range(2), stall_timeout=0.15)
    assert set(done) == {0, 1} and not any(e[0] == "stalled" for e in events)


def test_a_server_that_stalls_twice_gets_no_more_work():
    a = FakeServer("a", hang=lambda item, n: True)  # answers checks, never finishes a job
    b = FakeServer("b", ticks=4, tick_seconds=0.03)
    done, failed, events = run([a, b], range(6), stall_timeout=0.05)
    assert set(done) == set(range(6)) and not failed
    assert all(r.endswith("@b") for r in done.values())
    assert len(a.ran) == 2 and a.cancelled == a.ran
    assert [e[3]["reason"] for e in events if e[0] == "server_dropped"] == ["stalled 2 times"]


def test_reports_of_a_moved_job_are_ignored():
    def chatter(item, report):
        report("progress", {"value": 99, "max": 99})  # the stalled server speaks again, too late
    a = FakeServer("a", hang=lambda item, n: n == 0, on_cancel=chatter)
    b = FakeServer("b", ticks=2, tick_seconds=0.02)
    done, failed, events = run([a, b], range(3), stall_timeout=0.05)
    assert set(done) == {0, 1, 2}
    assert not [e for e in events if e[0] == "progress" and e[1] == "a" and e[3]["value"] == 99]


def test_the_second_finisher_of_a_moved_job_is_a_duplicate_not_a_second_result():
    async def finish_late(item):
        await asyncio.sleep(0.05)  # the stalled server was not stopped and finishes after all
        return f"{item}@a-late"
    a = FakeServer("a", hang=lambda item, n: n == 0, on_cancel=lambda item, report: finish_late(item))
    b = FakeServer("b", ticks=10, tick_seconds=0.03)  # the re-queued run takes 0.3 s: a's comes first
    done, failed, events = run([a, b], [0], stall_timeout=0.05, cancel_grace=0.01)
    ends = [(e[0], e[1], e[3]["result"]) for e in events if e[0] in ("done", "duplicate")]
    assert ends == [("done", "a", "0@a-late"), ("duplicate", "b", "0@b")]
    assert done == {0: "0@a-late"} and not failed
