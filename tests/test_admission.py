"""Admission control: patterns, priority classes, effective capacity, PBX guard, the controller."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.capacity import admission
from agent.capacity.admission import (
    COUNT_KEYS,
    HEADROOM_DETAIL,
    AdmissionController,
    Capacity,
    CapacityTerm,
    PbxGuard,
    PriorityMatcher,
    Refusal,
    Ticket,
    effective_capacity,
    engine_capacity_from_report,
    mask_callerid,
    match_pattern,
)
from agent.capacity.limits import LiveLimits, PbxLimit, PbxLimits
from agent.config import Config, HoursConfig, PriorityClass, parse_config

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(text: str) -> datetime:
    """A wall-clock time in Berlin, e.g. ``2025-06-02 20:00`` (a Monday, CEST = UTC+2)."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN)


# --------------------------------------------------------------------------------------------
# match_pattern


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        # X Z N
        ("_X", "0", True), ("_X", "9", True), ("_X", "a", False), ("_X", "55", False),
        ("_X", "", False),
        ("_Z", "0", False), ("_Z", "1", True), ("_Z", "9", True),
        ("_N", "1", False), ("_N", "2", True), ("_N", "9", True),
        ("_NXXNXXXXXX", "2125551234", True), ("_NXXNXXXXXX", "2121551234", False),
        ("_NXXNXXXXXX", "212555123", False),
        # lower-case pattern letters, and literal letters, are case-insensitive
        ("_nxx", "212", True), ("_nxx", "112", False), ("_zX", "10", True),
        ("_ABC", "abc", True), ("_abc", "ABC", True), ("_abc", "abd", False),
        # sets and ranges
        ("_[15-7]", "1", True), ("_[15-7]", "5", True), ("_[15-7]", "6", True),
        ("_[15-7]", "7", True), ("_[15-7]", "4", False), ("_[15-7]", "8", False),
        ("_[15-7]", "2", False), ("_9[0-2]X", "915", True), ("_9[0-2]X", "935", False),
        ("_[*#]X", "*5", True), ("_[^1]", "^", True), ("_[^1]", "2", False),
        # . is one or more, ! is zero or more
        ("_9.", "9", False), ("_9.", "91", True), ("_9.", "9123456", True),
        ("_9.", "8123", False), ("_9!", "9", True), ("_9!", "912", True), ("_9!", "8", False),
        ("_X.5", "125", True), ("_X.5", "126", False),
        # + and other characters are literal; the whole value must match
        ("_+49X.", "+4930123", True), ("_+49X.", "4930123", False), ("_+49X.", "+49", False),
        ("_+49X.", "+1491", False), ("_123", "123", True), ("_123", "1234", False),
        ("_123", "0123", False), ("_1*2", "1*2", True), ("_1*2", "112", False),
        ("_1*2", "1112", False), ("_(1)", "(1)", True), ("_1|2", "1", False),
        # Asterisk ignores dashes (and spaces) in patterns
        ("_+49-30-X.", "+4930123", True), ("_555-XXXX", "5551234", True),
        # regular expressions: re.search, so only the anchors written count
        ("^\\+49", "+4930123", True), ("^\\+49", "004930123", False),
        ("^49$", "49", True), ("^49$", "491", False), ("^49", "4930", True),
        ("^(?:\\+49|0)30", "03012345", True), ("^(?:\\+49|0)30", "+4940123", False),
        # anything else is an exact match
        ("anonymous", "anonymous", True), ("anonymous", "Anonymous", False),
        ("1234", "1234", True), ("1234", "12345", False), ("X", "5", False),
        ("X.", "X.", True), ("+4930123", "+4930123", True),
    ],
)
def test_match_pattern(pattern: str, value: str, expected: bool) -> None:
    assert match_pattern(pattern, value) is expected


