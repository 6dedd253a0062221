"""`pbx-agent check` and error reporting of the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_check_passes_on_the_contrib_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(ROOT / "contrib" / "agent.yaml"), "check", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "config" in out and "model smollm2-135m-instruct-q4_1: ok" in out


def test_check_fails_with_file_key_reason(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("turn:\n  barge_in_ms: 900\n")
    assert main(["--config", str(bad), "check"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: turn.barge_in_ms: must be between 40 and 280, got 900" in err


def test_check_fails_on_a_missing_model(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"models:\n  llm_model: {tmp_path}/missing.gguf\n"
                   "transfers: {front-desk: a, billing: b, emergency: c}\n")
    assert main(["--config", str(cfg), "check"]) == 1
    assert "missing.gguf does not exist" in capsys.readouterr().err


def test_check_requires_vosk_english_when_configured(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PBX_AGENT_MODELS_DIR", str(tmp_path))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("models:\n  stt_backend: vosk\n"
                   "transfers: {front-desk: a, billing: b, emergency: c}\n")
    assert main(["--config", str(cfg), "check"]) == 1
    assert "install with: pbx-agent models install vosk-small-en-us" in capsys.readouterr().out
