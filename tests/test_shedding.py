"""Load shedding: rules parsing with file:line errors, hold times, hysteresis, the monitor."""

from __future__ import annotations

import ast
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from agent.capacity.sensors import SENSORS
from agent.capacity.shedding import (
    LEVELS,
    ShedGovernor,
    ShedMonitor,
    ShedRule,
    ShedRules,
    ShedState,
    default_rules,
    default_rules_text,
    load_rules,
    parse_rules,
)
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PATH = "/etc/pbx-agent/shedding.yaml"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def set(self, t: float) -> None:
        self.now = 1000.0 + t


def rule(name: str = "cpu-hot", sensor: str = "cpu_percent", op: str = ">",
         threshold: float = 90.0, recover: float | None = None, for_s: float = 10.0,
         recover_for_s: float | None = None, level: str = "brief") -> ShedRule:
    return ShedRule(name=name, sensor=sensor, op=op, threshold=threshold,
                    recover=threshold if recover is None else recover, for_s=for_s,
                    recover_for_s=for_s if recover_for_s is None else recover_for_s,
                    level=level, source="test:1")


def governor(*rules: ShedRule) -> tuple[ShedGovernor, FakeClock]:
    clock = FakeClock()
    return ShedGovernor(ShedRules(tuple(rules), "test"), clock=clock), clock


def feed(gov: ShedGovernor, clock: FakeClock, stream: list[tuple[float, Mapping[str, float | None]]]
         ) -> list[str]:
    """Apply (time, readings) in order; the level after each."""
    levels = []
    for t, readings in stream:
        clock.set(t)
        levels.append(gov.update(readings).level)
    return levels


def cpu(t: float, value: float | None) -> tuple[float, Mapping[str, float | None]]:
    return t, {"cpu_percent": value}


# ---------------------------------------------------------------------------------------------
# hold times, hysteresis, levels

def test_short_spike_below_the_hold_time_does_not_trip() -> None:
    gov, clock = governor(rule(for_s=10))
    levels = feed(gov, clock, [cpu(0, 95), cpu(5, 99), cpu(9.5, 97), cpu(9.9, 60),
                               cpu(10, 95), cpu(19.9, 95)])
    # the dip at 9.9 s restarted the wait: from 10 s it needs until 20 s
    assert levels == ["normal"] * 6
    assert gov.state == ShedState(level="normal", rule="", active=(), since=1000.0)
    assert feed(gov, clock, [cpu(20, 95)]) == ["brief"]


def test_sustained_reading_trips_exactly_after_for() -> None:
    gov, clock = governor(rule(for_s=10, level="canned"))
    levels = feed(gov, clock, [cpu(t, 95) for t in (0, 1, 5, 9, 9.999)])
    assert levels == ["normal"] * 5
    assert feed(gov, clock, [cpu(10, 95)]) == ["canned"]
    state = gov.state
    assert state == ShedState(level="canned", rule="cpu-hot", active=("cpu-hot",), since=1010.0)
    assert state.reason == "shed:cpu-hot"
    assert gov.level == "canned"


def test_hold_time_zero_trips_on_the_first_reading_and_equal_is_not_past() -> None:
    gov, clock = governor(rule(threshold=90, for_s=0))
    assert feed(gov, clock, [cpu(0, 90)]) == ["normal"]  # "above 90" means strictly above
    assert feed(gov, clock, [cpu(1, 90.5)]) == ["brief"]


def test_hysteresis_between_recover_and_threshold_keeps_the_level() -> None:
    gov, clock = governor(rule(threshold=90, recover=75, for_s=0, recover_for_s=5))
    assert feed(gov, clock, [cpu(0, 95)]) == ["brief"]
    # 80 is below the threshold but not below the recovery threshold: stays shed, for any time
    assert feed(gov, clock, [cpu(t, 80) for t in range(1, 60)]) == ["brief"] * 59
    # a reading at the recovery threshold itself is not past it
    assert feed(gov, clock, [cpu(60, 75), cpu(70, 75)]) == ["brief", "brief"]


