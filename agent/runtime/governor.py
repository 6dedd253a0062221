"""The capacity governor of one agent process: limits, admission, load shedding, reload, status.

Runtime-neutral (plain threads and locks): the asyncio (Asterisk) and the gevent (FreeSWITCH)
process both build one :class:`Governor` and ask it before answering each call. The PBX config
parsers live under ``agent.pbx``; this module joins them to the leaf ``agent.capacity`` package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from agent.capacity.admission import (
    AdmissionController,
    Capacity,
    CapacityTerm,
    PbxGuard,
    PriorityMatcher,
    Refusal,
    Ticket,
    effective_capacity,
    engine_capacity_from_report,
)
from agent.capacity.limits import LiveLimits, PbxLimits
from agent.capacity.sensors import LatencyWindow, SensorReader
from agent.capacity.shedding import (
    ShedGovernor,
    ShedMonitor,
    ShedRules,
    default_rules,
    load_rules,
)
from agent.config import Config
from agent.errors import ConfigError

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticLimits:
    """What the PBX config file said: the limits, or why there are none."""

    limits: PbxLimits | None
    problem: str = ""
    path: str | None = None


def read_static_limits(config: Config) -> StaticLimits:
    """Parse the PBX's own config (asterisk.conf / switch.conf.xml) for its call limits."""
    path = config.capacity.pbx_conf_path(config.pbx)
    if path is None:
        return StaticLimits(None, "pbx_conf: none (not read)")
    if not os.path.exists(path):
        return StaticLimits(None, f"{path}: not found (set capacity.pbx_conf)", path)
    try:
        if config.pbx == "asterisk":
            from agent.pbx.asterisk.conf import parse_asterisk_conf

            return StaticLimits(parse_asterisk_conf(path), "", path)
        from agent.pbx.freeswitch.conf import parse_switch_conf

        vars_path = config.capacity.pbx_vars or None
        if vars_path is None:
            guess = os.path.join(os.path.dirname(os.path.dirname(path)), "vars.xml")
            vars_path = guess if os.path.exists(guess) else None
        return StaticLimits(parse_switch_conf(path, vars_path), "", path)
    except ConfigError as exc:
        return StaticLimits(None, str(exc), path)
    except OSError as exc:
        return StaticLimits(None, f"{path}: cannot read: {exc.strerror}", path)


def load_shed_rules(config: Config) -> ShedRules:
    """The configured shedding rules file, or the embedded defaults; ConfigError when bad."""
    if config.capacity.shedding:
        return load_rules(config.capacity.shedding)
    return default_rules()


class Governor:
    """Admission, shedding and limits for one process; start() before calls, stop() after."""

    def __init__(self, config: Config, live: Callable[[], LiveLimits | None] = lambda: None,
                 llm_depth: Callable[[], int] | None = None) -> None:
        self.config = config
        self.live = live
        self.static = read_static_limits(config)
        if self.static.problem:
            _LOGGER.warning("PBX limits: %s", self.static.problem)
        self.latency = LatencyWindow(60.0)
        # short: in `canned` no LLM request starts, so old waits must age out for recovery
        self.llm_wait = LatencyWindow(30.0)
        self.rules = load_shed_rules(config)
        self.shed = ShedGovernor(self.rules)
        self.sensors = SensorReader(latency=self.latency, llm_wait=self.llm_wait,
                                    llm_depth=llm_depth)
        self.monitor = ShedMonitor(self.shed, self.sensors.read,
                                   config.capacity.sensor_interval_s)
        self.guard = PbxGuard(self.static.limits, live)
        self.engine_term = self._engine_term()
        cap = config.capacity
        matcher = PriorityMatcher(cap.priority, config.hours) if cap.priority else None
        self.admission = AdmissionController(self.capacity, cap.priority_headroom, matcher,
                                             shed=self._shed_level, guard=self.guard.check)

    def _engine_term(self) -> CapacityTerm:
        cap = self.config.capacity
        if cap.engine_calls:
            return CapacityTerm("engine", cap.engine_calls,
                                f"{self.config.path}: capacity.engine_calls")
        return engine_capacity_from_report(cap.report_path(self.config.state_dir))

    def _shed_level(self) -> tuple[str, str]:
        state = self.shed.state
        return state.level, state.rule

    def terms(self) -> list[CapacityTerm]:
        """Every term of the effective capacity, with its source."""
        return [self.guard.pbx_max_calls(),
                CapacityTerm("config", self.config.max_calls, f"{self.config.path}: max_calls"),
                self.engine_term]

    def capacity(self) -> Capacity:
        """Effective capacity now = min(PBX limit, max_calls, engine capacity)."""
        return effective_capacity(self.terms())

    @property
    def level(self) -> str:
        """The shedding level now (normal, brief, canned, reject-new)."""
        return self.shed.state.level

    def admit(self, callerid: str, did: str) -> Ticket | Refusal:
        """Reserve a slot before answering, or say why not."""
        return self.admission.admit(callerid, did)

    def start(self) -> None:
        """Read the sensors once, then start the sensor thread."""
        self.monitor.poll()
        self.monitor.start()

    def stop(self) -> None:
        """Stop the sensor thread."""
        self.monitor.stop()

    def start_drain(self) -> None:
        """Refuse every new call from now on (AGENT_REASON=draining)."""
        self.admission.start_drain()

    def reload(self) -> bool:
        """SIGHUP: re-read the shedding rules and the capacity report; a bad rule file is refused
        and the rules in force stay (True when the new rules were taken)."""
        self.engine_term = self._engine_term()
        try:
            rules = load_shed_rules(self.config)
        except ConfigError as exc:
            _LOGGER.error("reload refused, keeping %d rules in force: %s",
                          len(self.rules.rules), exc)
            return False
        self.rules = rules
        self.shed.replace_rules(rules)
        _LOGGER.info("reloaded: %d shedding rules from %s; engine capacity %s (%s)",
                     len(rules.rules), rules.path, self.engine_term.value, self.engine_term.source)
        return True

    def status_line(self) -> str:
        """One line for systemd's STATUS= and the logs."""
        cap = self.capacity()
        adm = self.admission
        drain = ", draining" if adm.draining else ""
        state = self.shed.state
        shed = state.level if not state.rule else f"{state.level} ({state.rule})"
        return (f"{adm.active} active + {adm.reserved} starting of {cap.value} "
                f"(bound by {cap.binding}); shedding {shed}{drain}")
