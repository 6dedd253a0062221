"""The side-work queue: never blocks a call thread, bounded, retried, persistent."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.integrations.breaker import BreakerPolicy
from agent.integrations.http import WebhookClient
from agent.integrations.sidework import SideWorkQueue, SideWorkStats
from agent.integrations.spec import IntegrationSpec, SideWorkConfig
from agent.sim.webhooks import WebhookServer

CALLER = "+41791234567"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A deliver function: records calls, answers ``result``, optionally held on ``gate``."""

    def __init__(self, result: bool = True, clock: Callable[[], float] | None = None) -> None:
        self.result = result
        self.clock = clock
        self.calls: list[tuple[str, dict[str, Any], float]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, integration: str, payload: Mapping[str, Any]) -> bool:
        with self._lock:
            self.calls.append((integration, dict(payload), self.clock() if self.clock else 0.0))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        return self.result

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [p for _, p, _ in self.calls]


def until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


@pytest.fixture
def queues() -> Iterator[list[SideWorkQueue]]:
    made: list[SideWorkQueue] = []
    yield made
    for q in made:
        q.stop(timeout_s=1.0)


def make(queues: list[SideWorkQueue], deliver: Callable[[str, Mapping[str, Any]], bool], *,
         path: str | None = None, clock: Callable[[], float] | None = None,
         **config: Any) -> SideWorkQueue:
    q = SideWorkQueue(SideWorkConfig(**config), deliver, path=path,
                      clock=clock or time.time)
    q.idle_poll_s = 0.01
    queues.append(q)
    return q


def test_delivers_in_order(queues: list[SideWorkQueue]) -> None:
    rec = Recorder()
    q = make(queues, rec)
    q.start()
    for n in range(5):
        q.put("crm", {"n": n})
    assert q.wait_idle(3)
    assert rec.payloads() == [{"n": n} for n in range(5)]
    assert q.stats() == SideWorkStats(depth=0, dropped=0, lost=0, delivered=5, failed=0,
                                      restored=0)
    assert any(t.name == "pbx-sidework" for t in threading.enumerate())


def test_put_never_blocks_while_a_delivery_is_stuck(queues: list[SideWorkQueue]) -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    q = make(queues, rec)
    q.start()
    q.put("crm", {"n": 0})
    assert rec.entered.wait(3)
    for n in range(1, 201):
        q.put("crm", {"n": n})
    # all 200 puts returned while the worker was still held inside the first delivery
    assert not rec.gate.is_set() and len(rec.calls) == 1
    assert q.stats().depth == 201
    assert not q.wait_idle(0.01)
    rec.gate.set()
    assert q.wait_idle(3)
    assert q.stats().delivered == 201 and len(rec.calls) == 201


