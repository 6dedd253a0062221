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
        ("transfers: {}\n", "agent.intents[0].target", "is not in the `transfers` allowlist"),
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
    assert str(info.value).startswith(f"/etc/pbx-agent/agent.yaml: {key}: ")


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
