"""`pbx-agent limits` and `check` on the recorded PBX config samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
VARIANT1 = FIXTURES / "asterisk" / "config-samples" / "hand-written" / \
    "asterisk.conf.variant1-inline-comments"
FS_LAB = FIXTURES / "freeswitch" / "config-samples" / "lab" / "switch.conf.xml"
TRANSFERS = "transfers: {front-desk: PJSIP/100, billing: PJSIP/101, emergency: PJSIP/199}\n"


def _config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(body + TRANSFERS)
    return str(path)


def test_limits_shows_each_source_and_the_engine_bound(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "latest.json"
    report.write_text(json.dumps({"safe_capacity": 2, "pbx": "asterisk",
                                  "finished_at": "2026-11-26T10:00:00Z"}))
    cfg = _config(tmp_path, f"max_calls: 8\ncapacity: {{pbx_conf: {VARIANT1}, "
                            f"capacity_report: {report}}}\n")
    assert main(["--config", cfg, "limits"]) == 0
    out = capsys.readouterr().out
    assert f"{VARIANT1}:24" in out and "120" in out  # maxcalls, file:line
    assert f"{VARIANT1}:25" in out and "0.9" in out  # maxload
    assert "effective capacity: 2 concurrent calls (bound by engine)" in out
    assert f"{cfg}: max_calls" in out

    assert main(["--config", cfg, "limits", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["effective_capacity"] == 2 and data["bound_by"] == "engine"
    terms = {t["name"]: t for t in data["terms"]}
    assert terms["pbx"]["value"] == 120 and terms["pbx"]["source"] == f"{VARIANT1}:24"
    assert terms["config"]["value"] == 8
    assert terms["engine"]["value"] == 2 and str(report) in terms["engine"]["source"]


def test_limits_bound_by_the_pbx_and_by_config(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "asterisk.conf"
    conf.write_text("[options]\nmaxcalls = 3 ; small box\n")
    cfg = _config(tmp_path, f"max_calls: 8\ncapacity: {{pbx_conf: {conf}, "
                            f"capacity_report: {tmp_path / 'none.json'}}}\n")
    assert main(["--config", cfg, "limits", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["effective_capacity"], data["bound_by"]) == (3, "pbx")
    cfg = _config(tmp_path, f"max_calls: 2\ncapacity: {{pbx_conf: {conf}, "
                            f"capacity_report: {tmp_path / 'none.json'}}}\n")
    assert main(["--config", cfg, "limits", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["effective_capacity"], data["bound_by"]) == (2, "config")
    assert data["terms"][2]["value"] is None and "no capacity report" in data["terms"][2]["source"]


def test_limits_freeswitch_counts_max_sessions_minus_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, f"pbx: freeswitch\nmax_calls: 100\ncapacity: {{pbx_conf: {FS_LAB}, "
                            f"capacity_report: {tmp_path / 'none.json'}}}\n")
    assert main(["--config", cfg, "limits", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["effective_capacity"], data["bound_by"]) == (39, "pbx")
    names = {lim["name"]: lim for lim in data["limits"]}
    assert names["max-sessions"]["value"] == 40
    assert names["max-sessions"]["source"] == f"{FS_LAB}:20"


def test_limits_with_a_missing_or_broken_pbx_conf(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, f"capacity: {{pbx_conf: {tmp_path / 'nope.conf'}, "
                            f"capacity_report: {tmp_path / 'none.json'}}}\n")
    assert main(["--config", cfg, "limits"]) == 0
    out = capsys.readouterr().out
    assert "not found" in out and "bound by config" in out
    bad = tmp_path / "asterisk.conf"
    bad.write_text("[options]\n#include missing.conf\n")
    cfg = _config(tmp_path, f"capacity: {{pbx_conf: {bad}, "
                            f"capacity_report: {tmp_path / 'none.json'}}}\n")
    assert main(["--config", cfg, "limits"]) == 0
    out = capsys.readouterr().out
    assert f"{bad}:2" in out  # the file and line of the broken include


def test_check_reports_a_bad_shedding_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "shedding.yaml"
    rules.write_text("rules:\n  - name: hot\n    sensor: cpu_temperature\n    above: 90\n"
                     "    for: 5s\n    level: brief\n")
    cfg = _config(tmp_path, f"capacity: {{shedding: {rules}, pbx_conf: none}}\n")
    assert main(["--config", cfg, "check"]) == 1
    captured = capsys.readouterr()
    assert f"{rules}:3" in captured.out and "cpu_temperature" in captured.out
    rules.write_text("rules: []\n")
    main(["--config", cfg, "check"])
    assert "shedding: 0 rules" in capsys.readouterr().out
