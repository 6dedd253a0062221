"""Admission control: whether to answer one more call, and why not when the answer is no.

Before answering, the runtime asks :class:`AdmissionController` for a slot. A refusal goes back
to the dialplan as ``AGENT_RESULT=BUSY`` with ``AGENT_REASON`` one of ``capacity``,
``pbx-limit``, ``shed:<rule>`` or ``draining``. The pieces it is built from are pure and
individually testable: caller/DID pattern matching (:func:`match_pattern`,
:class:`PriorityMatcher`), the effective capacity (:func:`effective_capacity`) and the PBX's
own refusal signals (:class:`PbxGuard`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

from agent.capacity.limits import LiveLimits, PbxLimits
from agent.config import HoursConfig, PriorityClass

_LOGGER = logging.getLogger(__name__)

#: ``Refusal.reason`` values besides ``shed:<rule>``.
REASON_CAPACITY = "capacity"
REASON_PBX_LIMIT = "pbx-limit"
REASON_DRAINING = "draining"
SHED_PREFIX = "shed:"
#: The shedding level at which ordinary (non-priority) callers are refused.
LEVEL_REJECT_NEW = "reject-new"
#: Keys of :meth:`AdmissionController.counts`, always all present.
COUNT_KEYS = ("admitted", "priority_admitted", "refused_capacity", "refused_pbx-limit",
              "refused_shed", "refused_draining")
HEADROOM_DETAIL = "slot kept for priority callers"


# --------------------------------------------------------------------------------------------
# Patterns

_DIGIT_CLASSES = {"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]"}


def _asterisk_regex(pattern: str) -> str:
    """Translate an Asterisk extension pattern (without its ``_``) into a regex body.

    ``-`` and spaces outside ``[...]`` are ignored, as Asterisk ignores them in patterns.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        upper = ch.upper()
        if upper in _DIGIT_CLASSES:
            out.append(_DIGIT_CLASSES[upper])
        elif ch == ".":
            out.append(".+")
        elif ch == "!":
            out.append(".*")
        elif ch in "- ":
            pass
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f"pattern {'_' + pattern!r}: '[' at {i + 1} is never closed")
            out.append(_char_set(pattern, pattern[i + 1:end]))
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _char_set(pattern: str, body: str) -> str:
    """``15-7`` -> a regex character class with every member escaped."""
    if not body:
        raise ValueError(f"pattern {'_' + pattern!r}: empty character set []")
    members: list[str] = []
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            lo, hi = body[i], body[i + 2]
            if lo > hi:
                raise ValueError(f"pattern {'_' + pattern!r}: range {lo}-{hi} is reversed")
            members.append(f"{re.escape(lo)}-{re.escape(hi)}")
            i += 3
        else:
            members.append(re.escape(body[i]))
            i += 1
    return "[" + "".join(members) + "]"


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    """The compiled form of ``pattern``; None for an exact-match pattern."""
    if pattern.startswith("_"):
        return re.compile(_asterisk_regex(pattern[1:]), re.IGNORECASE | re.DOTALL)
    if pattern.startswith("^"):
        return re.compile(pattern)
    return None


def match_pattern(pattern: str, value: str) -> bool:
    """True when ``value`` matches ``pattern``: ``_`` Asterisk pattern, ``^`` regex, else exact.

    An Asterisk pattern must match the whole value (``X`` 0-9, ``Z`` 1-9, ``N`` 2-9, ``[15-7]``,
    ``.`` one or more of anything, ``!`` zero or more, letters case-insensitive); a regex is
    used with :func:`re.search`. Raises ValueError (or :class:`re.error`) for a malformed pattern.
    """
    compiled = _compiled(pattern)
    if compiled is None:
        return value == pattern
    if pattern.startswith("_"):
        return compiled.fullmatch(value) is not None
    return compiled.search(value) is not None