@pytest.mark.parametrize("pattern", ["_[12", "_[]", "_[9-1]"])
def test_malformed_asterisk_pattern_raises(pattern: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        match_pattern(pattern, "1")


def test_patterns_are_compiled_once() -> None:
    pattern = "_+4971X.[0-4]"
    match_pattern(pattern, "+49711230")
    before = admission._compiled.cache_info()
    assert match_pattern(pattern, "+49711234")
    assert not match_pattern(pattern, "+49711235")
    after = admission._compiled.cache_info()
    assert after.hits == before.hits + 2
    assert after.misses == before.misses


@pytest.mark.parametrize(
    ("callerid", "masked"),
    [("+4930123456789", "...6789"), ("1234", "1234"), ("", "(none)"), ("12345", "...2345")],
)
def test_mask_callerid(callerid: str, masked: str) -> None:
    assert mask_callerid(callerid) == masked


# --------------------------------------------------------------------------------------------
# PriorityMatcher

CONFIG_YAML = """
transfers: {front-desk: PJSIP/100, billing: PJSIP/101, emergency: PJSIP/199}
hours:
  timezone: Europe/Berlin
  open: {mon-fri: "08:00-18:00"}
  closed: ["2025-12-25"]
capacity:
  priority_headroom: 1
  priority:
    - name: oncall
      callerid: ["_+4917X."]
      when: after-hours
    - name: hotline
      did: ["7000", "_+4930555700X"]
    - name: daytime-vip
      callerid: ["^\\\\+4930999"]
      when: business-hours
"""


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(CONFIG_YAML, "test.yaml")


@pytest.fixture(scope="module")
def matcher(config: Config) -> PriorityMatcher:
    return PriorityMatcher(config.capacity.priority, config.hours)


ONCALL = "+491701234567"


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("2025-06-02 20:00", "oncall"),  # Monday evening
        ("2025-06-02 10:00", None),  # Monday morning: business hours
        ("2025-06-02 07:59", "oncall"),
        ("2025-06-02 08:00", None),
        ("2025-06-02 17:59", None),
        ("2025-06-02 18:00", "oncall"),
        ("2025-06-07 10:00", "oncall"),  # Saturday
        ("2025-12-25 10:00", "oncall"),  # a Thursday, but closed
        ("2025-12-24 10:00", None),  # the Wednesday before is open
    ],
)
def test_after_hours_class(matcher: PriorityMatcher, when: str, expected: str | None) -> None:
    assert matcher.classify(ONCALL, "100", berlin(when)) == expected


def test_hours_are_judged_in_the_configured_timezone(matcher: PriorityMatcher) -> None:
    # 17:30 UTC on a Monday is open in UTC but 19:30 (closed) in Berlin.
    utc = datetime.fromisoformat("2025-06-02T17:30:00+00:00")
    assert matcher.classify(ONCALL, "100", utc) == "oncall"
    # 07:30 UTC is 09:30 in Berlin: open.
    assert matcher.classify(ONCALL, "100", datetime.fromisoformat("2025-06-02T07:30:00+00:00")) \
        is None
    # a naive datetime is UTC
    assert matcher.classify(ONCALL, "100", datetime(2025, 6, 2, 17, 30)) == "oncall"


@pytest.mark.parametrize(
    ("when", "expected"),
    [("2025-06-02 10:00", "daytime-vip"), ("2025-06-02 20:00", None),
     ("2025-06-07 10:00", None), ("2025-12-25 10:00", None)],
)
def test_business_hours_class(matcher: PriorityMatcher, when: str, expected: str | None) -> None:
    assert matcher.classify("+4930999111", "100", berlin(when)) == expected


def test_did_class_any_caller_any_time(matcher: PriorityMatcher) -> None:
    for when in ("2025-06-02 10:00", "2025-06-02 20:00"):
        assert matcher.classify("+4940111", "7000", berlin(when)) == "hotline"
        assert matcher.classify("", "+49305557003", berlin(when)) == "hotline"
        assert matcher.classify("+4940111", "7001", berlin(when)) is None


def test_first_matching_class_wins(matcher: PriorityMatcher) -> None:
    # matches oncall (after hours) and hotline (DID): oncall is listed first
    assert matcher.classify(ONCALL, "7000", berlin("2025-06-02 20:00")) == "oncall"
    assert matcher.classify(ONCALL, "7000", berlin("2025-06-02 10:00")) == "hotline"


