"""Load-shedding rules: sensor thresholds with hold times and hysteresis that set a shed level.

Levels, mildest first (:data:`LEVELS`): ``normal``; ``brief`` (shorter LLM replies); ``canned``
(no LLM: FAQ answers, cached phrases and transfers only); ``reject-new`` (non-priority new
calls are refused). Active calls are never dropped. The level is the highest level among the
rules that are tripped now; on a tie the rule first in the file names it.

The rules file (``/etc/pbx-agent/shedding.yaml``; the embedded default is
``agent/data/shedding.yaml``, also at ``contrib/shedding.yaml``)::

    rules:
      - name: cpu-hot            # letters, digits, '-', '_', '.'; unique; reason "shed:cpu-hot"
        sensor: cpu_percent      # one of agent.capacity.sensors.SENSORS
        above: 90                # trips while the reading is > 90; or `below:` (trips while <)
        for: 10s                 # ... continuously for 10 s; 500ms, 10s, 2m or bare seconds
        recover_below: 75        # clears while < 75 (with `above`; `recover_above` with
                                 # `below`); default: the threshold itself
        recover_for: 20s         # ... continuously for 20 s; default: `for`
        level: canned            # brief, canned or reject-new

``rules: []`` turns shedding off. Every error is a :class:`~agent.errors.ConfigError` reading
``<file>:<line>: rules[<i>].<key>: <reason>``.

Readings and hold times (:class:`ShedGovernor`): a rule's trip timer starts at the first reading
past the threshold and the rule trips once readings have stayed past it for ``for``; any reading
that is not past it restarts the wait. Recovery works the same way against the recovery
threshold and ``recover_for``; readings between the two thresholds keep the rule as it is. A
missing reading (None, NaN or an absent sensor) restarts the pending trip or recovery wait,
since the condition was not seen to hold throughout, but keeps a tripped rule tripped: an
unreadable sensor neither sheds load nor ends shedding.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from agent.capacity.sensors import SENSORS
from agent.errors import ConfigError

_LOGGER = logging.getLogger(__name__)

#: The shed levels, mildest first.
LEVELS: tuple[str, ...] = ("normal", "brief", "canned", "reject-new")
#: The levels a rule may set.
RULE_LEVELS: tuple[str, ...] = LEVELS[1:]
RULE_KEYS = ("name", "sensor", "above", "below", "recover_below", "recover_above", "for",
             "recover_for", "level")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DURATION_RE = re.compile(r"\s*(-?)(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


@dataclass(frozen=True)
class ShedRule:
    """One rule: when ``sensor`` stays past ``threshold`` for ``for_s`` seconds, shed to ``level``.

    ``op`` ``">"`` trips while the reading is above ``threshold`` and recovers while it is below
    ``recover``; ``"<"`` trips while below and recovers while above. ``source`` is ``file:line``.
    """

    name: str
    sensor: str
    op: str
    threshold: float
    recover: float
    for_s: float
    recover_for_s: float
    level: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.op not in (">", "<"):
            raise ValueError(f"rule {self.name}: op must be '>' or '<', got {self.op!r}")
        if self.level not in RULE_LEVELS:
            raise ValueError(f"rule {self.name}: level must be one of {', '.join(RULE_LEVELS)}")
        if self.for_s < 0 or self.recover_for_s < 0:
            raise ValueError(f"rule {self.name}: hold times must not be negative")
        if (self.recover > self.threshold) if self.op == ">" else (self.recover < self.threshold):
            raise ValueError(f"rule {self.name}: recovery threshold {self.recover:g} is on the "
                             f"wrong side of {self.threshold:g}")

    def trips_at(self, value: float) -> bool:
        """True when ``value`` is past the threshold (the trip condition holds)."""
        return value > self.threshold if self.op == ">" else value < self.threshold

    def recovers_at(self, value: float) -> bool:
        """True when ``value`` is past the recovery threshold (the recovery condition holds)."""
        return value < self.recover if self.op == ">" else value > self.recover

    def describe_trip(self) -> str:
        """The trip condition in words, e.g. ``cpu_percent > 90 for 10s``."""
        return f"{self.sensor} {self.op} {self.threshold:g} for {self.for_s:g}s"

    def describe_recovery(self) -> str:
        """The recovery condition in words, e.g. ``cpu_percent < 75 for 20s``."""
        op = "<" if self.op == ">" else ">"
        return f"{self.sensor} {op} {self.recover:g} for {self.recover_for_s:g}s"


@dataclass(frozen=True)
class ShedRules:
    """The rules of one file, in file order."""

    rules: tuple[ShedRule, ...]
    path: str

    def __iter__(self) -> Iterator[ShedRule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


# ---------------------------------------------------------------------------------------------
# parsing

def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "list"
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    return "scalar"


class _Rule:
    """One rule's mapping node: typed, located access to its values."""

    def __init__(self, path: str, index: int, node: yaml.MappingNode) -> None:
        self.path = path
        self.index = index
        self.node = node
        self.keys: dict[str, yaml.Node] = {}
        self.values: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = _scalar(path, f"rules[{index}]", key_node)
            if not isinstance(key, str):
                raise self.error(key_node, repr(key), "keys must be strings")
            if key not in RULE_KEYS:
                raise self.error(key_node, key,
                                 f"unknown key (known: {', '.join(RULE_KEYS)})")
            if key in self.keys:
                raise self.error(key_node, key,
                                 f"duplicate key (first at line {_line(self.keys[key])})")
            self.keys[key] = key_node
            self.values[key] = value_node

    def error(self, node: yaml.Node, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}:{_line(node)}", f"rules[{self.index}].{key}", reason)

    def missing(self, key: str, reason: str = "is required") -> ConfigError:
        return self.error(self.node, key, reason)

    def value(self, key: str) -> tuple[Any, yaml.Node]:
        node = self.values[key]
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, key, f"must be a single value, got a {_node_kind(node)}")
        return _scalar(self.path, f"rules[{self.index}].{key}", node), node

    def string(self, key: str) -> tuple[str, yaml.Node]:
        if key not in self.values:
            raise self.missing(key)
        value, node = self.value(key)
        if not isinstance(value, str):
            raise self.error(node, key, f"must be a string, got {value!r}")
        return value, node

    def number(self, key: str) -> float:
        value, node = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(node, key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.error(node, key, f"must be a finite number, got {value!r}")
        return float(value)

    def duration(self, key: str) -> float:
        value, node = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self.error(node, key, f"must be a duration like 500ms, 10s, 2m or a number "
                                        f"of seconds, got {value!r}")
        if isinstance(value, str):
            match = _DURATION_RE.fullmatch(value)
            if match is None:
                raise self.error(node, key, f"must be a duration like 500ms, 10s, 2m or a "
                                            f"number of seconds, got {value!r}")
            sign, number, unit = match.groups()
            seconds = float(number) * _UNIT_S[unit]
            if sign:
                raise self.error(node, key, f"must not be negative, got {value!r}")
        else:
            seconds = float(value)
            if not math.isfinite(seconds):
                raise self.error(node, key, f"must be a finite duration, got {value!r}")
            if seconds < 0:
                raise self.error(node, key, f"must not be negative, got {value!r}")
        return seconds


def _scalar(path: str, key: str, node: yaml.Node) -> Any:
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{_line(node)}", key, f"invalid value: {reason}") from None


def _compose(text: str, path: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(where, "(file)", f"invalid YAML: {reason}") from None


def _parse_rule(path: str, index: int, node: yaml.Node,
                seen: dict[str, int]) -> ShedRule:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{_line(node)}", f"rules[{index}]",
                          f"must be a mapping, got a {_node_kind(node)}")
    rule = _Rule(path, index, node)

    name, name_node = rule.string("name")
    if not _NAME_RE.fullmatch(name):
        raise rule.error(name_node, "name",
                         f"must be letters, digits, '-', '_' or '.', got {name!r}")
    if name in seen:
        raise rule.error(name_node, "name",
                         f"duplicate rule name {name!r} (first at line {seen[name]})")
    seen[name] = _line(name_node)

    sensor, sensor_node = rule.string("sensor")
    if sensor not in SENSORS:
        raise rule.error(sensor_node, "sensor",
                         f"must be one of {', '.join(SENSORS)}, got {sensor!r}")

    has_above, has_below = "above" in rule.values, "below" in rule.values
    if has_above and has_below:
        later = max(("above", "below"), key=lambda k: _line(rule.keys[k]))
        raise rule.error(rule.keys[later], later, "give either `above` or `below`, not both")
    if not (has_above or has_below):
        raise rule.missing("above", "is required (or `below`)")
    op, where = (">", "above") if has_above else ("<", "below")
    threshold = rule.number(where)

    right, wrong = ("recover_below", "recover_above") if op == ">" else \
        ("recover_above", "recover_below")
    if wrong in rule.values:
        raise rule.error(rule.keys[wrong], wrong,
                         f"does not go with `{where}`; use `{right}`")
    recover = threshold
    if right in rule.values:
        recover = rule.number(right)
        if op == ">" and recover > threshold:
            raise rule.error(rule.values[right], right,
                             f"must be at most the threshold (above: {threshold:g}), "
                             f"got {recover:g}")
        if op == "<" and recover < threshold:
            raise rule.error(rule.values[right], right,
                             f"must be at least the threshold (below: {threshold:g}), "
                             f"got {recover:g}")

    if "for" not in rule.values:
        raise rule.missing("for")
    for_s = rule.duration("for")
    recover_for_s = rule.duration("recover_for") if "recover_for" in rule.values else for_s

    level, level_node = rule.string("level")
    if level not in RULE_LEVELS:
        raise rule.error(level_node, "level",
                         f"must be one of {', '.join(RULE_LEVELS)}, got {level!r}")

    return ShedRule(name=name, sensor=sensor, op=op, threshold=threshold, recover=recover,
                    for_s=for_s, recover_for_s=recover_for_s, level=level,
                    source=f"{path}:{_line(node)}")


def parse_rules(text: str, path: str) -> ShedRules:
    """Parse and validate a shedding rules file's text; ``path`` is used in error messages."""
    root = _compose(text, path)
    if root is None:
        raise ConfigError(f"{path}:1", "rules", "is required (write `rules: []` for no shedding)")
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{_line(root)}", "(top level)",
                          f"must be a mapping with `rules`, got a {_node_kind(root)}")
    rules_node: yaml.Node | None = None
    for key_node, value_node in root.value:
        key = _scalar(path, "(top level)", key_node)
        if key != "rules":
            raise ConfigError(f"{path}:{_line(key_node)}", str(key),
                              "unknown key (the file holds only `rules`)")
        if rules_node is not None:
            raise ConfigError(f"{path}:{_line(key_node)}", "rules",
                              f"duplicate key (first at line {_line(rules_node)})")
        rules_node = value_node
    if rules_node is None:
        raise ConfigError(f"{path}:{_line(root)}", "rules",
                          "is required (write `rules: []` for no shedding)")
    if not isinstance(rules_node, yaml.SequenceNode):
        raise ConfigError(f"{path}:{_line(rules_node)}", "rules",
                          f"must be a list of rules, got a {_node_kind(rules_node)}")
    seen: dict[str, int] = {}
    rules = tuple(_parse_rule(path, i, node, seen) for i, node in enumerate(rules_node.value))
    return ShedRules(rules=rules, path=path)