def mask_callerid(callerid: str) -> str:
    """A caller ID fit for logs: only the last 4 characters are kept."""
    if not callerid:
        return "(none)"
    if len(callerid) <= 4:
        return callerid
    return "..." + callerid[-4:]


# --------------------------------------------------------------------------------------------
# Priority classes


class PriorityMatcher:
    """Finds the first priority class a call belongs to (caller ID, DID and time of day)."""

    def __init__(self, classes: Sequence[PriorityClass], hours: HoursConfig) -> None:
        self.classes: tuple[PriorityClass, ...] = tuple(classes)
        self.hours = hours
        for cls in self.classes:
            for pattern in cls.callerid + cls.did:
                _compiled(pattern)  # fail at start-up, not on the first call

    @property
    def has_classes(self) -> bool:
        """True when at least one priority class is defined (headroom applies only then)."""
        return bool(self.classes)

    def classify(self, callerid: str, did: str, now: datetime) -> str | None:
        """The name of the first class matching this call at ``now``, or None."""
        is_open: bool | None = None
        for cls in self.classes:
            if cls.callerid and not any(match_pattern(p, callerid) for p in cls.callerid):
                continue
            if cls.did and not any(match_pattern(p, did) for p in cls.did):
                continue
            if cls.when != "always":
                if is_open is None:
                    is_open = self.hours.is_open(now)
                if (cls.when == "business-hours") != is_open:
                    continue
            return cls.name
        return None


# --------------------------------------------------------------------------------------------
# Effective capacity

#: On a tie the first name here binds: a limit our own config cannot raise is the truer reason.
TIE_ORDER = ("pbx", "engine", "config")


@dataclass(frozen=True)
class CapacityTerm:
    """One upper bound on concurrent calls: ``pbx``, ``config`` or ``engine``; None = no limit."""

    name: str
    value: int | None
    source: str


@dataclass(frozen=True)
class Capacity:
    """The effective capacity, which term sets it (``binding``) and all the terms considered."""

    value: int
    binding: str
    terms: tuple[CapacityTerm, ...]

    def binding_source(self) -> str:
        """Where the binding limit came from (``file:line``, a report path, a connection)."""
        for term in self.terms:
            if term.name == self.binding and term.value == self.value:
                return term.source
        return "unknown"


def effective_capacity(terms: Sequence[CapacityTerm]) -> Capacity:
    """The smallest limit among ``terms``; ties bind in :data:`TIE_ORDER` (pbx, engine, config).

    Raises ValueError when no term has a value (the ``config`` term always has one).
    """
    limited = [t for t in terms if t.value is not None]
    if not limited:
        raise ValueError("no capacity term has a value (the config term must)")

    def rank(term: CapacityTerm) -> tuple[int, int]:
        order = TIE_ORDER.index(term.name) if term.name in TIE_ORDER else len(TIE_ORDER)
        assert term.value is not None
        return term.value, order

    best = min(limited, key=rank)
    assert best.value is not None
    return Capacity(best.value, best.name, tuple(terms))