def test_callerid_and_did_must_both_match() -> None:
    both = PriorityMatcher([PriorityClass("both", callerid=("_1XX",), did=("500",))],
                           HoursConfig())
    now = datetime(2025, 6, 2, 12, 0)
    assert both.classify("123", "500", now) == "both"
    assert both.classify("123", "501", now) is None
    assert both.classify("923", "500", now) is None


def test_no_windows_is_always_open() -> None:
    m = PriorityMatcher([PriorityClass("night", callerid=("_X.",), when="after-hours"),
                         PriorityClass("day", callerid=("_X.",), when="business-hours")],
                        HoursConfig(timezone="Europe/Berlin"))
    assert m.classify("123", "", berlin("2025-06-07 03:00")) == "day"


def test_matcher_rejects_a_bad_pattern_at_construction() -> None:
    with pytest.raises(ValueError):
        PriorityMatcher([PriorityClass("bad", callerid=("_[12",))], HoursConfig())


# --------------------------------------------------------------------------------------------
# Effective capacity


def term(name: str, value: int | None) -> CapacityTerm:
    return CapacityTerm(name, value, f"{name}-source")


def test_effective_capacity_is_the_smallest_limit() -> None:
    terms = [term("pbx", 10), term("config", 4), term("engine", 6)]
    cap = effective_capacity(terms)
    assert (cap.value, cap.binding, cap.terms) == (4, "config", tuple(terms))
    assert cap.binding_source() == "config-source"
    assert effective_capacity([term("pbx", 3), term("config", 4)]).binding == "pbx"
    assert effective_capacity([term("config", 8), term("engine", 2)]).binding == "engine"


def test_none_means_no_limit() -> None:
    cap = effective_capacity([term("pbx", None), term("config", 12), term("engine", None)])
    assert (cap.value, cap.binding) == (12, "config")


@pytest.mark.parametrize(
    ("values", "binding"),
    [
        ({"pbx": 4, "config": 4}, "pbx"),
        ({"engine": 4, "config": 4}, "engine"),
        ({"pbx": 4, "engine": 4}, "pbx"),
        ({"pbx": 4, "engine": 4, "config": 4}, "pbx"),
        ({"pbx": 5, "engine": 4, "config": 4}, "engine"),
    ],
)
def test_ties_prefer_pbx_then_engine_then_config(values: dict[str, int], binding: str) -> None:
    terms = [term(n, v) for n, v in values.items()]
    for order in (terms, list(reversed(terms))):
        assert effective_capacity(order).binding == binding
        assert effective_capacity(order).value == 4


def test_no_limit_at_all_is_an_error() -> None:
    with pytest.raises(ValueError):
        effective_capacity([term("pbx", None), term("engine", None)])


def write_report(tmp_path: Path, data: object) -> str:
    path = tmp_path / "latest.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_report_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_report(tmp_path, {"safe_capacity": 6, "pbx": "asterisk",
                                   "finished_at": "2025-06-02T03:10:00+00:00", "runs": [1, 2]})
    with caplog.at_level(logging.WARNING):
        t = engine_capacity_from_report(path)
    assert t == CapacityTerm("engine", 6, f"{path} (measured 2025-06-02T03:10:00+00:00)")
    assert not caplog.records


def test_report_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "nope.json")
    with caplog.at_level(logging.WARNING):
        t = engine_capacity_from_report(path)
    assert t == CapacityTerm("engine", None, f"no capacity report ({path})")
    assert not caplog.records


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "invalid JSON"),
        ("", "invalid JSON"),
        ("[6]", "not a JSON object"),
        ('{"pbx": "asterisk"}', "safe_capacity must be a non-negative integer, got None"),
        ('{"safe_capacity": "6"}', "got '6'"),
        ('{"safe_capacity": 6.5}', "got 6.5"),
        ('{"safe_capacity": true}', "got True"),
        ('{"safe_capacity": -1}', "got -1"),
    ],
)
def test_report_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str,
                        why: str) -> None:
    path = tmp_path / "latest.json"
    path.write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        t = engine_capacity_from_report(str(path))
    assert t.name == "engine" and t.value is None
    assert str(path) in t.source and why in t.source
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_report_unreadable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        t = engine_capacity_from_report(str(tmp_path))  # a directory
    assert t.value is None and "cannot read" in t.source
    assert caplog.records