def test_full_queue_drops_the_oldest_before_start(queues: list[SideWorkQueue],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    q = make(queues, rec, max_jobs=5)
    with caplog.at_level(logging.WARNING):
        for n in range(8):
            q.put("crm", {"n": n, "phone": CALLER})
    assert q.stats().depth == 5 and q.stats().dropped == 3
    assert "dropped" in caplog.text and CALLER not in caplog.text
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1  # rate-limited
    q.start()
    assert q.wait_idle(3)
    assert [p["n"] for p in rec.payloads()] == [3, 4, 5, 6, 7]


def test_full_queue_never_drops_the_job_being_delivered(queues: list[SideWorkQueue]) -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    q = make(queues, rec, max_jobs=3)
    q.start()
    q.put("crm", {"n": 0})
    assert rec.entered.wait(3)
    for n in range(1, 5):
        q.put("crm", {"n": n})
    assert q.stats().depth == 3 and q.stats().dropped == 2
    rec.gate.set()
    assert q.wait_idle(3)
    assert [p["n"] for p in rec.payloads()] == [0, 3, 4]


def test_full_queue_drops_the_oldest_stored_job(queues: list[SideWorkQueue]) -> None:
    clock = Clock()
    rec = Recorder(result=False, clock=clock)
    q = make(queues, rec, clock=clock, max_jobs=3, backoff_s=100, max_attempts=5)
    q.start()
    for n in range(3):
        q.put("crm", {"n": n})
    assert until(lambda: len(rec.calls) == 3)  # each tried once, now waiting in the table
    q.put("crm", {"n": 3})
    assert q.stats().depth == 3 and q.stats().dropped == 1
    rec.result = True
    clock.now += 1000
    assert q.wait_idle(3)
    later = [p["n"] for p in rec.payloads()[3:]]  # job 3 may have failed once already
    assert 0 not in later and set(later) == {1, 2, 3}
    assert q.stats().delivered == 3


def test_failed_delivery_backs_off_and_is_given_up(queues: list[SideWorkQueue],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rec = Recorder(result=False, clock=clock)
    q = make(queues, rec, clock=clock, max_attempts=3, backoff_s=10, max_backoff_s=15)
    q.start()
    start = clock.now
    with caplog.at_level(logging.WARNING):
        q.put("crm", {"phone": CALLER})
        assert until(lambda: len(rec.calls) == 1)
        for _ in range(60):
            if q.stats().failed:
                break
            clock.now += 1
            time.sleep(0.005)
        assert until(lambda: q.stats().failed == 1)
    times = [t for _, _, t in rec.calls]
    assert len(times) == 3
    assert times[0] == start
    assert times[1] - times[0] >= 10   # backoff_s
    assert times[2] - times[1] >= 15   # 2 * backoff_s, capped at max_backoff_s
    assert q.stats().depth == 0 and q.stats().delivered == 0
    assert "given up after 3 attempts" in caplog.text and "crm" in caplog.text
    assert CALLER not in caplog.text


def test_an_exception_in_deliver_is_a_failure(queues: list[SideWorkQueue]) -> None:
    def deliver(integration: str, payload: Mapping[str, Any]) -> bool:
        raise RuntimeError("boom")

    q = make(queues, deliver, max_attempts=1)
    q.start()
    q.put("crm", {})
    assert until(lambda: q.stats().failed == 1)
    assert q.stats().depth == 0


def test_pending_jobs_survive_stop_and_start(queues: list[SideWorkQueue],
                                             tmp_path: Path) -> None:
    path = str(tmp_path / "sidework.sqlite")
    clock = Clock()
    failing = Recorder(result=False, clock=clock)
    q1 = make(queues, failing, path=path, clock=clock, backoff_s=100)
    q1.start()
    q1.put("crm", {"n": 0})
    assert until(lambda: len(failing.calls) == 1)  # tried once, waiting for its retry
    q1.put("crm", {"n": 1})
    q1.put("messages", {"n": 2})
    q1.stop()
    assert q1.stats().lost == 0 and q1.stats().depth == 3

    rec = Recorder()
    q2 = make(queues, rec, path=path)
    q2.start()
    assert q2.stats().restored == 3
    assert q2.wait_idle(3)
    assert sorted((i, p["n"]) for i, p, _ in rec.calls) == [("crm", 0), ("crm", 1),
                                                             ("messages", 2)]
    q2.stop()
    q3 = make(queues, Recorder(), path=path)
    q3.start()
    assert q3.stats().restored == 0


def test_jobs_put_before_start_are_kept_by_stop(queues: list[SideWorkQueue],
                                                tmp_path: Path) -> None:
    path = str(tmp_path / "sidework.sqlite")
    q1 = make(queues, Recorder(), path=path)
    q1.put("crm", {"n": 1})
    q1.stop()
    rec = Recorder()
    q2 = make(queues, rec, path=path)
    q2.start()
    assert q2.stats().restored == 1 and q2.wait_idle(3) and rec.payloads() == [{"n": 1}]


def test_stop_does_not_wait_forever_on_a_stuck_delivery(queues: list[SideWorkQueue],
                                                        tmp_path: Path) -> None:
    path = str(tmp_path / "sidework.sqlite")
    stuck = Recorder()
    stuck.gate = threading.Event()
    q1 = make(queues, stuck, path=path)
    q1.start()
    q1.put("crm", {"n": 0})
    assert stuck.entered.wait(3)
    q1.put("crm", {"n": 1})
    q1.put("crm", {"n": 2})
    q1.stop(timeout_s=0.05)
    assert not stuck.gate.is_set()  # stop() returned while the delivery was still held
    stuck.gate.set()
    assert until(lambda: q1.stats().delivered == 1)
    assert until(lambda: not any(t.name == "pbx-sidework" for t in threading.enumerate()))
    rec = Recorder()
    q2 = make(queues, rec, path=path)
    q2.start()
    assert q2.stats().restored == 2
    assert q2.wait_idle(3) and [p["n"] for p in rec.payloads()] == [1, 2]


def test_memory_only_stop_counts_lost(queues: list[SideWorkQueue],
                                      caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rec = Recorder(result=False, clock=clock)
    q = make(queues, rec, clock=clock, backoff_s=100)
    q.start()
    q.put("crm", {"n": 0})
    assert until(lambda: len(rec.calls) == 1)
    q.put("crm", {"n": 1})
    with caplog.at_level(logging.WARNING):
        q.stop()
        q.stop()  # idempotent
    assert q.stats().lost == 2 and q.stats().depth == 0
    assert "2 pending job(s) lost" in caplog.text
    q.put("crm", {"n": 2})  # after stop: counted, never blocks, never raises
    assert q.stats().lost == 3


def test_memory_only_never_started(queues: list[SideWorkQueue]) -> None:
    q = make(queues, Recorder())
    q.put("crm", {})
    q.put("crm", {})
    q.stop()
    assert q.stats().lost == 2


def test_unopenable_file_runs_memory_only(queues: list[SideWorkQueue], tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    bad = tmp_path / "no-such-dir" / "sidework.sqlite"
    q = make(queues, rec, path=str(bad))
    with caplog.at_level(logging.ERROR):
        q.start()
    assert "cannot open" in caplog.text
    q.put("crm", {"n": 1})
    assert q.wait_idle(3) and rec.payloads() == [{"n": 1}]


def test_many_threads_put_at_once(queues: list[SideWorkQueue]) -> None:
    rec = Recorder()
    q = make(queues, rec)
    q.start()

    def work(t: int) -> None:
        for n in range(50):
            q.put("crm", {"t": t, "n": n})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert q.wait_idle(5)
    assert q.stats().delivered == 400 and len(rec.calls) == 400


def test_against_a_stalling_webhook_server(queues: list[SideWorkQueue]) -> None:
    with WebhookServer() as server:
        server.mode = "stall"
        server.stall_s = 5.0
        spec = IntegrationSpec(name="crm", url=server.url + "/crm/notes", timeout_ms=200,
                               breaker=BreakerPolicy(failures=1000))
        client = WebhookClient({"crm": spec})

        def deliver(integration: str, payload: Mapping[str, Any]) -> bool:
            return client.call(integration, payload).ok

        q = make(queues, deliver, backoff_s=0.05, max_backoff_s=0.05, max_attempts=50)
        q.start()
        q.put("crm", {"n": 0})
        assert until(lambda: server.stalling >= 1)
        for n in range(1, 4):
            q.put("crm", {"n": n})  # returns while the worker waits on the stalled CRM
        assert server.stalling >= 1 and q.stats().depth == 4
        server.mode = "answer"
        server.release()
        assert q.wait_idle(3)
        assert q.stats().delivered == 4
        notes = [r.json["n"] for r in server.requests if r.json is not None]
        assert sorted(set(notes)) == [0, 1, 2, 3]
        client.close()