def load_rules(path: str) -> ShedRules:
    """Read and validate a shedding rules file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot read: {exc.strerror}") from None
    return parse_rules(text, path)


def default_rules_text() -> str:
    """The embedded default rules file (``agent/data/shedding.yaml``)."""
    return resources.files("agent.data").joinpath("shedding.yaml").read_text(encoding="utf-8")


def default_rules() -> ShedRules:
    """The embedded default rules, for a small CPU-only box (see agent/data/shedding.yaml)."""
    return parse_rules(default_rules_text(), "<embedded shedding.yaml>")


# ---------------------------------------------------------------------------------------------
# evaluation

@dataclass(frozen=True)
class ShedState:
    """The shed level now, the rule that sets it, every tripped rule, and when the level changed."""

    level: str = "normal"
    #: the rule that sets the level; "" when normal
    rule: str = ""
    #: names of all tripped rules, in file order
    active: tuple[str, ...] = ()
    #: clock time the level last changed
    since: float = 0.0

    @property
    def reason(self) -> str:
        """``shed:<rule>`` (for AGENT_REASON and logs), or "" when normal."""
        return f"shed:{self.rule}" if self.rule else ""


@dataclass
class _RuleState:
    tripped: bool = False
    #: when the condition toward the other state (trip, or recovery) started to hold
    pending_since: float | None = None
    #: the last reading seen (for log lines)
    value: float | None = None


def _reading(readings: Mapping[str, float | None], sensor: str) -> float | None:
    raw = readings.get(sensor)
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


class ShedGovernor:
    """Evaluates the rules against sensor readings and holds the shed level; thread-safe.

    One thread (the :class:`ShedMonitor`) calls :meth:`update`; call threads read
    :attr:`state` or :attr:`level`.
    """

    def __init__(self, rules: ShedRules, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        _check_unique(rules)
        self._rules = rules
        self._states: dict[str, _RuleState] = {r.name: _RuleState() for r in rules}
        self._state = ShedState(since=clock())

    @property
    def state(self) -> ShedState:
        """The current state (an immutable snapshot)."""
        with self._lock:
            return self._state

    @property
    def level(self) -> str:
        """The current shed level, one of :data:`LEVELS`."""
        return self.state.level

    @property
    def rules(self) -> ShedRules:
        """The rules in force."""
        with self._lock:
            return self._rules

    def update(self, readings: Mapping[str, float | None]) -> ShedState:
        """Evaluate every rule against one set of readings (sensor name to value); the new state."""
        events: list[tuple[ShedRule, bool, float]] = []
        with self._lock:
            now = self._clock()
            for rule in self._rules:
                st = self._states[rule.name]
                value = _reading(readings, rule.sensor)
                if value is None:
                    st.pending_since = None
                    continue
                st.value = value
                if st.tripped:
                    holding, hold_s = rule.recovers_at(value), rule.recover_for_s
                else:
                    holding, hold_s = rule.trips_at(value), rule.for_s
                if not holding:
                    st.pending_since = None
                    continue
                if st.pending_since is None:
                    st.pending_since = now
                if now - st.pending_since >= hold_s:
                    st.tripped = not st.tripped
                    st.pending_since = None
                    events.append((rule, st.tripped, value))
            old = self._state
            new = self._state = self._compute(now, old)
            rules = {r.name: r for r in self._rules}
        _log_changes(old, new, events, rules, reload=None)
        return new

    def replace_rules(self, rules: ShedRules) -> None:
        """Swap in reloaded rules (SIGHUP): same-named rules keep their state and timers."""
        _check_unique(rules)
        with self._lock:
            now = self._clock()
            kept = {name for name in self._states if any(r.name == name for r in rules)}
            self._states = {r.name: self._states.get(r.name) or _RuleState() for r in rules}
            self._rules = rules
            old = self._state
            new = self._state = self._compute(now, old)
            by_name = {r.name: r for r in rules}
        _LOGGER.info("shedding rules reloaded from %s: %d rule(s), %d kept their state",
                     rules.path, len(rules), len(kept))
        _log_changes(old, new, [], by_name, reload=rules.path)

    def _compute(self, now: float, old: ShedState) -> ShedState:
        top: ShedRule | None = None
        active: list[str] = []
        for rule in self._rules:
            if not self._states[rule.name].tripped:
                continue
            active.append(rule.name)
            if top is None or LEVELS.index(rule.level) > LEVELS.index(top.level):
                top = rule
        level = top.level if top is not None else "normal"
        since = old.since if level == old.level else now
        return ShedState(level=level, rule=top.name if top is not None else "",
                         active=tuple(active), since=since)


def _check_unique(rules: ShedRules) -> None:
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{rules.path}: duplicate rule names: {', '.join(dupes)}")


def _log_changes(old: ShedState, new: ShedState, events: list[tuple[ShedRule, bool, float]],
                 rules: Mapping[str, ShedRule], reload: str | None) -> None:
    by_name = {rule.name: (tripped, value) for rule, tripped, value in events}
    up = LEVELS.index(new.level) > LEVELS.index(old.level)
    cause = new.rule if up else old.rule
    changed = new.level != old.level
    for ev_rule, tripped, value in events:
        if changed and ev_rule.name == cause:
            continue  # told in the level change line below
        if tripped:
            _LOGGER.info("shedding rule %s tripped (%s=%g, %s; sets %s, level stays %s)",
                         ev_rule.name, ev_rule.sensor, value, ev_rule.describe_trip(),
                         ev_rule.level, new.level)
        else:
            _LOGGER.info("shedding rule %s recovered (%s=%g, %s; level stays %s)", ev_rule.name,
                         ev_rule.sensor, value, ev_rule.describe_recovery(), new.level)
    if not changed:
        return
    rule = rules.get(cause)
    event = by_name.get(cause)
    if up and rule is not None:
        detail = (f"{rule.sensor}={event[1]:g}, {rule.describe_trip()}" if event is not None
                  else f"{rule.describe_trip()}, tripped before the reload")
        _LOGGER.warning("load shedding %s -> %s: rule %s (%s)%s", old.level, new.level,
                        rule.name, detail, f"; rules reloaded from {reload}" if reload else "")
        return
    if event is not None and rule is not None:
        detail = f"recovered: {rule.sensor}={event[1]:g}, {rule.describe_recovery()}"
    elif reload is not None:
        detail = f"changed or removed by the reload of {reload}"
    else:
        detail = "cleared"
    still = f"; still tripped: {', '.join(new.active)}" if new.active else ""
    _LOGGER.info("load shedding %s -> %s: rule %s %s%s", old.level, new.level, cause or "-",
                 detail, still)


# ---------------------------------------------------------------------------------------------
# the monitor thread

class ShedMonitor:
    """A daemon thread that reads the sensors every ``interval_s`` and updates the governor.

    A failing ``read`` is logged (the first of a run of failures with its traceback) and counts
    as a reading with no sensors, so pending trip and recovery waits restart; the loop goes on.
    """

    def __init__(self, governor: ShedGovernor, read: Callable[[], Mapping[str, float | None]],
                 interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.governor = governor
        self.interval_s = interval_s
        self._read = read
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last: dict[str, float | None] = {}
        self._failures = 0

    @property
    def last_readings(self) -> dict[str, float | None]:
        """A copy of the readings of the last successful poll ({} before the first)."""
        with self._lock:
            return dict(self._last)

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (polling at once, then every ``interval_s``); no-op when running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                            name="shed-monitor", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout_s`` for it to end."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout_s)
        if thread.is_alive():
            _LOGGER.warning("shed monitor did not stop within %gs (a sensor read hangs?)",
                            timeout_s)

    def poll(self) -> ShedState:
        """Read the sensors once and update the governor (what the thread does every tick)."""
        try:
            readings = dict(self._read())
        except Exception:
            self._failures += 1
            if self._failures == 1:
                _LOGGER.exception("shed monitor: reading the sensors failed")
            else:
                _LOGGER.debug("shed monitor: reading the sensors failed (%d in a row)",
                              self._failures, exc_info=True)
            return self.governor.update({})
        if self._failures:
            _LOGGER.info("shed monitor: sensors read again after %d failure(s)", self._failures)
            self._failures = 0
        with self._lock:
            self._last = readings
        return self.governor.update(readings)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception:  # a bug in update(): keep watching, the level stays as it is
                _LOGGER.exception("shed monitor: updating the shed level failed")
            if stop.wait(self.interval_s):
                break