def test_report_zero_is_used_as_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_report(tmp_path, {"safe_capacity": 0, "finished_at": "2025-06-02T03:10:00Z"})
    with caplog.at_level(logging.WARNING):
        t = engine_capacity_from_report(path)
    assert t.value == 1
    assert t.source == f"{path} (measured 2025-06-02T03:10:00Z: 0 calls, used as 1)"
    assert "safe capacity of 0" in caplog.text


# --------------------------------------------------------------------------------------------
# PbxGuard

ASTERISK = PbxLimits("asterisk", (
    PbxLimit("maxcalls", 10, "/etc/asterisk/asterisk.conf:11"),
    PbxLimit("maxload", 4.0, "/etc/asterisk/asterisk.conf:12"),
    PbxLimit("minmemfree", 256, "/etc/asterisk/asterisk.conf:13"),
))
FREESWITCH = PbxLimits("freeswitch", (
    PbxLimit("max-sessions", 40, "switch.conf.xml:5"),
    PbxLimit("sessions-per-second", 20, "switch.conf.xml:6"),
    PbxLimit("min-idle-cpu", 25.0, "switch.conf.xml:7"),
))


def live(**kw: float | int | None) -> Callable[[], LiveLimits]:
    reading = LiveLimits(pbx="asterisk", source="ami 127.0.0.1:5038", at=0.0, **kw)  # type: ignore[arg-type]
    return lambda: reading


def fail() -> float:
    raise OSError("sensor broke")


def quiet_asterisk(**kw: object) -> PbxGuard:
    """An Asterisk guard whose sensors all read healthy unless overridden."""
    args: dict[str, object] = {"load1": lambda: 0.5, "mem_free_mib": lambda: 4096.0}
    args.update(kw)
    return PbxGuard(ASTERISK, **args)  # type: ignore[arg-type]


def test_guard_quiet() -> None:
    assert quiet_asterisk().check() is None


def test_guard_load() -> None:
    assert quiet_asterisk(load1=lambda: 5.2).check() == \
        "load average 5.20 >= maxload 4 (/etc/asterisk/asterisk.conf:12)"
    assert quiet_asterisk(load1=lambda: 4.0).check() is not None  # Asterisk refuses at >=
    assert quiet_asterisk(load1=lambda: 3.99).check() is None


def test_guard_maxload_unset_or_zero_never_refuses() -> None:
    zero = PbxLimits("asterisk", (PbxLimit("maxload", 0.0, "asterisk.conf:3"),))
    assert PbxGuard(zero, load1=lambda: 99.0, mem_free_mib=lambda: 1.0).check() is None
    unset = PbxLimits("asterisk", (PbxLimit("maxload", None, "default"),))
    assert PbxGuard(unset, load1=lambda: 99.0, mem_free_mib=lambda: 1.0).check() is None


def test_guard_live_maxload_overrides_the_file() -> None:
    guard = quiet_asterisk(load1=lambda: 2.5, live=live(max_load=2.0))
    assert guard.check() == "load average 2.50 >= maxload 2 (ami 127.0.0.1:5038)"
    assert quiet_asterisk(load1=lambda: 5.0, live=live(max_load=8.0)).check() is None


def test_guard_memory() -> None:
    assert quiet_asterisk(mem_free_mib=lambda: 100.0).check() == \
        "free memory 100 MiB < minmemfree 256 (/etc/asterisk/asterisk.conf:13)"
    assert quiet_asterisk(mem_free_mib=lambda: 256.0).check() is None


