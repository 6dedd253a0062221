"""A circuit breaker per integration: stop calling a system that is failing or slow.

States: ``closed`` (calls go through; failures and slow calls are counted over a sliding
window), ``open`` (calls are refused at once, so the caller's flow takes its fallback within
its timeout instead of waiting on a dead system), ``half-open`` (after the cool-down, a limited
number of trial calls go through: success closes the breaker, failure opens it again).

Time comes from an injected clock, so tests run without sleeping. pybreaker counts consecutive
failures only; a slow-call rule over a time window is what a live phone call needs (a system
answering in 4 s is as bad as one that is down), hence this small class.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When to open, and when to try again."""

    #: failures or slow calls within ``window_s`` that open the breaker
    failures: int = 3
    window_s: float = 30.0
    #: a call slower than this counts as a failure even when it succeeded (ms); 0 = off
    slow_ms: float = 0.0
    #: how long the breaker stays open before trial calls are let through (s)
    cooldown_s: float = 20.0
    #: trial calls allowed at once while half-open
    half_open_calls: int = 1

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError(f"failures must be >= 1, got {self.failures}")
        if self.window_s <= 0 or self.cooldown_s <= 0:
            raise ValueError("window_s and cooldown_s must be > 0")
        if self.slow_ms < 0:
            raise ValueError(f"slow_ms must be >= 0, got {self.slow_ms}")
        if self.half_open_calls < 1:
            raise ValueError(f"half_open_calls must be >= 1, got {self.half_open_calls}")


class CircuitBreaker:
    """Thread-safe breaker: ``allow()`` before a call, ``record()`` after it."""

    def __init__(self, name: str, policy: BreakerPolicy = BreakerPolicy(),
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str, str], None] | None = None) -> None:
        self.name = name
        self.policy = policy
        self.clock = clock
        #: called with (name, old state, new state) on every transition (under the lock:
        #: it must not call back into the breaker)
        self.on_change = on_change
        self._lock = threading.Lock()
        self._state = CLOSED
        self._bad: deque[float] = deque()
        self._opened_at = 0.0
        self._trials = 0
        self.opened = 0
        self.rejected = 0

    @property
    def state(self) -> str:
        """closed, open or half-open (open turns half-open once the cool-down has passed)."""
        with self._lock:
            self._tick(self.clock())
            return self._state

    def allow(self) -> bool:
        """May a call go out now? (Counts a trial call while half-open.)"""
        with self._lock:
            self._tick(self.clock())
            if self._state == CLOSED:
                return True
            if self._state == HALF_OPEN and self._trials < self.policy.half_open_calls:
                self._trials += 1
                return True
            self.rejected += 1
            return False

    def record(self, ok: bool, latency_ms: float = 0.0) -> None:
        """The outcome of a call that ``allow()`` let through."""
        now = self.clock()
        slow = self.policy.slow_ms > 0 and latency_ms > self.policy.slow_ms
        good = ok and not slow
        with self._lock:
            self._tick(now)
            if self._state == HALF_OPEN:
                self._trials = max(0, self._trials - 1)
                if good:
                    self._bad.clear()
                    self._move(CLOSED)
                else:
                    self._open(now)
                return
            if self._state == OPEN or good:
                return
            self._bad.append(now)
            self._expire(now)
            if len(self._bad) >= self.policy.failures:
                self._open(now)

    def _tick(self, now: float) -> None:
        if self._state == OPEN and now - self._opened_at >= self.policy.cooldown_s:
            self._trials = 0
            self._move(HALF_OPEN)

    def _expire(self, now: float) -> None:
        while self._bad and now - self._bad[0] > self.policy.window_s:
            self._bad.popleft()

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._bad.clear()
        self.opened += 1
        self._move(OPEN)

    def _move(self, state: str) -> None:
        old, self._state = self._state, state
        if old != state and self.on_change is not None:
            self.on_change(self.name, old, state)
