"""sd_notify datagrams and the unit file (systemd-analyze verify when the tool is installed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runtime import systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pbx-agent@.service"


def test_notify_sends_one_datagram_to_notify_socket(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1", "STATUS=0 active of 4")
        assert sock.recv(4096) == b"READY=1\nSTATUS=0 active of 4"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pbx-agent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_outside_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not systemd.notify("READY=1")  # a failed send never raises


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert systemd.watchdog_interval_s() is None


def _unit_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    return settings


def test_unit_is_notify_with_watchdog_reload_and_hardening() -> None:
    s = _unit_settings()
    assert s["Type"] == "notify" and int(s["WatchdogSec"]) > 0
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["KillSignal"] == "SIGTERM"
    # the stop timeout outlasts the default drain (60 s) plus the hand-back
    from agent.config import CapacityConfig

    assert int(s["TimeoutStopSec"]) > CapacityConfig().drain_timeout_s + 10
    for key in ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == "yes", key
    assert s["ProtectSystem"] == "strict" and s["StateDirectory"] == "pbx-agent"
    assert s["Environment"].startswith("PBX_AGENT_CONFIG=/etc/pbx-agent/%i.yaml")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "pbx-agent"
    if not exe.exists():
        exe = Path(sys.executable)
    text = UNIT.read_text().replace("/opt/pbx-agent/.venv/bin/pbx-agent", str(exe))
    unit = tmp_path / "pbx-agent@asterisk.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=120)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "pbx-agent@asterisk.service" in line or "Unknown" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