def test_guard_live_calls() -> None:
    # the PBX's count includes the call being admitted: only a count over the limit refuses
    assert quiet_asterisk(live=live(max_calls=5, current_calls=6)).check() == \
        "PBX has 6 calls > max 5 (ami 127.0.0.1:5038)"
    assert quiet_asterisk(live=live(max_calls=5, current_calls=5)).check() is None
    # the PBX reports its calls but not its limit: the file's maxcalls applies
    assert quiet_asterisk(live=live(current_calls=11)).check() == \
        "PBX has 11 calls > max 10 (/etc/asterisk/asterisk.conf:11)"
    assert quiet_asterisk(live=live(current_calls=10)).check() is None
    # no limit anywhere
    none = PbxLimits("asterisk", ())
    assert PbxGuard(none, live=live(current_calls=500), load1=lambda: 0.0).check() is None


def test_guard_freeswitch_idle_cpu() -> None:
    def guard(idle: float | None, **kw: object) -> PbxGuard:
        return PbxGuard(FREESWITCH, load1=fail, mem_free_mib=fail,
                        idle_cpu_percent=lambda: idle, **kw)  # type: ignore[arg-type]

    assert guard(10.0).check() == "idle CPU 10.0% < min-idle-cpu 25% (switch.conf.xml:7)"
    assert guard(30.0).check() is None
    assert guard(None).check() is None
    fs_live = LiveLimits(pbx="freeswitch", source="esl 127.0.0.1:8021", at=0.0, idle_cpu=5.0,
                         min_idle_cpu=20.0)
    assert guard(90.0, live=lambda: fs_live).check() == \
        "idle CPU 5.0% < min-idle-cpu 20% (esl 127.0.0.1:8021)"
    # min-idle-cpu not set: no refusal at any idle level
    unset = PbxLimits("freeswitch", (PbxLimit("min-idle-cpu", None, "default"),))
    assert PbxGuard(unset, idle_cpu_percent=lambda: 0.0).check() is None


def test_guard_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken_live() -> LiveLimits:
        raise ConnectionError("ami down")

    def broken_idle() -> float:
        raise RuntimeError("no cpu stats")

    limits = PbxLimits("asterisk", ASTERISK.limits + (PbxLimit("min-idle-cpu", 25, "x:1"),))
    guard = PbxGuard(limits, live=broken_live, load1=fail, mem_free_mib=fail,
                     idle_cpu_percent=broken_idle)
    with caplog.at_level(logging.DEBUG, logger="agent.capacity.admission"):
        assert guard.check() is None
        assert guard.pbx_max_calls() == CapacityTerm("pbx", 10, "/etc/asterisk/asterisk.conf:11")
    assert "sensor broke" in caplog.text and "ami down" in caplog.text
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_guard_broken_sensor_does_not_hide_another() -> None:
    assert quiet_asterisk(load1=fail, mem_free_mib=lambda: 10.0).check() == \
        "free memory 10 MiB < minmemfree 256 (/etc/asterisk/asterisk.conf:13)"


def test_guard_default_sensors_read_this_machine() -> None:
    huge = PbxLimits("asterisk", (PbxLimit("maxload", 1e9, "a:1"),
                                  PbxLimit("minmemfree", 1e12, "a:2")))
    detail = PbxGuard(huge).check()
    assert detail is not None and detail.startswith("free memory ")
    assert detail.endswith("MiB < minmemfree 1e+12 (a:2)")
    assert PbxGuard(PbxLimits("asterisk", (PbxLimit("maxload", 1e9, "a:1"),))).check() is None


def test_pbx_max_calls() -> None:
    assert quiet_asterisk().pbx_max_calls() == \
        CapacityTerm("pbx", 10, "/etc/asterisk/asterisk.conf:11")
    assert quiet_asterisk(live=live(max_calls=7)).pbx_max_calls() == \
        CapacityTerm("pbx", 7, "ami 127.0.0.1:5038")
    assert quiet_asterisk(live=live(current_calls=3)).pbx_max_calls().value == 10
    # FreeSWITCH max-sessions 40 admits 39 inbound calls
    assert PbxGuard(FREESWITCH).pbx_max_calls() == CapacityTerm("pbx", 39, "switch.conf.xml:5")
    assert PbxGuard(None).pbx_max_calls().value is None
    assert PbxGuard(PbxLimits("asterisk", ())).pbx_max_calls().value is None


