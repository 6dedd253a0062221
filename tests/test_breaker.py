"""The per-integration circuit breaker, clocked by a fake clock (no sleeping)."""

from __future__ import annotations

import threading

import pytest

from agent.integrations.breaker import CLOSED, HALF_OPEN, OPEN, BreakerPolicy, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**policy: float) -> tuple[CircuitBreaker, Clock, list[tuple[str, str]]]:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker("calendar", BreakerPolicy(**policy), clock,  # type: ignore[arg-type]
                             on_change=lambda name, old, new: changes.append((old, new)))
    return breaker, clock, changes


def test_opens_after_n_failures_in_the_window_and_stops_calling() -> None:
    breaker, clock, changes = make(failures=3, window_s=10, cooldown_s=30)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(False)
    assert breaker.state == CLOSED
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state == OPEN and changes == [(CLOSED, OPEN)]
    assert not breaker.allow() and not breaker.allow()
    assert breaker.rejected == 2 and breaker.opened == 1


def test_failures_outside_the_window_do_not_count() -> None:
    breaker, clock, _ = make(failures=3, window_s=10)
    breaker.record(False)
    clock.now += 6
    breaker.record(False)
    clock.now += 6  # the first failure is now 12 s old
    breaker.record(False)
    assert breaker.state == CLOSED
    clock.now += 1
    breaker.record(False)
    assert breaker.state == OPEN


def test_successes_do_not_reset_a_window_of_failures() -> None:
    breaker, _, _ = make(failures=2, window_s=10)
    breaker.record(False)
    breaker.record(True)
    breaker.record(False)
    assert breaker.state == OPEN


def test_slow_successes_count_as_failures() -> None:
    breaker, _, _ = make(failures=2, window_s=10, slow_ms=800)
    breaker.record(True, latency_ms=799)
    breaker.record(True, latency_ms=2500)
    assert breaker.state == CLOSED
    breaker.record(True, latency_ms=4000)
    assert breaker.state == OPEN


def test_half_opens_after_the_cooldown_then_closes_on_success() -> None:
    breaker, clock, changes = make(failures=1, cooldown_s=30)
    breaker.record(False)
    clock.now += 29.9
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 0.1
    assert breaker.state == HALF_OPEN
    assert breaker.allow()          # one trial call
    assert not breaker.allow()      # and only one at a time
    breaker.record(True, latency_ms=100)
    assert breaker.state == CLOSED and breaker.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_failed_trial_opens_again_for_a_full_cooldown() -> None:
    breaker, clock, _ = make(failures=1, cooldown_s=30, slow_ms=500)
    breaker.record(False)
    clock.now += 30
    assert breaker.allow()
    breaker.record(True, latency_ms=900)  # slow trial: still sick
    assert breaker.state == OPEN and breaker.opened == 2
    clock.now += 29
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_policy_validation() -> None:
    for bad in ({"failures": 0}, {"window_s": 0}, {"cooldown_s": -1}, {"slow_ms": -5},
                {"half_open_calls": 0}):
        with pytest.raises(ValueError):
            BreakerPolicy(**bad)  # type: ignore[arg-type]


def test_thread_safety_counts_every_failure() -> None:
    breaker, _, _ = make(failures=10_000, window_s=1e9)

    def fail() -> None:
        for _ in range(500):
            breaker.record(False)

    threads = [threading.Thread(target=fail) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert breaker.state == CLOSED  # 4000 < 10000
    for _ in range(6000):
        breaker.record(False)
    assert breaker.state == OPEN