def test_recovery_needs_recover_for_continuously() -> None:
    gov, clock = governor(rule(threshold=90, recover=75, for_s=0, recover_for_s=5))
    feed(gov, clock, [cpu(0, 95)])
    # recovery starts at 1; a reading back in the band at 4 restarts it
    assert feed(gov, clock, [cpu(1, 70), cpu(3, 60), cpu(4, 80), cpu(5, 70), cpu(9.9, 70)]) == \
        ["brief"] * 5
    assert feed(gov, clock, [cpu(10, 70)]) == ["normal"]
    assert gov.state == ShedState(level="normal", rule="", active=(), since=1010.0)
    assert gov.state.reason == ""


def test_rule_trips_again_after_recovering() -> None:
    gov, clock = governor(rule(threshold=90, recover=75, for_s=2, recover_for_s=2))
    assert feed(gov, clock, [cpu(0, 95), cpu(2, 95), cpu(3, 70), cpu(5, 70), cpu(6, 95),
                             cpu(8, 95)]) == \
        ["normal", "brief", "brief", "normal", "normal", "brief"]


def test_highest_level_wins_and_falls_back_to_the_next() -> None:
    gov, clock = governor(
        rule("cpu-hot", "cpu_percent", threshold=90, for_s=0, level="brief"),
        rule("llm-slow", "llm_queue_wait_ms", threshold=800, recover=300, for_s=0,
             level="canned"),
        rule("mem-low", "mem_available_mib", op="<", threshold=400, recover=700, for_s=0,
             level="reject-new"),
    )
    healthy = {"cpu_percent": 20.0, "llm_queue_wait_ms": 10.0, "mem_available_mib": 4000.0}
    assert feed(gov, clock, [(0, healthy)]) == ["normal"]
    assert feed(gov, clock, [(1, {**healthy, "cpu_percent": 99.0})]) == ["brief"]
    both = {**healthy, "cpu_percent": 99.0, "llm_queue_wait_ms": 900.0}
    assert feed(gov, clock, [(2, both)]) == ["canned"]
    assert gov.state == ShedState("canned", "llm-slow", ("cpu-hot", "llm-slow"), 1002.0)
    assert feed(gov, clock, [(3, {**both, "mem_available_mib": 100.0})]) == ["reject-new"]
    assert gov.state.active == ("cpu-hot", "llm-slow", "mem-low")
    assert gov.state.reason == "shed:mem-low"
    # memory recovers: back to the highest of what is still tripped
    assert feed(gov, clock, [(4, {**both, "mem_available_mib": 900.0})]) == ["canned"]
    assert feed(gov, clock, [(5, {**both, "llm_queue_wait_ms": 100.0})]) == ["brief"]
    assert gov.state == ShedState("brief", "cpu-hot", ("cpu-hot",), 1005.0)
    assert feed(gov, clock, [(6, healthy)]) == ["normal"]
    assert LEVELS == ("normal", "brief", "canned", "reject-new")


def test_tie_names_the_first_rule_in_file_order() -> None:
    gov, clock = governor(
        rule("first", "cpu_percent", threshold=90, for_s=0, level="canned"),
        rule("second", "llm_queue_depth", threshold=5, for_s=0, level="canned"),
    )
    feed(gov, clock, [(0, {"cpu_percent": 10.0, "llm_queue_depth": 9.0})])
    assert gov.state.rule == "second"
    feed(gov, clock, [(1, {"cpu_percent": 99.0, "llm_queue_depth": 9.0})])
    # the level did not change, so neither did `since`; the naming rule is the first in the file
    assert gov.state == ShedState("canned", "first", ("first", "second"), 1000.0)


def test_below_rule_trips_low_and_recovers_above() -> None:
    gov, clock = governor(rule("mem-low", "mem_available_mib", op="<", threshold=400,
                               recover=700, for_s=5, recover_for_s=10, level="reject-new"))

    def mem(t: float, v: float) -> tuple[float, Mapping[str, float | None]]:
        return t, {"mem_available_mib": v}

    assert feed(gov, clock, [mem(0, 500), mem(1, 350), mem(5.9, 300)]) == ["normal"] * 3
    assert feed(gov, clock, [mem(6, 300)]) == ["reject-new"]
    assert feed(gov, clock, [mem(7, 600), mem(30, 650)]) == ["reject-new"] * 2  # in the band
    assert feed(gov, clock, [mem(31, 800), mem(40.9, 800), mem(41, 800)]) == \
        ["reject-new", "reject-new", "normal"]