# --------------------------------------------------------------------------------------------
# AdmissionController


def fixed(value: int, binding: str = "config") -> Callable[[], Capacity]:
    cap = Capacity(value, binding, (CapacityTerm(binding, value, f"{binding}-source"),))
    return lambda: cap


def vip_matcher() -> PriorityMatcher:
    return PriorityMatcher([PriorityClass("vip", callerid=("_+4930999X.",))], HoursConfig())


VIP = "+49309991234"
ORDINARY = "+4940123456"


def ticket(result: Ticket | Refusal) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def test_reserved_but_not_started_is_counted() -> None:
    ctl = AdmissionController(fixed(3), headroom=0)
    tickets = [ticket(ctl.admit(ORDINARY)) for _ in range(3)]
    assert (ctl.reserved, ctl.active, ctl.in_use) == (3, 0, 3)
    assert ctl.admit(ORDINARY) == Refusal("capacity", "3 of 3 calls in use (config: config-source)")
    tickets[0].started()
    tickets[0].started()
    assert (ctl.reserved, ctl.active, ctl.in_use) == (2, 1, 3)
    assert isinstance(ctl.admit(ORDINARY), Refusal)


def test_release_frees_and_double_release_is_harmless() -> None:
    ctl = AdmissionController(fixed(2), headroom=0)
    a = ticket(ctl.admit())
    b = ticket(ctl.admit())
    a.started()
    a.release()
    assert (ctl.reserved, ctl.active) == (1, 0)
    a.release()
    a.started()  # after release: no effect
    assert (ctl.reserved, ctl.active) == (1, 0)
    b.release()  # never started: frees its reservation
    b.release()
    assert ctl.in_use == 0
    c = ticket(ctl.admit())
    d = ticket(ctl.admit())
    assert isinstance(ctl.admit(), Refusal)
    c.release()
    d.started()
    assert (ctl.reserved, ctl.active) == (0, 1)
    assert ctl.peak == 2


def test_headroom_keeps_a_slot_for_priority_callers() -> None:
    ctl = AdmissionController(fixed(3), headroom=1, matcher=vip_matcher())
    ordinary = [ticket(ctl.admit(ORDINARY)) for _ in range(2)]
    assert all(t.priority is None for t in ordinary)
    assert ctl.admit(ORDINARY) == Refusal("capacity", HEADROOM_DETAIL)
    vip = ticket(ctl.admit(VIP))
    assert vip.priority == "vip"
    refused = ctl.admit(VIP)
    assert isinstance(refused, Refusal) and refused.reason == "capacity"
    assert refused.detail != HEADROOM_DETAIL
    ordinary[0].release()
    # 2 in use of 3, headroom 1: still the priority slot
    assert ctl.admit(ORDINARY) == Refusal("capacity", HEADROOM_DETAIL)
    assert ticket(ctl.admit(VIP)).priority == "vip"


def test_headroom_only_with_priority_classes() -> None:
    for matcher in (None, PriorityMatcher([], HoursConfig())):
        ctl = AdmissionController(fixed(3), headroom=1, matcher=matcher)
        assert ctl.effective_headroom(3) == 0
        for _ in range(3):
            ticket(ctl.admit(ORDINARY))
        assert ctl.admit(ORDINARY).reason == "capacity"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("cap", "headroom", "ordinary_slots"),
    [(1, 1, 1), (2, 1, 1), (2, 5, 1), (3, 5, 1), (4, 1, 3), (4, 2, 2), (4, 0, 4)],
)
def test_headroom_never_takes_the_last_ordinary_slot(cap: int, headroom: int,
                                                     ordinary_slots: int) -> None:
    ctl = AdmissionController(fixed(cap), headroom=headroom, matcher=vip_matcher())
    assert ctl.effective_headroom(cap) == cap - ordinary_slots
    for _ in range(ordinary_slots):
        ticket(ctl.admit(ORDINARY))
    assert isinstance(ctl.admit(ORDINARY), Refusal)
    for _ in range(cap - ordinary_slots):
        ticket(ctl.admit(VIP))
    assert isinstance(ctl.admit(VIP), Refusal)