def engine_capacity_from_report(path: str) -> CapacityTerm:
    """The ``engine`` term from a ``pbx-agent capacity`` JSON report; never raises.

    A missing file, an unreadable one or one without an integer ``safe_capacity`` gives no
    limit (value None; the source says why). A measured 0 is used as 1: a report alone never
    makes the agent refuse every call, and the source says so.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return CapacityTerm("engine", None, f"no capacity report ({path})")
    except (OSError, UnicodeDecodeError) as exc:
        return _bad_report(path, f"cannot read: {exc}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        return _bad_report(path, f"invalid JSON: {exc}")
    if not isinstance(data, dict):
        return _bad_report(path, "not a JSON object")
    safe = data.get("safe_capacity")
    if isinstance(safe, bool) or not isinstance(safe, int) or safe < 0:
        return _bad_report(path, f"safe_capacity must be a non-negative integer, got {safe!r}")
    finished = data.get("finished_at") or "at an unknown time"
    source = f"{path} (measured {finished})"
    if safe == 0:
        _LOGGER.warning("capacity report %s measured a safe capacity of 0; using 1", path)
        return CapacityTerm("engine", 1, f"{path} (measured {finished}: 0 calls, used as 1)")
    return CapacityTerm("engine", safe, source)


def _bad_report(path: str, why: str) -> CapacityTerm:
    _LOGGER.warning("ignoring capacity report %s: %s", path, why)
    return CapacityTerm("engine", None, f"capacity report {path} ignored: {why}")


# --------------------------------------------------------------------------------------------
# The PBX's own refusals


def _load1() -> float:
    return os.getloadavg()[0]


def _free_mib() -> float:
    # Asterisk's minmemfree compares sysinfo freeram + bufferram (in MB), not MemAvailable.
    import psutil

    vm = psutil.virtual_memory()
    return float(vm.free + getattr(vm, "buffers", 0)) / (1024 * 1024)


def _no_idle_cpu() -> float | None:
    return None


def _no_live() -> LiveLimits | None:
    return None


class PbxGuard:
    """Signals that the PBX itself would refuse a new call (its call, load, memory, CPU limits)."""

    def __init__(self, static: PbxLimits | None,
                 live: Callable[[], LiveLimits | None] = _no_live,
                 load1: Callable[[], float] = _load1,
                 mem_free_mib: Callable[[], float] = _free_mib,
                 idle_cpu_percent: Callable[[], float | None] = _no_idle_cpu) -> None:
        self.static = static
        self.live = live
        self.load1 = load1
        self.mem_free_mib = mem_free_mib
        self.idle_cpu_percent = idle_cpu_percent

    def _live(self) -> LiveLimits | None:
        try:
            return self.live()
        except Exception as exc:  # a failing sensor never refuses a call
            _LOGGER.debug("live PBX limits unavailable: %s", exc)
            return None

    def _static(self, name: str) -> tuple[float | None, str]:
        limit = self.static.get(name) if self.static is not None else None
        if limit is None or limit.value is None:
            return None, ""
        return limit.value, limit.source

    def check(self) -> str | None:
        """Why the PBX would refuse a new call now, or None; never raises."""
        live = self._live()
        for probe in (self._check_calls, self._check_load, self._check_memory,
                      self._check_idle_cpu):
            try:
                detail = probe(live)
            except Exception as exc:  # a failing sensor never refuses a call
                _LOGGER.debug("PBX guard %s failed: %s", probe.__name__, exc)
                continue
            if detail:
                return detail
        return None

    def _check_calls(self, live: LiveLimits | None) -> str | None:
        if live is None or live.current_calls is None:
            return None
        term = self._max_calls(live)
        # the PBX's count already includes the call being admitted (it reached us), so only a
        # count above the limit means the PBX is over it (e.g. `fsctl max_sessions` lowered live)
        if term.value is None or live.current_calls <= term.value:
            return None
        return f"PBX has {live.current_calls} calls > max {term.value} ({term.source})"

    def _check_load(self, live: LiveLimits | None) -> str | None:
        maxload, source = self._static("maxload")
        if live is not None and live.max_load is not None:
            maxload, source = live.max_load, live.source
        if maxload is None or maxload <= 0:
            return None
        load = float(self.load1())
        # Asterisk refuses when the 1-minute load average reaches maxload (>=, pbx.c).
        if load < maxload:
            return None
        return f"load average {load:.2f} >= maxload {maxload:g} ({source})"

    def _check_memory(self, live: LiveLimits | None) -> str | None:
        minfree, source = self._static("minmemfree")
        if minfree is None or minfree <= 0:
            return None
        free = float(self.mem_free_mib())
        if free >= minfree:
            return None
        return f"free memory {free:.0f} MiB < minmemfree {minfree:g} ({source})"

    def _check_idle_cpu(self, live: LiveLimits | None) -> str | None:
        minidle, source = self._static("min-idle-cpu")
        if live is not None and live.min_idle_cpu is not None:
            minidle, source = live.min_idle_cpu, live.source
        if minidle is None or minidle <= 0:
            return None
        idle = live.idle_cpu if live is not None and live.idle_cpu is not None else None
        if idle is None:
            idle = self.idle_cpu_percent()
        if idle is None or idle >= minidle:
            return None
        return f"idle CPU {idle:.1f}% < min-idle-cpu {minidle:g}% ({source})"

    def _max_calls(self, live: LiveLimits | None) -> CapacityTerm:
        if live is not None and live.max_calls is not None:
            return CapacityTerm("pbx", live.max_calls, live.source)
        if self.static is None:
            return CapacityTerm("pbx", None, "PBX limits not read")
        name = "maxcalls" if self.static.pbx == "asterisk" else "max-sessions"
        limit = self.static.get(name)
        source = limit.source if limit is not None else "default"
        return CapacityTerm("pbx", self.static.max_calls(), source)

    def pbx_max_calls(self) -> CapacityTerm:
        """The ``pbx`` term: the live max when the PBX reports one, else the config file's."""
        return self._max_calls(self._live())


