"""Config parsing: every error names the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import default_config, load_config, parse_config, resolve_config_path
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_parses() -> None:
    config = default_config()
    assert config.pbx == "asterisk"
    assert config.listen.fastagi.host == "127.0.0.1"
    assert config.listen.audiosocket.host == "127.0.0.1"
    assert config.agent.faq and config.agent.intents
    assert set(config.transfers) >= {"front-desk"}


def test_contrib_example_parses() -> None:
    config = load_config(str(ROOT / "contrib" / "agent.yaml"))
    assert config.turn.endpoint_silence_ms == 360
    assert config.transfers["front-desk"] == "PJSIP/100"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("pbx: sip\n", "pbx", "must be one of asterisk, freeswitch, got 'sip'"),
        ("rate_hz: 12000\n", "rate_hz", "must be 8000 or 16000, got 12000"),
        ("turn:\n  endpoint_silence_ms: 50\n", "turn.endpoint_silence_ms",
         "must be between 100 and 3000, got 50"),
        ("turn:\n  barge_in_ms: fast\n", "turn.barge_in_ms", "must be an integer, got str"),
        ("listen:\n  fastagi: nowhere\n", "listen.fastagi", "must be host:port"),
        ("bogus: 1\n", "bogus", "unknown key"),
        ("models:\n  stt_backend: sphinx\n", "models.stt_backend", "must be one of"),
        ("transfers: [a, b]\n", "transfers", "must map target names to dial strings"),
        ("agent: {name: x}\n", "agent.persona", "is required"),
        ("pbx: [\n", "line 2", "invalid YAML"),
    ],
)
def test_errors_name_file_key_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/pbx-agent/agent.yaml")
    assert info.value.path == "/etc/pbx-agent/agent.yaml"
    assert info.value.key == key
    assert reason in info.value.reason
    where = "/etc/pbx-agent/agent.yaml"
    if info.value.line is not None:
        where += f":{info.value.line}"
    assert str(info.value).startswith(f"{where}: {key}: ")


def test_an_empty_allowlist_is_refused_where_the_agent_uses_it() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("transfers: {}\n", "/etc/pbx-agent/agent.yaml")
    assert "is not in the `transfers` allowlist" in info.value.reason
    assert info.value.path == "<embedded agent_dental.yaml>" and info.value.line


def test_errors_point_at_the_line() -> None:
    text = "pbx: asterisk\nturn:\n  endpoint_silence_ms: 360\n  barge_in_ms: 5000\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "a.yaml")
    assert info.value.line == 4
    assert str(info.value).startswith("a.yaml:4: turn.barge_in_ms: must be between")


def test_agent_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(
        "agent:\n  name: Shop\n  persona: You sell bikes.\n  greeting: Hello.\n"
        "  goodbye: Bye.\n  fallback: I don't know.\n  transfer_reply: One moment.\n"
        "  faq:\n    - {id: hours, questions: [when are you open], answer: Nine to five.}\n"
        "  intents:\n    - {name: human, kind: transfer, target: desk, phrases: [a person]}\n")
    (tmp_path / "agent.yaml").write_text("agent: shop.yaml\ntransfers: {desk: PJSIP/1}\n")
    config = load_config(str(tmp_path / "agent.yaml"))
    assert config.agent.name == "Shop"
    assert config.agent.faq[0].answer == "Nine to five."
    assert "Nine to five." in config.agent.fixed_phrases()


def test_duplicate_faq_id_is_refused() -> None:
    text = ("transfers: {desk: x}\nagent:\n  name: a\n  persona: b\n  greeting: c\n  goodbye: d\n"
            "  fallback: e\n  transfer_reply: f\n  faq:\n"
            "    - {id: x, questions: [q], answer: a}\n    - {id: x, questions: [q], answer: b}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yaml")
    assert info.value.key == "agent.faq[1].id"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.yaml"))


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PBX_AGENT_CONFIG", raising=False)
    assert resolve_config_path(None) == "/etc/pbx-agent/agent.yaml"
    monkeypatch.setenv("PBX_AGENT_CONFIG", "/tmp/env.yaml")
    assert resolve_config_path(None) == "/tmp/env.yaml"
    assert resolve_config_path("/tmp/flag.yaml") == "/tmp/flag.yaml"


TRANSFERS = "transfers: {front-desk: PJSIP/100, billing: PJSIP/101, emergency: PJSIP/199}\n"


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("hours: {timezone: Mars/Olympus}", "hours.timezone", "unknown timezone"),
    ("hours: {open: {funday: '08:00-10:00'}}", "hours.open.funday", "days must be"),
    ("hours: {open: {mon: '8-10'}}", "hours.open.mon", "HH:MM"),
    ("hours: {open: {mon: '25:00-26:00'}}", "hours.open.mon", "HH:MM"),
    ("hours: {closed: ['26/12/2026']}", "hours.closed", "YYYY-MM-DD"),
    ("capacity: {priority: [{name: vip}]}", "capacity.priority[0].callerid", "needs callerid"),
    ("capacity: {priority: [{name: vip, did: ['^(']}]}", "capacity.priority[0].did",
     "bad regular expression"),
    ("capacity: {priority: [{name: vip, did: ['1'], when: lunch}]}",
     "capacity.priority[0].when", "must be one of"),
    ("capacity: {live: {username: u, secret: hunter2}}", "capacity.live.secret",
     "never written in the config"),
    ("capacity: {live: {address: nowhere}}", "capacity.live.address", "host:port"),
    ("capacity: {drain_timeout_s: -1}", "capacity.drain_timeout_s", "between"),
    ("capacity: {surge: 1}", "capacity.surge", "unknown key"),
    ("fallback_transfer: pizza", "fallback_transfer", "not in the `transfers` allowlist"),
])
def test_capacity_and_hours_errors(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(TRANSFERS + text, "/etc/pbx-agent/agent.yaml")
    assert info.value.key == key and reason in info.value.reason, str(info.value)
    assert "hunter2" not in str(info.value)


def test_business_hours_in_a_timezone_with_overnight_and_closed_days() -> None:
    from datetime import UTC, datetime

    cfg = parse_config(TRANSFERS + "hours:\n  timezone: Europe/Berlin\n  open:\n"
                       "    mon-fri: '08:00-18:00'\n    sat: ['22:00-02:00']\n"
                       "  closed: ['2026-12-24']\n")
    hours = cfg.hours
    # Thursday 2026-11-26: Berlin is UTC+1 in winter
    assert hours.is_open(datetime(2026, 11, 26, 7, 30, tzinfo=UTC))  # 08:30 local
    assert not hours.is_open(datetime(2026, 11, 26, 6, 30, tzinfo=UTC))  # 07:30 local
    assert not hours.is_open(datetime(2026, 11, 26, 17, 0, tzinfo=UTC))  # 18:00 local: closed
    # Saturday 23:00 and Sunday 01:00 local are open (overnight window), Sunday 03:00 is not
    assert hours.is_open(datetime(2026, 11, 28, 22, 0, tzinfo=UTC))
    assert hours.is_open(datetime(2026, 11, 29, 0, 0, tzinfo=UTC))
    assert not hours.is_open(datetime(2026, 11, 29, 2, 0, tzinfo=UTC))
    # a closed date, although Thursday
    assert not hours.is_open(datetime(2026, 12, 24, 10, 0, tzinfo=UTC))
    # no windows at all: always open
    assert parse_config(TRANSFERS).hours.is_open(datetime(2026, 12, 24, 3, 0, tzinfo=UTC))


def test_secret_is_read_at_use_from_env_or_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "ami.secret"
    secret_file.write_text("s3cret\n")
    cfg = parse_config(TRANSFERS + "capacity:\n  live:\n    username: pbx-agent\n"
                       f"    secret_env: TEST_PBX_SECRET\n    secret_file: {secret_file}\n")
    live = cfg.capacity.live
    assert live is not None and (live.host, live.port) == ("127.0.0.1", 5038)
    monkeypatch.delenv("TEST_PBX_SECRET", raising=False)
    assert live.secret.read() == "s3cret"
    monkeypatch.setenv("TEST_PBX_SECRET", "from-env")
    assert live.secret.read() == "from-env"
    assert "s3cret" not in repr(cfg) and "from-env" not in repr(cfg)
    fs = parse_config(TRANSFERS + "pbx: freeswitch\ncapacity: {live: {secret_env: X}}\n")
    assert fs.capacity.live is not None and fs.capacity.live.port == 8021


def test_fallback_target_defaults_to_front_desk() -> None:
    assert parse_config(TRANSFERS).fallback_target() == "PJSIP/100"
    cfg = parse_config(TRANSFERS + "fallback_transfer: billing\n")
    assert cfg.fallback_target() == "PJSIP/101"


T3 = "transfers: {front-desk: '1000', billing: '1001', emergency: '1999'}\n"


def test_kpi_defaults_and_switches() -> None:
    config = parse_config(T3, "a.yaml")
    assert config.kpi.metrics is not None and str(config.kpi.metrics) == "127.0.0.1:9464"
    assert config.kpi.records_path("/var/lib/pbx-agent") == "/var/lib/pbx-agent/calls.sqlite"
    assert config.kpi.mask_caller == "last4" and not config.kpi.satisfaction
    assert not config.naive
    off = parse_config(T3 + "kpi: {records: off, metrics: off, satisfaction: true}\n"
                       "naive: true\n", "a.yaml")
    assert off.kpi.records_path("/x") is None and off.kpi.metrics is None
    assert off.kpi.satisfaction and off.naive
    assert parse_config(T3 + "kpi: {records: /tmp/c.db}\n").kpi.records_path("/x") == "/tmp/c.db"


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("kpi: {mask_caller: partial}", "kpi.mask_caller", "must be one of full, last4, hash, none"),
    ("kpi: {metrics: 9464}", "kpi.metrics", "must be host:port"),
    ("kpi: {satisfaction: maybe}", "kpi.satisfaction", "must be true or false"),
    ("kpi: {recrods: x}", "kpi.recrods", "unknown key"),
    ("naive: 1", "naive", "must be true or false"),
])
def test_kpi_errors(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(T3 + text, "/etc/pbx-agent/agent.yaml")
    assert err.value.key == key and reason in err.value.reason
    assert str(err.value).startswith("/etc/pbx-agent/agent.yaml:")
