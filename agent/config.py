"""Configuration: `/etc/pbx-agent/agent.yaml` parsed into frozen dataclasses.

Every validation error is a :class:`~agent.errors.ConfigError` naming the file, the dotted key
and the reason. Units are part of the field names (``_ms``, ``_s``, ``_hz``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.confbase import Endpoint
from agent.confbase import Section as _Section
from agent.confbase import load_yaml as _load_yaml
from agent.errors import ConfigError
from agent.flowconf import FlowConfig, parse_flows
from agent.integrations.breaker import BreakerPolicy
from agent.integrations.spec import (
    METHODS,
    IntegrationSpec,
    SecretHeader,
    SecretRef,
    SideWorkConfig,
)

DEFAULT_CONFIG_PATH = "/etc/pbx-agent/agent.yaml"
EMBEDDED_DEFAULT = "<embedded default.yaml>"
CONFIG_ENV_VAR = "PBX_AGENT_CONFIG"
PBX_KINDS = ("asterisk", "freeswitch")
STT_BACKENDS = ("auto", "whisper", "vosk")
INTENT_KINDS = ("transfer", "goodbye", "say")
TOP_LEVEL_KEYS = ("pbx", "rate_hz", "max_calls", "state_dir", "log_level", "listen", "models",
                  "turn", "llm", "transfers", "fallback_transfer", "agent", "hours", "capacity",
                  "kpi", "naive", "integrations", "sidework")
#: plain header names that carry credentials: they must come from `secret_headers`
_SECRET_HEADER_HINTS = ("authorization", "cookie", "token", "secret", "api-key", "apikey",
                        "password", "x-auth")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PRIORITY_WHEN = ("always", "business-hours", "after-hours")
DEFAULT_PBX_CONF = {"asterisk": "/etc/asterisk/asterisk.conf",
                    "freeswitch": "/etc/freeswitch/autoload_configs/switch.conf.xml"}


@dataclass(frozen=True)
class ListenConfig:
    """Where the PBX-facing listeners bind (loopback unless configured otherwise)."""

    fastagi: Endpoint = Endpoint("127.0.0.1", 4573)
    audiosocket: Endpoint = Endpoint("127.0.0.1", 9092)
    #: Address Asterisk is told to connect to in `EXEC AudioSocket`; defaults to `audiosocket`.
    audiosocket_advertise: Endpoint | None = None
    esl: Endpoint = Endpoint("127.0.0.1", 8084)


@dataclass(frozen=True)
class ModelsConfig:
    """Which model files to load; empty paths mean the embedded PyPI defaults."""

    stt_backend: str = "auto"
    whisper_model: str = ""
    vosk_model: str = ""
    llm_model: str = ""
    tts_voice: str = ""
    llm_threads: int = 2
    stt_threads: int = 2
    llm_context_tokens: int = 2048


@dataclass(frozen=True)
class TurnConfig:
    """Endpointing and barge-in, all measured in audio time (frames), not wall time."""

    endpoint_silence_ms: int = 360
    #: start a one-shot STT decode after this much silence, before the endpoint (0 = off)
    speculative_stt_ms: int = 200
    min_speech_ms: int = 120
    barge_in_ms: int = 160
    max_utterance_ms: int = 15000
    no_input_timeout_ms: int = 9000
    max_no_input_prompts: int = 2
    max_call_s: int = 900
    vad_aggressiveness: int = 2


@dataclass(frozen=True)
class LlmConfig:
    """Generation settings for the open-question path."""

    max_tokens: int = 40
    temperature: float = 0.2
    timeout_ms: int = 6000
    #: earlier exchanges put in the prompt; each costs prefill time on every open question
    history_turns: int = 0
    #: max_tokens while load shedding is at level `brief` (one short sentence)
    brief_max_tokens: int = 16


@dataclass(frozen=True)
class FaqEntry:
    """One knowledge-base entry: ways callers ask it, and the exact answer."""

    id: str
    questions: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class IntentConfig:
    """An intent recognised from keywords without the LLM."""

    name: str
    kind: str
    phrases: tuple[str, ...]
    target: str | None = None
    reply: str | None = None


@dataclass(frozen=True)
class AgentConfig:
    """The conversation: persona, fixed phrases, knowledge base and intents."""

    name: str
    persona: str
    greeting: str
    goodbye: str
    fallback: str
    transfer_reply: str
    no_input_reply: str
    error_reply: str
    faq: tuple[FaqEntry, ...]
    intents: tuple[IntentConfig, ...]
    flows: tuple[FlowConfig, ...] = ()

    def flow(self, name: str) -> FlowConfig | None:
        """The flow with this name, if declared."""
        return next((f for f in self.flows if f.name == name), None)

    def fixed_phrases(self) -> tuple[str, ...]:
        """Every phrase whose text is known before the call: synthesized once at start-up."""
        phrases = [self.greeting, self.goodbye, self.fallback, self.transfer_reply,
                   self.no_input_reply, self.error_reply]
        phrases += [e.answer for e in self.faq]
        phrases += [i.reply for i in self.intents if i.reply]
        for flow in self.flows:
            phrases += flow.fixed_phrases()
        return tuple(dict.fromkeys(p for p in phrases if p))


@dataclass(frozen=True)
class HoursConfig:
    """Business hours in a timezone; outside them is after-hours. No windows = always open."""

    timezone: str = "UTC"
    #: (weekday 0=Mon, start minute, end minute) windows; end may be 1440 (midnight)
    windows: tuple[tuple[int, int, int], ...] = ()
    #: ISO dates (YYYY-MM-DD) that are closed all day
    closed_dates: tuple[str, ...] = ()

    def is_open(self, when: datetime) -> bool:
        """True when ``when`` (any timezone; naive = UTC) falls in business hours."""
        if not self.windows:
            return True
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        local = when.astimezone(ZoneInfo(self.timezone))
        if local.date().isoformat() in self.closed_dates:
            return False
        minute = local.hour * 60 + local.minute
        return any(day == local.weekday() and start <= minute < end
                   for day, start, end in self.windows)


@dataclass(frozen=True)
class PriorityClass:
    """Callers admitted into the priority headroom: caller-ID and/or DID patterns, and when.

    A pattern starting with ``_`` is an Asterisk extension pattern (``X`` ``Z`` ``N`` ``[1-5]``
    ``.`` ``!``), one starting with ``^`` a regular expression; anything else must match exactly.
    """

    name: str
    callerid: tuple[str, ...] = ()
    did: tuple[str, ...] = ()
    when: str = "always"


@dataclass(frozen=True)
class PbxConnection:
    """A management connection to the PBX (AMI or inbound ESL) for live limits."""

    host: str
    port: int
    username: str
    secret: SecretRef


@dataclass(frozen=True)
class CapacityConfig:
    """How many calls to take: limits, priority headroom, load shedding and drain."""

    #: calls the engines can serve well; 0 = the last `pbx-agent capacity` report, else no limit
    engine_calls: int = 0
    #: that report; "" = <state_dir>/capacity/latest.json
    capacity_report: str = ""
    #: slots only priority callers may take (0 when no priority class is defined)
    priority_headroom: int = 1
    priority: tuple[PriorityClass, ...] = ()
    #: shedding rules file; "" = the embedded defaults (contrib/shedding.yaml)
    shedding: str = ""
    drain_timeout_s: int = 60
    #: asterisk.conf or switch.conf.xml; "" = the standard path for the PBX kind; "none" = skip
    pbx_conf: str = ""
    #: FreeSWITCH vars.xml for $${var}; "" = vars.xml two levels above switch.conf.xml
    pbx_vars: str = ""
    #: AMI (Asterisk) or inbound ESL (FreeSWITCH) for live limits; None = config file only
    live: PbxConnection | None = None
    live_poll_s: float = 10.0
    sensor_interval_s: float = 1.0

    def pbx_conf_path(self, pbx: str) -> str | None:
        """The PBX config file to read limits from, or None when turned off."""
        if self.pbx_conf == "none":
            return None
        return self.pbx_conf or DEFAULT_PBX_CONF[pbx]

    def report_path(self, state_dir: str) -> str:
        """Where the last measured capacity report is read from."""
        return self.capacity_report or str(Path(state_dir) / "capacity" / "latest.json")


MASK_MODES = ("full", "last4", "hash", "none")


@dataclass(frozen=True)
class KpiConfig:
    """Call records, the Prometheus endpoint and the post-call rating."""

    #: SQLite call records: "" = <state_dir>/calls.sqlite; "off" = none
    records: str = ""
    #: how caller IDs are stored: full, last4 (default), hash (unsalted sha256), none
    mask_caller: str = "last4"
    #: Prometheus text endpoint (host:port); None = off
    metrics: Endpoint | None = Endpoint("127.0.0.1", 9464)
    #: ask "rate this call 1-5 on your keypad" after a call the agent ended (goodbye)
    satisfaction: bool = False
    #: how long the caller has to press the rating key
    satisfaction_timeout_ms: int = 5000

    def records_path(self, state_dir: str) -> str | None:
        """The SQLite file of the call records, or None when turned off."""
        if self.records == "off":
            return None
        return self.records or str(Path(state_dir) / "calls.sqlite")


@dataclass(frozen=True)
class Config:
    """The whole agent configuration."""

    path: str
    pbx: str
    max_calls: int
    rate_hz: int
    listen: ListenConfig
    models: ModelsConfig
    turn: TurnConfig
    llm: LlmConfig
    transfers: Mapping[str, str]
    agent: AgentConfig
    state_dir: str = "/var/lib/pbx-agent"
    log_level: str = "INFO"
    hours: HoursConfig = HoursConfig()
    capacity: CapacityConfig = CapacityConfig()
    #: the `transfers` name a call goes to when the agent hands it to a human on its own
    #: (DTMF 0, engine failure, max call length, drain timeout); "" = front-desk or the first
    fallback_transfer: str = ""
    kpi: KpiConfig = KpiConfig()
    #: the naive baseline for capacity comparisons: LLM calls serialized behind one lock in the
    #: caller's thread (not cancellable), no phrase cache, every frame fed to STT (no VAD gating)
    naive: bool = False
    #: HTTP webhooks the flows call (name → spec)
    integrations: Mapping[str, IntegrationSpec] = field(default_factory=dict)
    sidework: SideWorkConfig = SideWorkConfig()

    def fallback_target(self) -> str:
        """The dial string of the human fallback (from the allowlist), or "" if none."""
        name = self.fallback_transfer or ("front-desk" if "front-desk" in self.transfers
                                          else next(iter(self.transfers), ""))
        return self.transfers.get(name, "")
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def audiosocket_advertise(self) -> Endpoint:
        """The AudioSocket address given to Asterisk."""
        return self.listen.audiosocket_advertise or self.listen.audiosocket


def default_agent_text() -> str:
    """The embedded default agent definition (a dental clinic receptionist)."""
    return resources.files("agent.data").joinpath("agent_dental.yaml").read_text(encoding="utf-8")


def parse_agent(path: str, prefix: str, data: Any, transfers: Collection[str] | None = None,
                integrations: Collection[str] | None = None) -> AgentConfig:
    """Parse and validate an agent definition mapping.

    ``transfers`` (the allowlist names) and ``integrations`` (declared webhook names) are what
    intents and flows may refer to; None skips that check (the caller checks them).
    """
    sec = _Section(path, prefix, data)
    faq: list[FaqEntry] = []
    raw_faq = sec.raw("faq", [])
    if not isinstance(raw_faq, list):
        raise sec.error("faq", "must be a list of entries")
    seen: set[str] = set()
    for i, item in enumerate(raw_faq):
        entry = _Section(path, sec.key(f"faq[{i}]"), item)
        entry_id = entry.text("id")
        if entry_id in seen:
            raise entry.error("id", f"duplicate FAQ id {entry_id!r}")
        seen.add(entry_id)
        faq.append(FaqEntry(entry_id, entry.strings("questions"), entry.text("answer")))
        entry.check_unknown()
    intents: list[IntentConfig] = []
    raw_intents = sec.raw("intents", [])
    if not isinstance(raw_intents, list):
        raise sec.error("intents", "must be a list of intents")
    for i, item in enumerate(raw_intents):
        it = _Section(path, sec.key(f"intents[{i}]"), item)
        kind = it.get_str("kind", choices=INTENT_KINDS)
        target = it.raw("target")
        reply = it.raw("reply")
        if kind == "transfer" and not target:
            raise it.error("target", "a transfer intent needs a target from `transfers`")
        if kind == "say" and not reply:
            raise it.error("reply", "a say intent needs a reply")
        intents.append(IntentConfig(
            name=it.text("name"), kind=kind, phrases=it.strings("phrases"),
            target=str(target) if target else None, reply=str(reply).strip() if reply else None,
        ))
        it.check_unknown()
    agent = AgentConfig(
        name=sec.text("name"),
        persona=sec.text("persona"),
        greeting=sec.text("greeting"),
        goodbye=sec.text("goodbye"),
        fallback=sec.text("fallback"),
        transfer_reply=sec.text("transfer_reply"),
        no_input_reply=sec.text("no_input_reply", "Are you still there?"),
        error_reply=sec.text(
            "error_reply", "I'm sorry, I'm having trouble. Let me connect you to someone."),
        faq=tuple(faq),
        intents=tuple(intents),
        flows=parse_flows(sec, transfers if transfers is not None else _AnyName(),
                          integrations if integrations is not None else _AnyName()),
    )
    sec.check_unknown()
    names = {i.name for i in agent.intents}
    for flow in agent.flows:
        if flow.name in names:
            raise ConfigError(path, f"{prefix}.flows", f"flow {flow.name!r} has the name of an "
                              "intent; give it another", flow.line)
    return agent


class _AnyName(frozenset[str]):
    """An allowlist stand-in that accepts every name (when the caller checks them itself)."""

    def __contains__(self, item: object) -> bool:
        return True


_HHMM = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")


def _minute(sec: _Section, key: str, text: str) -> int:
    m = _HHMM.match(text.strip())
    if not m or (int(m.group(1)) == 24 and m.group(2) != "00"):
        raise sec.error(key, f"times must be HH:MM (00:00-24:00), got {text!r}")
    return int(m.group(1)) * 60 + int(m.group(2))


def _days(sec: _Section, key: str) -> list[int]:
    days: list[int] = []
    for part in key.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            raise sec.error(key, f"days must be mon..sun, a range like mon-fri or a list, "
                                 f"got {part!r}")
        a = WEEKDAYS.index(first)
        b = WEEKDAYS.index(last) if last else a
        days += [d % 7 for d in range(a, b + 1 if b >= a else b + 8)]
    return days


def parse_hours(sec: _Section) -> HoursConfig:
    """``hours: {timezone, open: {mon-fri: "08:00-18:00", ...}, closed: [dates]}``."""
    tz = sec.get_str("timezone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise sec.error("timezone", f"unknown timezone {tz!r} (use an IANA name such as "
                                    "Europe/Berlin)") from None
    opening = sec.sub("open")
    windows: list[tuple[int, int, int]] = []
    for key, value in opening.data.items():
        opening.used.add(str(key))
        days = _days(opening, str(key))
        spans = value if isinstance(value, list) else [value]
        for span in spans:
            start_s, dash, end_s = str(span).partition("-")
            if not dash:
                raise opening.error(str(key), f"must be HH:MM-HH:MM, got {span!r}")
            start = _minute(opening, str(key), start_s)
            end = _minute(opening, str(key), end_s)
            if start == end:
                raise opening.error(str(key), f"empty window {span!r}")
            for day in days:
                if end > start:
                    windows.append((day, start, end))
                else:  # overnight: 22:00-06:00 runs into the next day
                    windows.append((day, start, 1440))
                    windows.append(((day + 1) % 7, 0, end))
    closed = sec.strings("closed", required=False)
    for date in closed:
        try:
            datetime.strptime(date, "%Y-%m-%d")
        except ValueError:
            raise sec.error("closed", f"dates must be YYYY-MM-DD, got {date!r}") from None
    sec.check_unknown()
    return HoursConfig(timezone=tz, windows=tuple(windows), closed_dates=closed)


def _secret_ref(sec: _Section, name: str) -> SecretRef:
    ref = SecretRef(env=sec.get_str(f"{name}_env", ""), file=sec.get_str(f"{name}_file", ""))
    if name in sec.data:
        raise sec.error(name, f"secrets are never written in the config: use {name}_env "
                              f"(an environment variable) or {name}_file (a root-only file)")
    return ref


def parse_capacity(sec: _Section, pbx: str) -> CapacityConfig:
    """The ``capacity:`` section (see contrib/agent.yaml)."""
    d = CapacityConfig()
    classes: list[PriorityClass] = []
    raw = sec.raw("priority", [])
    if not isinstance(raw, list):
        raise sec.error("priority", "must be a list of priority classes")
    for i, item in enumerate(raw):
        pc = _Section(sec.path, sec.key(f"priority[{i}]"), item)
        cls = PriorityClass(name=pc.text("name"), callerid=pc.strings("callerid", required=False),
                            did=pc.strings("did", required=False),
                            when=pc.get_str("when", "always", choices=PRIORITY_WHEN))
        if not cls.callerid and not cls.did:
            raise pc.error("callerid", "a priority class needs callerid or did patterns")
        for key, patterns in (("callerid", cls.callerid), ("did", cls.did)):
            for pattern in patterns:
                if pattern.startswith("^"):
                    try:
                        re.compile(pattern)
                    except re.error as exc:
                        raise pc.error(key, f"bad regular expression {pattern!r}: {exc}") from None
        pc.check_unknown()
        classes.append(cls)
    live: PbxConnection | None = None
    raw_live = sec.raw("live")
    if raw_live is not None:
        lv = _Section(sec.path, sec.key("live"), raw_live)
        default_port = 5038 if pbx == "asterisk" else 8021
        ep = lv.endpoint("address", Endpoint("127.0.0.1", default_port))
        assert ep is not None
        live = PbxConnection(host=ep.host, port=ep.port,
                             username=lv.get_str("username", "" if pbx == "freeswitch" else None),
                             secret=_secret_ref(lv, "secret"))
        lv.check_unknown()
    cap = CapacityConfig(
        engine_calls=sec.get_int("engine_calls", d.engine_calls, 0, 10000),
        capacity_report=sec.get_str("capacity_report", ""),
        priority_headroom=sec.get_int("priority_headroom", d.priority_headroom, 0, 10000),
        priority=tuple(classes),
        shedding=sec.get_str("shedding", ""),
        drain_timeout_s=sec.get_int("drain_timeout_s", d.drain_timeout_s, 0, 3600),
        pbx_conf=sec.get_str("pbx_conf", ""),
        pbx_vars=sec.get_str("pbx_vars", ""),
        live=live,
        live_poll_s=sec.get_float("live_poll_s", d.live_poll_s, 1.0, 3600.0),
        sensor_interval_s=sec.get_float("sensor_interval_s", d.sensor_interval_s, 0.1, 60.0),
    )
    sec.check_unknown()
    return cap


def parse_config(text: str, path: str = "<string>") -> Config:
    """Parse and validate the YAML text of a config file."""
    data = _load_yaml(path, text)
    top = _Section(path, "", data)
    for name in top.data:
        if name not in TOP_LEVEL_KEYS:
            raise top.error(str(name), "unknown key")
    pbx = top.get_str("pbx", "asterisk", choices=PBX_KINDS)
    rate = top.get_int("rate_hz", 8000, 8000, 16000)
    if rate not in (8000, 16000):
        raise top.error("rate_hz", f"must be 8000 or 16000, got {rate}")

    lis = top.sub("listen")
    listen = ListenConfig(
        fastagi=lis.endpoint("fastagi", ListenConfig.fastagi) or ListenConfig.fastagi,
        audiosocket=lis.endpoint("audiosocket", ListenConfig.audiosocket)
        or ListenConfig.audiosocket,
        audiosocket_advertise=lis.endpoint("audiosocket_advertise", None),
        esl=lis.endpoint("esl", ListenConfig.esl) or ListenConfig.esl,
    )
    lis.check_unknown()

    mod = top.sub("models")
    d = ModelsConfig()
    models = ModelsConfig(
        stt_backend=mod.get_str("stt_backend", d.stt_backend, choices=STT_BACKENDS),
        whisper_model=mod.get_str("whisper_model", ""),
        vosk_model=mod.get_str("vosk_model", ""),
        llm_model=mod.get_str("llm_model", ""),
        tts_voice=mod.get_str("tts_voice", ""),
        llm_threads=mod.get_int("llm_threads", d.llm_threads, 1, 64),
        stt_threads=mod.get_int("stt_threads", d.stt_threads, 1, 64),
        llm_context_tokens=mod.get_int("llm_context_tokens", d.llm_context_tokens, 512, 32768),
    )
    mod.check_unknown()

    tu = top.sub("turn")
    t = TurnConfig()
    turn = TurnConfig(
        endpoint_silence_ms=tu.get_int("endpoint_silence_ms", t.endpoint_silence_ms, 100, 3000),
        speculative_stt_ms=tu.get_int("speculative_stt_ms", t.speculative_stt_ms, 0, 3000),
        min_speech_ms=tu.get_int("min_speech_ms", t.min_speech_ms, 20, 2000),
        barge_in_ms=tu.get_int("barge_in_ms", t.barge_in_ms, 40, 280),
        max_utterance_ms=tu.get_int("max_utterance_ms", t.max_utterance_ms, 1000, 60000),
        no_input_timeout_ms=tu.get_int("no_input_timeout_ms", t.no_input_timeout_ms, 1000, 120000),
        max_no_input_prompts=tu.get_int("max_no_input_prompts", t.max_no_input_prompts, 0, 10),
        max_call_s=tu.get_int("max_call_s", t.max_call_s, 10, 86400),
        vad_aggressiveness=tu.get_int("vad_aggressiveness", t.vad_aggressiveness, 0, 3),
    )
    tu.check_unknown()

    ll = top.sub("llm")
    lc = LlmConfig()
    llm = LlmConfig(
        max_tokens=ll.get_int("max_tokens", lc.max_tokens, 4, 512),
        temperature=ll.get_float("temperature", lc.temperature, 0.0, 2.0),
        timeout_ms=ll.get_int("timeout_ms", lc.timeout_ms, 500, 120000),
        history_turns=ll.get_int("history_turns", lc.history_turns, 0, 2),
        brief_max_tokens=ll.get_int("brief_max_tokens", lc.brief_max_tokens, 4, 512),
    )
    ll.check_unknown()

    raw_transfers = top.raw("transfers", {})
    if not isinstance(raw_transfers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (str, int)) and str(v).strip()
        for k, v in raw_transfers.items()
    ):
        raise top.error("transfers", "must map target names to dial strings")
    transfers = {k: str(v).strip() for k, v in raw_transfers.items()}

    integrations = parse_integrations(top.sub("integrations"))
    raw_agent = top.raw("agent")
    if raw_agent is None and path != EMBEDDED_DEFAULT:
        # the embedded agent's flows call the embedded default's webhooks unless overridden
        embedded = _load_yaml(EMBEDDED_DEFAULT, default_config_text())
        defaults = parse_integrations(_Section(EMBEDDED_DEFAULT, "integrations",
                                               embedded.get("integrations")))
        integrations = {**defaults, **integrations}
    flow_names = (transfers, tuple(integrations))
    if raw_agent is None:
        agent = parse_agent("<embedded agent_dental.yaml>", "agent",
                            _load_yaml("<embedded agent_dental.yaml>",
                                       default_agent_text()).get("agent"), *flow_names)
    elif isinstance(raw_agent, str):
        agent_path = Path(raw_agent)
        if not agent_path.is_absolute():
            agent_path = Path(path).parent / agent_path
        try:
            agent_text = agent_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise top.error("agent",
                            f"cannot read agent file {agent_path}: {exc.strerror}") from None
        agent_data = _load_yaml(str(agent_path), agent_text)
        if isinstance(agent_data, Mapping) and "agent" in agent_data:
            agent_data = agent_data["agent"]
        agent = parse_agent(str(agent_path), "agent", agent_data, *flow_names)
    else:
        agent = parse_agent(path, "agent", raw_agent, *flow_names)
    for i, intent in enumerate(agent.intents):
        if intent.target is not None and intent.target not in transfers:
            raise ConfigError(path, f"agent.intents[{i}].target",
                              f"{intent.target!r} is not in the `transfers` allowlist")

    fallback = top.get_str("fallback_transfer", "")
    if fallback and fallback not in transfers:
        raise top.error("fallback_transfer", f"{fallback!r} is not in the `transfers` allowlist")
    config = Config(
        path=path,
        pbx=pbx,
        max_calls=top.get_int("max_calls", 4, 1, 10000),
        rate_hz=rate,
        listen=listen,
        models=models,
        turn=turn,
        llm=llm,
        transfers=transfers,
        agent=agent,
        state_dir=top.get_str("state_dir", "/var/lib/pbx-agent"),
        log_level=top.get_str("log_level", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        fallback_transfer=top.get_str("fallback_transfer", ""),
        hours=parse_hours(top.sub("hours")),
        capacity=parse_capacity(top.sub("capacity"), pbx),
        kpi=parse_kpi(top.sub("kpi")),
        naive=top.get_bool("naive", False),
        integrations=integrations,
        sidework=parse_sidework(top.sub("sidework"), integrations),
    )
    top.check_unknown()
    return config


def parse_integrations(sec: _Section) -> dict[str, IntegrationSpec]:
    """The `integrations` section: name → HTTP webhook (see contrib/agent.yaml)."""
    specs: dict[str, IntegrationSpec] = {}
    for name in sec.data:
        it = sec.sub(str(name))
        url = it.text("url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise it.error("url", f"must be an http:// or https:// URL, got {url!r}")
        if parts.username or parts.password:
            raise it.error("url", "credentials are never written in the config: use "
                                  "secret_headers (from the environment or a root-only file)")
        method = it.get_str("method", "POST").upper()
        if method not in METHODS:
            raise it.error("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
        hs = it.sub("headers")
        headers: list[tuple[str, str]] = []
        for header in hs.data:
            value = hs.get_str(str(header))
            if any(hint in str(header).lower() for hint in _SECRET_HEADER_HINTS):
                raise hs.error(str(header), "looks like a credential: declare it under "
                                            "secret_headers with env: or file:")
            headers.append((str(header), value))
        ss = it.sub("secret_headers")
        secrets: list[tuple[str, SecretHeader]] = []
        for header in ss.data:
            ref = ss.sub(str(header))
            secret = SecretHeader(env=ref.get_str("env", ""), file=ref.get_str("file", ""),
                                  prefix=ref.get_str("prefix", ""))
            if not secret.env and not secret.file:
                raise ref.error("env", "a secret header needs env: (a variable) or file: "
                                       "(a root-only file)")
            if "value" in ref.data:
                raise ref.error("value", "secrets are never written in the config: use env: "
                                         "or file:")
            ref.check_unknown()
            secrets.append((str(header), secret))
        bp = it.sub("breaker")
        d = BreakerPolicy()
        breaker = BreakerPolicy(
            failures=bp.get_int("failures", d.failures, 1, 1000),
            window_s=bp.get_float("window_s", d.window_s, 1.0, 86400.0),
            slow_ms=bp.get_float("slow_ms", d.slow_ms, 0.0, 600000.0),
            cooldown_s=bp.get_float("cooldown_s", d.cooldown_s, 0.1, 86400.0),
            half_open_calls=bp.get_int("half_open_calls", d.half_open_calls, 1, 100),
        )
        bp.check_unknown()
        idempotent_raw = it.raw("idempotent")
        idempotent = None if idempotent_raw is None else it.get_bool("idempotent", False)
        ds = IntegrationSpec(name="", url="")
        specs[str(name)] = IntegrationSpec(
            name=str(name), url=url, method=method, headers=tuple(headers),
            secret_headers=tuple(secrets),
            timeout_ms=it.get_int("timeout_ms", ds.timeout_ms, 50, 60000),
            retries=it.get_int("retries", ds.retries, 0, 10),
            backoff_ms=it.get_int("backoff_ms", ds.backoff_ms, 0, 60000),
            idempotent=idempotent, breaker=breaker)
        it.check_unknown()
    return specs


def parse_sidework(sec: _Section, integrations: Mapping[str, IntegrationSpec]) -> SideWorkConfig:
    """The `sidework` section: the background queue for work off the call path."""
    d = SideWorkConfig()
    post_call = sec.strings("post_call", required=False)
    for name in post_call:
        if name not in integrations:
            raise sec.error("post_call", f"unknown integration {name!r} (declared: "
                                         f"{', '.join(integrations) or 'none'})")
    cfg = SideWorkConfig(
        max_jobs=sec.get_int("max_jobs", d.max_jobs, 1, 1_000_000),
        max_attempts=sec.get_int("max_attempts", d.max_attempts, 1, 100),
        backoff_s=sec.get_float("backoff_s", d.backoff_s, 0.0, 3600.0),
        max_backoff_s=sec.get_float("max_backoff_s", d.max_backoff_s, 0.0, 86400.0),
        timeout_ms=sec.get_int("timeout_ms", d.timeout_ms, 50, 120000),
        path=sec.get_str("path", ""),
        post_call=post_call,
    )
    sec.check_unknown()
    return cfg


def parse_kpi(sec: _Section) -> KpiConfig:
    """The `kpi` section: records, caller masking, metrics endpoint, satisfaction prompt."""
    d = KpiConfig()
    metrics_raw = sec.raw("metrics", "127.0.0.1:9464")
    metrics: Endpoint | None
    if metrics_raw in (None, False, "", "off"):
        metrics = None
    else:
        metrics = sec.endpoint("metrics", d.metrics)
    records = "off" if sec.raw("records", "") is False else sec.get_str("records", "")
    kpi = KpiConfig(
        records=records,
        mask_caller=sec.get_str("mask_caller", d.mask_caller, choices=MASK_MODES),
        metrics=metrics,
        satisfaction=sec.get_bool("satisfaction", d.satisfaction),
        satisfaction_timeout_ms=sec.get_int("satisfaction_timeout_ms",
                                            d.satisfaction_timeout_ms, 1000, 30000),
    )
    sec.check_unknown()
    return kpi


def default_config_text() -> str:
    """The embedded default config used by `pbx-agent demo` and tests."""
    return resources.files("agent.data").joinpath("default.yaml").read_text(encoding="utf-8")


def default_config() -> Config:
    """The embedded default config (dental clinic agent, loopback listeners)."""
    return parse_config(default_config_text(), EMBEDDED_DEFAULT)


def resolve_config_path(flag: str | None) -> str:
    """Config path from the --config flag, else $PBX_AGENT_CONFIG, else the system default."""
    return flag or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def load_config(path: str) -> Config:
    """Read and validate a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot read: {exc.strerror}") from None
    return parse_config(text, path)