def test_priority_uses_the_injected_time() -> None:
    hours = HoursConfig("Europe/Berlin", windows=((0, 480, 1080),))
    matcher = PriorityMatcher([PriorityClass("night", callerid=("_X.",), when="after-hours")],
                              hours)
    clock_now = [berlin("2025-06-02 20:00")]
    ctl = AdmissionController(fixed(5), headroom=1, matcher=matcher, now=lambda: clock_now[0])
    assert ticket(ctl.admit("1234")).priority == "night"
    clock_now[0] = berlin("2025-06-02 10:00")
    assert ticket(ctl.admit("1234")).priority is None


def test_draining_refuses_everyone() -> None:
    ctl = AdmissionController(fixed(5), headroom=1, matcher=vip_matcher())
    held = ticket(ctl.admit(ORDINARY))
    assert not ctl.draining
    ctl.start_drain()
    assert ctl.draining
    assert ctl.admit(ORDINARY) == Refusal("draining")
    assert ctl.admit(VIP) == Refusal("draining")
    held.started()
    held.release()
    assert ctl.in_use == 0
    assert ctl.counts()["refused_draining"] == 2


def test_reject_new_refuses_ordinary_but_not_priority() -> None:
    level = ["reject-new"]
    ctl = AdmissionController(fixed(5), headroom=1, matcher=vip_matcher(),
                              shed=lambda: (level[0], "llm-p95"))
    assert ctl.admit(ORDINARY) == Refusal("shed:llm-p95", "shedding level reject-new")
    assert ticket(ctl.admit(VIP)).priority == "vip"
    level[0] = "brief"
    assert isinstance(ctl.admit(ORDINARY), Ticket)


def test_guard_refusal_is_pbx_limit_even_for_priority() -> None:
    ctl = AdmissionController(fixed(5), headroom=1, matcher=vip_matcher(),
                              guard=lambda: "load average 5.20 >= maxload 4 (asterisk.conf:12)")
    expected = Refusal("pbx-limit", "load average 5.20 >= maxload 4 (asterisk.conf:12)")
    assert ctl.admit(ORDINARY) == expected
    assert ctl.admit(VIP) == expected


def test_full_at_a_pbx_bound_capacity_is_pbx_limit() -> None:
    ctl = AdmissionController(fixed(1, "pbx"), headroom=0)
    ticket(ctl.admit())
    assert ctl.admit() == Refusal("pbx-limit", "1 of 1 calls in use (pbx: pbx-source)")
    ctl = AdmissionController(fixed(1, "engine"), headroom=0)
    ticket(ctl.admit())
    assert ctl.admit().reason == "capacity"  # type: ignore[union-attr]


def test_check_order() -> None:
    calls: list[str] = []

    def shed() -> tuple[str, str]:
        calls.append("shed")
        return "reject-new", "cpu"

    def guard() -> str | None:
        calls.append("guard")
        return "PBX full"

    def capacity() -> Capacity:
        calls.append("capacity")
        return fixed(0)()

    ctl = AdmissionController(capacity, headroom=0, matcher=vip_matcher(), shed=shed,
                              guard=guard)
    assert ctl.admit(ORDINARY).reason == "shed:cpu"  # type: ignore[union-attr]
    assert calls == ["shed"]
    calls.clear()
    assert ctl.admit(VIP).reason == "pbx-limit"  # type: ignore[union-attr]
    assert calls == ["shed", "guard"]
    calls.clear()
    ctl.start_drain()
    assert ctl.admit(VIP).reason == "draining"  # type: ignore[union-attr]
    assert calls == []