# --------------------------------------------------------------------------------------------
# The controller


@dataclass(frozen=True)
class Refusal:
    """A refused call: ``reason`` goes to the dialplan as AGENT_REASON; ``detail`` to the log."""

    reason: str
    detail: str = ""

    @property
    def kind(self) -> str:
        """``reason`` with any ``shed:`` rule name dropped (``capacity``, ``shed``, ...)."""
        return "shed" if self.reason.startswith(SHED_PREFIX) else self.reason


class Ticket:
    """One admitted call's slot: reserved until :meth:`started`, freed by :meth:`release`."""

    def __init__(self, controller: AdmissionController, priority: str | None,
                 admitted_at: float) -> None:
        self._controller = controller
        self.priority = priority
        #: the controller clock's time of admission (monotonic seconds by default)
        self.admitted_at = admitted_at
        self.is_started = False
        self.is_released = False

    def started(self) -> None:
        """The call was answered: move the slot from reserved to active (idempotent)."""
        self._controller._start(self)

    def release(self) -> None:
        """Free the slot, started or not (idempotent)."""
        self._controller._release(self)

    def __repr__(self) -> str:
        state = "released" if self.is_released else "active" if self.is_started else "reserved"
        return f"Ticket(priority={self.priority!r}, {state})"


def _normal() -> tuple[str, str]:
    return "normal", ""


