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
    assert f"{bad}:2: turn.barge_in_ms: must be between 40 and 280, got 900" in err


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


def test_capacity_rejects_bad_arguments_before_starting_anything(
        capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    assert main(["capacity", "--steps", "0,2", "--out", "/nonexistent"]) == 2
    assert "steps must be integers >= 1" in capsys.readouterr().err
    assert main(["capacity", "--steps", "1", "--mix", "faq"]) == 2
    assert "not name=weight" in capsys.readouterr().err
    assert main(["capacity", "--steps", "1", "--target", "nohost"]) == 2
    assert "target" in capsys.readouterr().err


def test_report_and_status_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import time

    from agent.kpi.metrics import AgentMetrics
    from agent.kpi.model import CallRecord, TurnKpi
    from agent.kpi.records import RecordStore

    db = tmp_path / "calls.sqlite"
    store = RecordStore(str(db))
    store.start()
    now = time.time()
    for i, (outcome, latency) in enumerate([("completed", 800.0), ("transferred", 1000.0),
                                            ("refused", None)]):
        store.submit(CallRecord(
            call_id=f"c{i}", pbx="asterisk", started_at=now - 600 + i * 60,
            answered_at=None if latency is None else now - 599 + i * 60,
            ended_at=now - 560 + i * 60, outcome=outcome,
            turns=[] if latency is None else [TurnKpi(0, "faq", response_ms=latency)]))
    store.close()
    assert main(["report", "--db", str(db), "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "completion rate" in out and "50.0 %" in out  # 1 completed of 2 answered
    assert main(["report", "--db", str(db), "--since", "1h", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data and "completion" in json.dumps(data)
    html = tmp_path / "r.html"
    assert main(["report", "--db", str(db), "--since", "1h", "--html", str(html)]) == 0
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert main(["report", "--db", str(tmp_path / "none.sqlite")]) == 1
    assert "no calls have been recorded" in capsys.readouterr().err
    assert main(["report", "--db", str(db), "--since", "yesterday"]) == 2

    metrics = AgentMetrics("asterisk")
    metrics.bind(active=lambda: 2, starting=lambda: 0, shed_level=lambda: "brief",
                 capacity_terms=lambda: {"effective": 4.0, "config": 4.0})
    metrics.admitted()
    port = metrics.start_server("127.0.0.1", 0)
    try:
        assert main(["status", "--url", f"http://127.0.0.1:{port}/metrics"]) == 0
        out = capsys.readouterr().out
        assert "2 active" in out and "brief" in out
    finally:
        metrics.stop_server()
    assert main(["status", "--url", f"http://127.0.0.1:{port}/metrics"]) == 1
    assert "not running" in capsys.readouterr().err


_FLOW_CFG = """state_dir: {state}
kpi: {{metrics: "off"}}
transfers: {{front-desk: "PJSIP/100", billing: "PJSIP/101", emergency: "PJSIP/199"}}
integrations:
  crm:
    url: {url}
    secret_headers:
      Authorization: {{file: {secret}, prefix: "Bearer "}}
agent:
  name: Shop
  persona: You sell bikes.
  greeting: Hello.
  goodbye: Bye.
  fallback: I don't know.
  transfer_reply: One moment.
  flows:
    - name: note
      phrases: [leave a note]
      steps:
        - ask: text
          type: text
          prompt: "What is it?"
        - call: crm
          background: true
          with: {{note: "{{text}}"}}
        - {step}
"""


def test_check_reports_a_bad_flow_step_with_its_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(_FLOW_CFG.format(state=tmp_path, url="http://127.0.0.1:9/x",
                                    secret=tmp_path / "s", step="transfer: sales"))
    assert main(["--config", str(cfg), "check"]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}:26: agent.flows[0].steps[2].transfer: 'sales' is not in the `transfers` " \
           "allowlist" in err


def test_check_refuses_a_secret_file_others_can_read_and_probes_webhooks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.sim.webhooks import WebhookServer

    secret = tmp_path / "crm.token"
    secret.write_text("s3cr3t-value\n")
    secret.chmod(0o644)
    cfg = tmp_path / "agent.yaml"
    with WebhookServer() as server:
        cfg.write_text(_FLOW_CFG.format(state=tmp_path, url=f"{server.url}/crm/notes",
                                        secret=secret, step="end: Thanks."))
        assert main(["--config", str(cfg), "check"]) == 1
        out, err = capsys.readouterr()
        assert "integration crm: POST http://127.0.0.1:" in out and ": reachable" in out
        assert "flows: 1 ok (note [intent, 3 steps])" in out
        assert f"{secret} is readable by group or others (chmod 600 it)" in err
        secret.chmod(0o600)
        main(["--config", str(cfg), "check"])
        out, err = capsys.readouterr()
        assert "crm.token" not in err
    assert "s3cr3t-value" not in out + err