@pytest.mark.parametrize("missing", [None, float("nan"), "absent"])
def test_missing_reading_restarts_the_pending_wait(missing: float | str | None) -> None:
    gov, clock = governor(rule(for_s=10))
    gap: Mapping[str, float | None] = {} if missing == "absent" else \
        {"cpu_percent": missing}  # type: ignore[dict-item]
    assert feed(gov, clock, [cpu(0, 95), cpu(8, 95), (9, gap), cpu(10, 95), cpu(19.9, 95)]) == \
        ["normal"] * 5
    assert feed(gov, clock, [cpu(20, 95)]) == ["brief"]


def test_missing_reading_keeps_a_tripped_rule_tripped() -> None:
    gov, clock = governor(rule(threshold=90, recover=75, for_s=0, recover_for_s=5))
    feed(gov, clock, [cpu(0, 95), cpu(1, 50), cpu(4, 50)])  # recovering since 1
    # an unreadable sensor for a minute: still shed, and the recovery wait starts over
    assert feed(gov, clock, [cpu(t, None) for t in range(5, 65)]) == ["brief"] * 60
    assert feed(gov, clock, [cpu(65, 50), cpu(69.9, 50)]) == ["brief", "brief"]
    assert feed(gov, clock, [cpu(70, 50)]) == ["normal"]


def test_empty_rule_list_never_sheds() -> None:
    rules = parse_rules("rules: []\n", PATH)
    assert len(rules) == 0
    gov = ShedGovernor(rules, clock=FakeClock())
    assert gov.update({"cpu_percent": 100.0, "mem_available_mib": 0.0}).level == "normal"


def test_replace_rules_keeps_same_named_state_and_drops_removed_rules() -> None:
    gov, clock = governor(
        rule("cpu-hot", "cpu_percent", threshold=90, for_s=0, level="brief"),
        rule("llm-slow", "llm_queue_wait_ms", threshold=800, for_s=0, level="canned"),
        rule("depth", "llm_queue_depth", threshold=5, for_s=10, level="canned"),
    )
    feed(gov, clock, [(0, {"cpu_percent": 99.0, "llm_queue_wait_ms": 900.0,
                           "llm_queue_depth": 9.0})])
    assert gov.state == ShedState("canned", "llm-slow", ("cpu-hot", "llm-slow"), 1000.0)
    clock.set(4)
    # llm-slow removed; cpu-hot kept (with another threshold); depth kept mid-wait; one new rule
    gov.replace_rules(ShedRules((
        rule("cpu-hot", "cpu_percent", threshold=95, recover=80, for_s=0, recover_for_s=3,
             level="brief"),
        rule("depth", "llm_queue_depth", threshold=5, for_s=10, level="canned"),
        rule("mem-low", "mem_available_mib", op="<", threshold=400, for_s=0,
             level="reject-new"),
    ), "reloaded.yaml"))
    assert gov.state == ShedState("brief", "cpu-hot", ("cpu-hot",), 1004.0)
    assert [r.name for r in gov.rules] == ["cpu-hot", "depth", "mem-low"]
    # depth's trip wait started at 0 and survived the reload: it trips at 10, not at 14
    assert feed(gov, clock, [(10, {"cpu_percent": 85.0, "llm_queue_depth": 9.0,
                                   "mem_available_mib": 4000.0})]) == ["canned"]
    assert gov.state.active == ("cpu-hot", "depth")
    # cpu-hot kept its tripped state: 85 is in the new band (80..95), so it stays tripped
    feed(gov, clock, [(11, {"cpu_percent": 85.0, "llm_queue_depth": 0.0})])
    feed(gov, clock, [(25, {"cpu_percent": 85.0, "llm_queue_depth": 0.0})])
    assert gov.state.active == ("cpu-hot",)
    assert feed(gov, clock, [(26, {"cpu_percent": 70.0}), (29, {"cpu_percent": 70.0})]) == \
        ["brief", "normal"]


