"""Erlang B sizing: how many concurrent calls (lines, engine slots) a traffic load needs.

Offered traffic in erlangs is calls per hour times the average handling time (AHT) in hours.
Erlang B gives the probability that a call finds all ``N`` servers busy and is refused
(blocked calls cleared), assuming Poisson arrivals; it is the classic trunk-sizing formula and
fits the agent, which refuses rather than queues a call it has no slot for. Pure, stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_BISECT_STEPS = 200
_BISECT_REL_TOL = 1e-12


def traffic_erlangs(calls_per_hour: float, aht_s: float) -> float:
    """Offered traffic in erlangs: ``calls_per_hour`` calls lasting ``aht_s`` seconds on average."""
    if not math.isfinite(calls_per_hour) or calls_per_hour < 0:
        raise ValueError(f"calls_per_hour must be a finite number >= 0, got {calls_per_hour!r}")
    if not math.isfinite(aht_s) or aht_s < 0:
        raise ValueError(f"aht_s must be a finite number of seconds >= 0, got {aht_s!r}")
    return calls_per_hour * aht_s / 3600.0


def _check_traffic(traffic: float) -> None:
    if isinstance(traffic, bool) or not isinstance(traffic, int | float):
        raise ValueError(f"traffic must be a number of erlangs, got {traffic!r}")
    if not math.isfinite(traffic) or traffic < 0:
        raise ValueError(f"traffic must be a finite number of erlangs >= 0, got {traffic!r}")


def _check_servers(servers: int, name: str = "servers") -> None:
    if isinstance(servers, bool) or not isinstance(servers, int):
        raise ValueError(f"{name} must be an int >= 0, got {servers!r}")
    if servers < 0:
        raise ValueError(f"{name} must be an int >= 0, got {servers!r}")


def _check_target(target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, int | float):
        raise ValueError(f"target blocking must be a probability, got {target!r}")
    if not 0.0 < target < 1.0:
        raise ValueError(
            f"target blocking must be a probability strictly between 0 and 1, got {target!r}"
        )


def erlang_b(traffic: float, servers: int) -> float:
    """Probability that a call offered ``traffic`` erlangs finds all ``servers`` busy."""
    _check_traffic(traffic)
    _check_servers(servers)
    # B(0)=1, B(n)=A·B(n-1)/(n + A·B(n-1)): no factorials or powers, stable for any N.
    b = 1.0
    for n in range(1, servers + 1):
        ab = traffic * b
        b = ab / (n + ab)
    return b


def servers_for_blocking(traffic: float, target: float, max_servers: int = 10000) -> int:
    """Smallest number of servers whose Erlang B blocking at ``traffic`` is ≤ ``target``."""
    _check_traffic(traffic)
    _check_target(target)
    _check_servers(max_servers, "max_servers")
    b = 1.0
    if b <= target:
        return 0
    for n in range(1, max_servers + 1):
        ab = traffic * b
        b = ab / (n + ab)
        if b <= target:
            return n
    raise ValueError(
        f"{traffic:g} erlangs need more than max_servers={max_servers} servers "
        f"for blocking <= {target:g}"
    )


def max_traffic_for_blocking(servers: int, target: float) -> float:
    """The most offered erlangs ``servers`` carry with blocking ≤ ``target`` (by bisection)."""
    _check_servers(servers)
    _check_target(target)
    if servers == 0:
        return 0.0  # no server: every call is blocked whatever the traffic
    # Carried traffic A·(1-B) ≤ N, so B ≥ 1 - N/A: at A = N/(1-target) blocking is ≥ target.
    lo, hi = 0.0, servers / (1.0 - target)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2.0
        if erlang_b(mid, servers) <= target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= _BISECT_REL_TOL * hi:
            break
    return lo


@dataclass(frozen=True)
class Sizing:
    """An Erlang B sizing: a load against a capacity of concurrent calls, and what both imply."""

    calls_per_hour: float
    aht_s: float
    capacity: int
    """Concurrent calls the installation serves (lines, engine slots)."""
    target_blocking: float
    traffic_erlangs: float
    """Offered traffic."""
    blocking: float
    """Share of calls refused with ``capacity`` concurrent calls, 0..1."""
    servers_needed: int
    """Concurrent calls needed to keep blocking at or under ``target_blocking``."""
    capacity_erlangs: float
    """Offered traffic ``capacity`` carries at ``target_blocking``."""
    capacity_calls_per_hour: float
    """Calls per hour (at ``aht_s``) that ``capacity`` carries at ``target_blocking``."""

    def lines(self) -> list[str]:
        """The sizing as human-readable lines."""
        target = f"{self.target_blocking * 100:g} %"
        if self.capacity_calls_per_hour == math.inf:
            carried = "any number of calls/h"
        else:
            carried = f"{self.capacity_calls_per_hour:.0f} calls/h"
        return [
            f"offered traffic: {self.traffic_erlangs:.2f} erlangs "
            f"({self.calls_per_hour:g} calls/h × {self.aht_s:g} s)",
            f"blocking with {_calls(self.capacity)}: {self.blocking * 100:.1f} %",
            f"for ≤ {target} blocking: {_calls(self.servers_needed, 'concurrent ')}",
            f"most load with {_calls(self.capacity)} at ≤ {target} blocking: "
            f"{self.capacity_erlangs:.2f} erlangs = {carried}",
        ]


def _calls(n: int, adjective: str = "") -> str:
    return f"{n} {adjective}call{'' if n == 1 else 's'}"


def size(
    calls_per_hour: float, aht_s: float, capacity: int, target_blocking: float = 0.01
) -> Sizing:
    """Size ``capacity`` concurrent calls against ``calls_per_hour`` calls of ``aht_s`` seconds."""
    traffic = traffic_erlangs(calls_per_hour, aht_s)
    blocking = erlang_b(traffic, capacity)
    needed = servers_for_blocking(traffic, target_blocking)
    carried = max_traffic_for_blocking(capacity, target_blocking)
    per_hour = carried * 3600.0 / aht_s if aht_s > 0 else math.inf
    return Sizing(
        calls_per_hour=calls_per_hour,
        aht_s=aht_s,
        capacity=capacity,
        target_blocking=target_blocking,
        traffic_erlangs=traffic,
        blocking=blocking,
        servers_needed=needed,
        capacity_erlangs=carried,
        capacity_calls_per_hour=per_hour,
    )
