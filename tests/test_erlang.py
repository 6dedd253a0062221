"""Erlang B sizing against published Erlang B table values."""

from __future__ import annotations

import math

import pytest

from agent.kpi.erlang import (
    Sizing,
    erlang_b,
    max_traffic_for_blocking,
    servers_for_blocking,
    size,
    traffic_erlangs,
)

# (servers, blocking, offered erlangs) from the standard Erlang B table (3 significant places).
TABLE = [
    (1, 0.01, 0.0101),
    (2, 0.01, 0.153),
    (5, 0.01, 1.361),
    (10, 0.01, 4.461),
    (20, 0.01, 12.031),
    (50, 0.01, 37.901),
    (10, 0.05, 6.216),
    (5, 0.05, 2.219),
    (20, 0.001, 9.411),
]


def test_traffic_erlangs() -> None:
    assert traffic_erlangs(200, 60) == pytest.approx(200 / 60)
    assert traffic_erlangs(3600, 1) == 1.0
    assert traffic_erlangs(0, 180) == 0.0


def test_erlang_b_exact_small_cases() -> None:
    assert erlang_b(1, 1) == 0.5
    assert erlang_b(2, 2) == pytest.approx(0.4, abs=1e-15)
    assert erlang_b(5.0, 0) == 1.0  # no server: everything is blocked
    assert erlang_b(0.0, 3) == 0.0
    # B(A, N) = (A^N / N!) / sum_{k<=N} A^k / k!
    a, n = 7.3, 9
    direct = (a**n / math.factorial(n)) / sum(a**i / math.factorial(i) for i in range(n + 1))
    assert erlang_b(a, n) == pytest.approx(direct, rel=1e-12)


def test_erlang_b_is_stable_for_large_n() -> None:
    b = erlang_b(9000.0, 10000)
    assert 0.0 <= b < 1e-20
    assert 0.0 < erlang_b(10000.0, 10000) < 0.01


@pytest.mark.parametrize(("servers", "target", "erlangs"), TABLE)
def test_max_traffic_matches_table(servers: int, target: float, erlangs: float) -> None:
    got = max_traffic_for_blocking(servers, target)
    assert got == pytest.approx(erlangs, abs=6e-4)
    assert erlang_b(got, servers) <= target
    assert erlang_b(got * 1.0001, servers) > target


@pytest.mark.parametrize(("servers", "target", "erlangs"), TABLE)
def test_table_blocking_is_at_target(servers: int, target: float, erlangs: float) -> None:
    assert erlang_b(erlangs, servers) == pytest.approx(target, rel=0.01)


def test_servers_for_blocking() -> None:
    assert servers_for_blocking(4.461, 0.01) == 10
    assert servers_for_blocking(4.47, 0.01) == 11
    assert servers_for_blocking(37.9, 0.01) == 50
    assert servers_for_blocking(1.0, 0.5) == 1
    assert servers_for_blocking(0.0, 0.01) == 1  # B(A, 0) = 1 by definition


def test_max_traffic_with_no_server_is_zero() -> None:
    assert max_traffic_for_blocking(0, 0.01) == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: erlang_b(-1.0, 3), "traffic must be a finite number of erlangs >= 0"),
        (lambda: erlang_b(math.nan, 3), "traffic"),
        (lambda: erlang_b(math.inf, 3), "traffic"),
        (lambda: erlang_b("2", 3), "traffic must be a number"),
        (lambda: erlang_b(1.0, -1), "servers must be an int >= 0"),
        (lambda: erlang_b(1.0, 2.5), "servers must be an int >= 0"),
        (lambda: erlang_b(1.0, True), "servers must be an int"),
        (lambda: servers_for_blocking(1.0, 0.0), "strictly between 0 and 1"),
        (lambda: servers_for_blocking(1.0, 1.0), "strictly between 0 and 1"),
        (lambda: servers_for_blocking(100.0, 0.01, max_servers=10), "max_servers=10"),
        (lambda: max_traffic_for_blocking(-2, 0.01), "servers must be an int >= 0"),
        (lambda: max_traffic_for_blocking(5, 1.5), "strictly between 0 and 1"),
        (lambda: traffic_erlangs(-5, 60), "calls_per_hour"),
        (lambda: traffic_erlangs(5, -60), "aht_s"),
    ],
)
def test_validation(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


def test_size() -> None:
    s = size(200, 60, 4)
    assert isinstance(s, Sizing)
    assert s.traffic_erlangs == pytest.approx(3.3333, abs=1e-4)
    assert s.blocking == pytest.approx(erlang_b(200 / 60, 4))
    assert s.blocking == pytest.approx(0.2426, abs=1e-4)
    assert s.servers_needed == 9
    assert s.capacity_erlangs == pytest.approx(0.869, abs=1e-3)
    assert s.capacity_calls_per_hour == pytest.approx(s.capacity_erlangs * 60)
    assert s.lines() == [
        "offered traffic: 3.33 erlangs (200 calls/h × 60 s)",
        "blocking with 4 calls: 24.3 %",
        "for ≤ 1 % blocking: 9 concurrent calls",
        "most load with 4 calls at ≤ 1 % blocking: 0.87 erlangs = 52 calls/h",
    ]


def test_size_other_target_and_singular() -> None:
    s = size(100, 36, 1, target_blocking=0.05)  # 1 erlang on one line
    assert s.blocking == 0.5
    assert s.lines()[1] == "blocking with 1 call: 50.0 %"
    assert s.lines()[2] == "for ≤ 5 % blocking: 4 concurrent calls"  # table: N=4 carries 1.525
    assert "at ≤ 5 % blocking" in s.lines()[3]


def test_size_is_frozen() -> None:
    s = size(10, 60, 2)
    with pytest.raises(AttributeError):
        s.capacity = 3  # type: ignore[misc]