def test_replace_rules_with_a_removed_rule_only_drops_its_level() -> None:
    gov, clock = governor(rule("llm-slow", "llm_queue_wait_ms", threshold=800, for_s=0,
                               level="canned"))
    feed(gov, clock, [(0, {"llm_queue_wait_ms": 900.0})])
    clock.set(5)
    gov.replace_rules(ShedRules((), "empty.yaml"))
    assert gov.state == ShedState("normal", "", (), 1005.0)


def test_governor_refuses_duplicate_rule_names() -> None:
    with pytest.raises(ValueError, match="duplicate rule names: a"):
        ShedGovernor(ShedRules((rule("a"), rule("a")), "x"), clock=FakeClock())
    gov, _ = governor(rule("a"))
    with pytest.raises(ValueError, match="duplicate"):
        gov.replace_rules(ShedRules((rule("a"), rule("a")), "x"))


def test_rule_refuses_recovery_on_the_wrong_side() -> None:
    with pytest.raises(ValueError, match="wrong side"):
        rule(threshold=90, recover=95)
    with pytest.raises(ValueError, match="wrong side"):
        rule(op="<", threshold=400, recover=300)


def test_level_changes_are_logged_with_rule_sensor_value_and_threshold(
        caplog: pytest.LogCaptureFixture) -> None:
    gov, clock = governor(rule("llm-slow", "llm_queue_wait_ms", threshold=800, recover=300,
                               for_s=10, recover_for_s=20, level="canned"))
    caplog.set_level(logging.INFO, logger="agent.capacity.shedding")
    feed(gov, clock, [(0, {"llm_queue_wait_ms": 950.0}), (10, {"llm_queue_wait_ms": 950.0})])
    up = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in up] == [
        "load shedding normal -> canned: rule llm-slow "
        "(llm_queue_wait_ms=950, llm_queue_wait_ms > 800 for 10s)"]
    caplog.clear()
    feed(gov, clock, [(11, {"llm_queue_wait_ms": 120.0}), (31, {"llm_queue_wait_ms": 120.0})])
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "load shedding canned -> normal: rule llm-slow recovered: "
                       "llm_queue_wait_ms=120, llm_queue_wait_ms < 300 for 20s")]


def test_state_is_readable_while_another_thread_updates() -> None:
    gov = ShedGovernor(ShedRules((rule(for_s=0, threshold=50),), "t"))
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            state = gov.state
            seen.add((state.level, state.rule, state.active))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(2000):
            gov.update({"cpu_percent": 99.0 if i % 2 else 1.0})
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert seen and seen <= {("normal", "", ()), ("brief", "cpu-hot", ("cpu-hot",))}


# ---------------------------------------------------------------------------------------------
# parsing

GOOD = """\
rules:
  - name: cpu-hot
    sensor: cpu_percent
    above: 90
    for: 10s
    recover_below: 75
    recover_for: 20s
    level: canned
  - name: mem-low
    sensor: mem_available_mib
    below: 400
    for: 500ms
    level: reject-new
"""


def test_parse_rules_reads_every_field_with_defaults_and_sources() -> None:
    rules = parse_rules(GOOD, PATH)
    assert rules.path == PATH
    assert rules.rules == (
        ShedRule("cpu-hot", "cpu_percent", ">", 90.0, 75.0, 10.0, 20.0, "canned", f"{PATH}:2"),
        # recover defaults to the threshold, recover_for to for
        ShedRule("mem-low", "mem_available_mib", "<", 400.0, 400.0, 0.5, 0.5, "reject-new",
                 f"{PATH}:9"),
    )


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("7", 7.0), ("1.5", 1.5), ("0", 0.0),
    ("2.5s", 2.5), ("'15'", 15.0), ("0ms", 0.0),
])
def test_durations(text: str, seconds: float) -> None:
    rules = parse_rules(f"rules:\n  - {{name: a, sensor: load1, above: 4, for: {text}, "
                        f"level: brief}}\n", PATH)
    assert rules.rules[0].for_s == seconds


def rules_with(second_rule: str) -> str:
    """A valid first rule (lines 2-6) and then the given rule text starting at line 7."""
    return ("rules:\n"
            "  - name: ok\n"
            "    sensor: cpu_percent\n"
            "    above: 90\n"
            "    for: 10s\n"
            "    level: brief\n" + second_rule)