def _no_guard() -> str | None:
    return None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AdmissionController:
    """Hands out call slots under the effective capacity, priority headroom, shedding and drain.

    Thread-safe: the check-and-reserve happens under one lock, so callers from asyncio, gevent
    and plain threads can race for the last slot and exactly one wins. The injected callables
    are called outside the lock and must not block for long.

    Headroom: when at least one priority class exists, ordinary callers leave
    ``min(headroom, capacity - 1)`` slots free for priority callers, so a capacity of 1 or more
    always leaves ordinary callers at least one slot.
    """

    def __init__(self, capacity: Callable[[], Capacity], headroom: int,
                 matcher: PriorityMatcher | None = None,
                 shed: Callable[[], tuple[str, str]] = _normal,
                 guard: Callable[[], str | None] = _no_guard,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = _utc_now) -> None:
        if headroom < 0:
            raise ValueError(f"headroom must be >= 0, got {headroom}")
        self._capacity = capacity
        self.headroom = headroom
        self._matcher = matcher
        self._shed = shed
        self._guard = guard
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._reserved = 0
        self._active = 0
        self._peak = 0
        self._draining = False
        self._counts = dict.fromkeys(COUNT_KEYS, 0)

    # -- state

    @property
    def draining(self) -> bool:
        """True once :meth:`start_drain` was called: every new call is refused."""
        return self._draining

    @property
    def reserved(self) -> int:
        """Slots admitted but not yet started."""
        with self._lock:
            return self._reserved

    @property
    def active(self) -> int:
        """Slots whose call has started."""
        with self._lock:
            return self._active

    @property
    def in_use(self) -> int:
        """Reserved plus active slots."""
        with self._lock:
            return self._reserved + self._active

    @property
    def peak(self) -> int:
        """The highest :attr:`in_use` seen."""
        with self._lock:
            return self._peak

    def effective_headroom(self, capacity: int) -> int:
        """Slots kept for priority callers at ``capacity``: 0 without priority classes, and
        never the last ordinary slot (``min(headroom, capacity - 1)``)."""
        if self._matcher is None or not self._matcher.has_classes:
            return 0
        return max(0, min(self.headroom, capacity - 1))

    def start_drain(self) -> None:
        """Refuse every new call from now on; calls already admitted carry on."""
        with self._lock:
            self._draining = True
        _LOGGER.info("admission: draining, new calls are refused")

    def counts(self) -> dict[str, int]:
        """Totals under the stable keys of :data:`COUNT_KEYS` (``shed:*`` counts as ``shed``)."""
        with self._lock:
            return dict(self._counts)

    def snapshot(self) -> dict[str, int | str | bool]:
        """Current state for a status line."""
        cap = self._capacity()
        level, rule = self._shed()
        with self._lock:
            return {"capacity": cap.value, "binding": cap.binding,
                    "in_use": self._reserved + self._active, "reserved": self._reserved,
                    "active": self._active, "peak": self._peak, "level": level, "rule": rule,
                    "draining": self._draining}

    # -- admission

    def admit(self, callerid: str = "", did: str = "") -> Ticket | Refusal:
        """A :class:`Ticket` for this call, or a :class:`Refusal` saying why not."""
        if self._draining:
            return self._refuse(Refusal(REASON_DRAINING), callerid, did)
        priority = (self._matcher.classify(callerid, did, self._now())
                    if self._matcher is not None else None)
        level, rule = self._shed()
        if level == LEVEL_REJECT_NEW and priority is None:
            return self._refuse(Refusal(SHED_PREFIX + (rule or level), f"shedding level {level}"),
                                callerid, did)
        detail = self._guard()
        if detail:
            return self._refuse(Refusal(REASON_PBX_LIMIT, detail), callerid, did)
        cap = self._capacity()
        headroom = 0 if priority is not None else self.effective_headroom(cap.value)
        with self._lock:
            in_use = self._reserved + self._active
            refusal: Refusal | None = None
            if self._draining:
                refusal = Refusal(REASON_DRAINING)
            elif in_use >= cap.value:
                reason = REASON_PBX_LIMIT if cap.binding == "pbx" else REASON_CAPACITY
                refusal = Refusal(reason, f"{in_use} of {cap.value} calls in use "
                                          f"({cap.binding}: {cap.binding_source()})")
            elif in_use >= cap.value - headroom:
                refusal = Refusal(REASON_CAPACITY, HEADROOM_DETAIL)
            if refusal is None:
                # stamped under the lock: admitted_at follows the order of admission
                ticket = Ticket(self, priority, self._clock())
                self._reserved += 1
                self._peak = max(self._peak, self._reserved + self._active)
                self._counts["admitted"] += 1
                if priority is not None:
                    self._counts["priority_admitted"] += 1
                return ticket
        return self._refuse(refusal, callerid, did)

    def _refuse(self, refusal: Refusal, callerid: str, did: str) -> Refusal:
        key = f"refused_{refusal.kind}"
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        _LOGGER.info("admission refused caller %s did %s: %s%s", mask_callerid(callerid),
                     did or "(none)", refusal.reason,
                     f" ({refusal.detail})" if refusal.detail else "")
        return refusal

    def _start(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.is_started or ticket.is_released:
                return
            ticket.is_started = True
            self._reserved -= 1
            self._active += 1

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.is_released:
                return
            ticket.is_released = True
            if ticket.is_started:
                self._active -= 1
            else:
                self._reserved -= 1