def test_counts_snapshot_and_clock() -> None:
    level = ["normal"]
    pbx_full: list[str | None] = [None]
    t = [100.0]
    ctl = AdmissionController(fixed(3, "engine"), headroom=1, matcher=vip_matcher(),
                              shed=lambda: (level[0], "rule-a" if level[0] != "normal" else ""),
                              guard=lambda: pbx_full[0], clock=lambda: t[0])
    assert ctl.counts() == dict.fromkeys(COUNT_KEYS, 0)
    first = ticket(ctl.admit(ORDINARY))
    assert first.admitted_at == 100.0
    t[0] = 101.5
    ticket(ctl.admit(ORDINARY))
    assert ticket(ctl.admit(VIP)).admitted_at == 101.5
    ctl.admit(ORDINARY)  # full: capacity
    level[0] = "reject-new"
    ctl.admit(ORDINARY)  # shed
    pbx_full[0] = "PBX full"
    ctl.admit(VIP)  # pbx-limit
    first.started()
    ctl.start_drain()
    ctl.admit(VIP)
    assert ctl.counts() == {"admitted": 3, "priority_admitted": 1, "refused_capacity": 1,
                            "refused_pbx-limit": 1, "refused_shed": 1, "refused_draining": 1}
    assert ctl.snapshot() == {"capacity": 3, "binding": "engine", "in_use": 3, "reserved": 2,
                              "active": 1, "peak": 3, "level": "reject-new", "rule": "rule-a",
                              "draining": True}


def test_refusals_are_logged_with_a_masked_caller_id(caplog: pytest.LogCaptureFixture) -> None:
    ctl = AdmissionController(fixed(0), headroom=0)
    with caplog.at_level(logging.INFO, logger="agent.capacity.admission"):
        ctl.admit("+4940123456", "7000")
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "...3456" in message and "+4940123456" not in message and "401234" not in message
    assert "capacity" in message and "0 of 0 calls in use" in message and "7000" in message


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as possible, so a missing lock shows up as a double admit."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def slow_clock() -> float:
    """A clock that yields the GIL: it runs between the capacity check and the reservation."""
    time.sleep(0.0002)
    return time.monotonic()


@pytest.mark.usefixtures("fast_switching")
def test_two_threads_race_for_the_last_slot() -> None:
    for _ in range(200):
        ctl = AdmissionController(fixed(3), headroom=0, clock=slow_clock)
        ticket(ctl.admit())
        ticket(ctl.admit())
        barrier = threading.Barrier(2)
        results: list[Ticket | Refusal] = []

        def race(ctl: AdmissionController = ctl, barrier: threading.Barrier = barrier,
                 results: list[Ticket | Refusal] = results) -> None:
            barrier.wait()
            results.append(ctl.admit())

        threads = [threading.Thread(target=race) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=10)
        assert sum(isinstance(r, Ticket) for r in results) == 1, results
        assert Refusal("capacity", "3 of 3 calls in use (config: config-source)") in results
        assert ctl.in_use == 3


@pytest.mark.usefixtures("fast_switching")
def test_many_threads_never_exceed_capacity() -> None:
    ctl = AdmissionController(fixed(4), headroom=1, matcher=vip_matcher(), clock=slow_clock)
    errors: list[str] = []

    def worker(caller: str) -> None:
        for _ in range(100):
            result = ctl.admit(caller)
            if isinstance(result, Ticket):
                result.started()
                if ctl.in_use > 4:
                    errors.append(f"in_use {ctl.in_use}")
                time.sleep(0.0005)  # hold the slot, so the controller runs full
                result.release()
                result.release()

    threads = [threading.Thread(target=worker, args=(VIP if i % 2 else ORDINARY,))
               for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    assert ctl.in_use == 0 and ctl.reserved == 0 and ctl.active == 0
    assert ctl.peak == 4
    counts = ctl.counts()
    assert counts["admitted"] + counts["refused_capacity"] == 8 * 100
    assert counts["refused_capacity"] > 0 and counts["priority_admitted"] > 0