@pytest.mark.parametrize(("text", "message"), [
    # YAML syntax: the line of the problem
    ("rules:\n  - name: a\n    sensor: [cpu\n    for: 1s\n",
     f"{PATH}:4: (file): invalid YAML: expected ',' or ']', but got ':'"),
    ("rules:\n  - name: a\n\tsensor: x\n",
     f"{PATH}:3: (file): invalid YAML: found character '\\t' that cannot start any token"),
    # top level
    ("", f"{PATH}:1: rules: is required (write `rules: []` for no shedding)"),
    ("{}\n", f"{PATH}:1: rules: is required (write `rules: []` for no shedding)"),
    ("- a\n", f"{PATH}:1: (top level): must be a mapping with `rules`, got a list"),
    ("rules: []\nshedding: on\n", f"{PATH}:2: shedding: unknown key (the file holds only `rules`)"),
    ("rules: []\nrules: []\n", f"{PATH}:2: rules: duplicate key (first at line 1)"),
    ("rules: 5\n", f"{PATH}:1: rules: must be a list of rules, got a scalar"),
    ("rules:\n  cpu: 1\n", f"{PATH}:2: rules: must be a list of rules, got a mapping"),
    ("rules:\n  - cpu-hot\n", f"{PATH}:2: rules[0]: must be a mapping, got a scalar"),
    # keys
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: 1s\n"
                "    lvl: brief\n"),
     f"{PATH}:11: rules[1].lvl: unknown key (known: name, sensor, above, below, recover_below, "
     "recover_above, for, recover_for, level)"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    above: 80\n"),
     f"{PATH}:10: rules[1].above: duplicate key (first at line 9)"),
    (rules_with("  - sensor: cpu_percent\n    above: 90\n    for: 1s\n    level: brief\n"),
     f"{PATH}:7: rules[1].name: is required"),
    (rules_with("  - name: b\n    above: 90\n    for: 1s\n    level: brief\n"),
     f"{PATH}:7: rules[1].sensor: is required"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    for: 1s\n    level: brief\n"),
     f"{PATH}:7: rules[1].above: is required (or `below`)"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    level: brief\n"),
     f"{PATH}:7: rules[1].for: is required"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: 1s\n"),
     f"{PATH}:7: rules[1].level: is required"),
    # values
    (rules_with("  - name: ok\n    sensor: load1\n    above: 9\n    for: 1s\n    level: brief\n"),
     f"{PATH}:7: rules[1].name: duplicate rule name 'ok' (first at line 2)"),
    (rules_with("  - name: cpu hot\n"),
     f"{PATH}:7: rules[1].name: must be letters, digits, '-', '_' or '.', got 'cpu hot'"),
    (rules_with("  - name: 5\n"), f"{PATH}:7: rules[1].name: must be a string, got 5"),
    (rules_with("  - name: b\n    sensor: cpu\n"),
     f"{PATH}:8: rules[1].sensor: must be one of {', '.join(SENSORS)}, got 'cpu'"),
    (rules_with("  - name: b\n    sensor: [cpu_percent]\n"),
     f"{PATH}:8: rules[1].sensor: must be a single value, got a list"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    below: 10\n"),
     f"{PATH}:10: rules[1].below: give either `above` or `below`, not both"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: high\n"),
     f"{PATH}:9: rules[1].above: must be a number, got 'high'"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: .nan\n"),
     f"{PATH}:9: rules[1].above: must be a finite number, got nan"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: true\n"),
     f"{PATH}:9: rules[1].above: must be a number, got True"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    recover_below: 95\n"),
     f"{PATH}:10: rules[1].recover_below: must be at most the threshold (above: 90), got 95"),
    (rules_with("  - name: b\n    sensor: mem_available_mib\n    below: 400\n"
                "    recover_above: 300\n"),
     f"{PATH}:10: rules[1].recover_above: must be at least the threshold (below: 400), got 300"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    recover_above: 95\n"),
     f"{PATH}:10: rules[1].recover_above: does not go with `above`; use `recover_below`"),
    (rules_with("  - name: b\n    sensor: mem_available_mib\n    below: 400\n"
                "    recover_below: 700\n"),
     f"{PATH}:10: rules[1].recover_below: does not go with `below`; use `recover_above`"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: -5s\n"),
     f"{PATH}:10: rules[1].for: must not be negative, got '-5s'"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: -5\n"),
     f"{PATH}:10: rules[1].for: must not be negative, got -5"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: soon\n"),
     f"{PATH}:10: rules[1].for: must be a duration like 500ms, 10s, 2m or a number of seconds, "
     "got 'soon'"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: 1h\n"),
     f"{PATH}:10: rules[1].for: must be a duration like 500ms, 10s, 2m or a number of seconds, "
     "got '1h'"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: 1s\n"
                "    recover_for: -1ms\n"),
     f"{PATH}:11: rules[1].recover_for: must not be negative, got '-1ms'"),
    (rules_with("  - name: b\n    sensor: cpu_percent\n    above: 90\n    for: .inf\n"),
     f"{PATH}:10: rules[1].for: must be a finite duration, got inf"),
])
def test_parse_errors_name_file_line_key_and_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules(text, PATH)
    assert str(info.value) == message


def test_bad_level_message_reads_as_documented() -> None:
    text = rules_with("  - name: panic-button\n"   # line 7
                      "    sensor: llm_queue_depth\n"
                      "    above: 20\n"
                      "    for: 2s\n"
                      "    recover_below: 10\n"
                      "    level: panic\n")        # line 12
    with pytest.raises(ConfigError) as info:
        parse_rules(text, PATH)
    assert str(info.value) == ("/etc/pbx-agent/shedding.yaml:12: rules[1].level: must be one "
                               "of brief, canned, reject-new, got 'panic'")
    assert info.value.path == f"{PATH}:12"
    assert info.value.key == "rules[1].level"


def test_normal_is_not_a_rule_level() -> None:
    with pytest.raises(ConfigError, match=r":6: rules\[0\].level: must be one of brief, canned, "
                                          r"reject-new, got 'normal'"):
        parse_rules(rules_with("").replace("level: brief", "level: normal"), PATH)


def test_load_rules_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "shedding.yaml"
    path.write_text(GOOD, encoding="utf-8")
    rules = load_rules(str(path))
    assert [r.name for r in rules] == ["cpu-hot", "mem-low"]
    assert rules.rules[0].source == f"{path}:2"
    path.write_text(GOOD.replace("level: canned", "level: loud"), encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{path}:8: rules\\[0\\].level: "):
        load_rules(str(path))
    with pytest.raises(ConfigError, match=r"\(file\): cannot read: No such file"):
        load_rules(str(tmp_path / "missing.yaml"))


# ---------------------------------------------------------------------------------------------
# the embedded default

def test_embedded_default_parses_and_names_only_known_sensors() -> None:
    rules = default_rules()
    assert len(rules) >= 5
    assert {r.sensor for r in rules} <= set(SENSORS)
    assert {r.level for r in rules} == {"brief", "canned", "reject-new"}
    assert all(r.source.startswith("<embedded shedding.yaml>:") for r in rules)
    by_name = {r.name: r for r in rules}
    assert by_name["mem-low"].op == "<" and by_name["mem-low"].recover > 400


def test_contrib_copy_is_the_embedded_default() -> None:
    contrib = ROOT / "contrib" / "shedding.yaml"
    assert contrib.is_symlink()
    assert contrib.resolve() == (ROOT / "agent" / "data" / "shedding.yaml").resolve()
    assert contrib.read_text(encoding="utf-8") == default_rules_text()
    assert [r.name for r in load_rules(str(contrib))] == [r.name for r in default_rules()]


def test_default_rules_on_a_healthy_cpu_only_box_stay_normal_then_shed() -> None:
    clock = FakeClock()
    gov = ShedGovernor(default_rules(), clock=clock)
    healthy: dict[str, float | None] = {
        "cpu_percent": 60.0, "load1": 2.0, "mem_available_mib": 3000.0, "mem_used_percent": 60.0,
        "gpu_util_percent": None, "gpu_mem_percent": None, "latency_p95_ms": 800.0,
        "llm_queue_wait_ms": 50.0, "llm_queue_depth": 0.0}
    assert set(feed(gov, clock, [(t, healthy) for t in range(0, 120)])) == {"normal"}
    low_mem = {**healthy, "mem_available_mib": 150.0}
    levels = feed(gov, clock, [(t, low_mem) for t in range(120, 130)])
    assert "reject-new" in levels and levels[0] == "normal"
    assert gov.state.reason == "shed:mem-low"


# ---------------------------------------------------------------------------------------------
# the monitor thread

def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_monitor_moves_the_level_with_the_readings() -> None:
    gov = ShedGovernor(ShedRules((rule(threshold=90, recover=50, for_s=0, level="canned"),),
                                 "t"))
    value = {"cpu_percent": 10.0}
    calls = []

    def read() -> Mapping[str, float | None]:
        calls.append(1)
        return dict(value)

    monitor = ShedMonitor(gov, read, interval_s=0.01)
    monitor.start()
    try:
        assert wait_for(lambda: len(calls) >= 2)
        assert gov.level == "normal"
        value["cpu_percent"] = 99.0
        assert wait_for(lambda: gov.level == "canned")
        assert monitor.last_readings == {"cpu_percent": 99.0}
        value["cpu_percent"] = 20.0
        assert wait_for(lambda: gov.level == "normal")
    finally:
        monitor.stop()
    assert not monitor.running
    count = len(calls)
    time.sleep(0.05)
    assert len(calls) == count


def test_monitor_survives_a_failing_read(caplog: pytest.LogCaptureFixture) -> None:
    gov = ShedGovernor(ShedRules((rule(threshold=90, for_s=0),), "t"))
    calls = []

    def read() -> Mapping[str, float | None]:
        calls.append(1)
        if len(calls) <= 3:
            raise OSError("sensor gone")
        return {"cpu_percent": 99.0}

    monitor = ShedMonitor(gov, read, interval_s=0.01)
    with caplog.at_level(logging.DEBUG, logger="agent.capacity.shedding"):
        monitor.start()
        try:
            assert wait_for(lambda: gov.level == "brief")
        finally:
            monitor.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # the first of the run, with its traceback; the rest at DEBUG
    assert errors[0].exc_info is not None and "sensor gone" in str(errors[0].exc_info[1])
    assert any("sensors read again after 3 failure(s)" in r.getMessage() for r in caplog.records)


def test_monitor_failed_read_restarts_pending_waits() -> None:
    clock = FakeClock()
    gov = ShedGovernor(ShedRules((rule(for_s=10),), "t"), clock=clock)
    script: list[Mapping[str, float | None] | None] = [
        {"cpu_percent": 95.0}, None, {"cpu_percent": 95.0}, {"cpu_percent": 95.0}]

    def read() -> Mapping[str, float | None]:
        step = script.pop(0)
        if step is None:
            raise RuntimeError("boom")
        return step

    monitor = ShedMonitor(gov, read, interval_s=1.0)
    levels = []
    for t in (0, 5, 6, 15.9):
        clock.set(t)
        levels.append(monitor.poll().level)
    assert levels == ["normal"] * 4  # without the failed read at 5 it would trip at 10
    clock.set(16)
    script.append({"cpu_percent": 95.0})
    assert monitor.poll().level == "brief"


def test_monitor_refuses_a_zero_interval_and_start_twice_is_harmless() -> None:
    gov = ShedGovernor(ShedRules((), "t"))
    with pytest.raises(ValueError):
        ShedMonitor(gov, dict, interval_s=0)
    monitor = ShedMonitor(gov, dict, interval_s=0.01)
    monitor.start()
    monitor.start()
    assert monitor.running
    monitor.stop()
    assert not monitor.running
    assert not any(t.name == "shed-monitor" for t in threading.enumerate())


# ---------------------------------------------------------------------------------------------
# architecture

def test_capacity_is_a_leaf_package() -> None:
    allowed = {"agent.errors", "agent.config"}
    for path in sorted((ROOT / "agent" / "capacity").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        upper = {n for n in names if n.startswith("agent.") and not n.startswith("agent.capacity")
                 and n not in allowed}
        assert not upper, f"{path} imports {upper}"
        assert not {n for n in names if n.split(".")[0] in {"asyncio", "gevent"}}, path
