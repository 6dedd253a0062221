"""Run `pbx-agent serve` as a child process (a gevent FreeSWITCH agent never shares a process
with the asyncio simulator), wait until it is ready, stop it with SIGTERM."""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

# the per-turn line CallSession logs: "call <id>: turn <n> path=<path> heard=<repr>"
_TURN_LINE = re.compile(r"call (?P<call>\S+): turn \d+ path=(?P<path>\w+) heard=(?P<heard>.*)$")


def heard_turns(log: str, call_id: str) -> list[tuple[str, str]]:
    """(what the agent heard, path) per turn of ``call_id``, read from an agent's log."""
    turns = []
    for line in log.splitlines():
        m = _TURN_LINE.search(line)
        if m and m.group("call") == call_id:
            try:
                heard = str(ast.literal_eval(m.group("heard")))
            except (ValueError, SyntaxError):
                heard = m.group("heard")
            turns.append((heard, m.group("path")))
    return turns


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    """`pbx-agent serve` with a given config, as a context manager."""

    def __init__(self, config_text: str, ready_timeout_s: float = 240.0,
                 env: dict[str, str] | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="pbx-agent-")
        self.config_path = Path(self._dir.name) / "agent.yaml"
        #: where the agent keeps its state (call records) unless the config says otherwise
        self.state_dir = Path(self._dir.name) / "state"
        #: the agent's Prometheus endpoint unless the config sets `kpi:` itself
        self.metrics_url = ""
        if not re.search(r"(?m)^state_dir:", config_text):
            config_text += f"\nstate_dir: {self.state_dir}\n"
        if not re.search(r"(?m)^kpi:", config_text):
            port = free_port()
            config_text += f"\nkpi: {{metrics: '127.0.0.1:{port}'}}\n"
            self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.config_path.write_text(config_text, encoding="utf-8")
        self.log_path = Path(self._dir.name) / "serve.log"
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.env = {**os.environ, **(env or {})}

    def __enter__(self) -> AgentProcess:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(self.config_path), "serve"],
                stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.ready_timeout_s
        while b"ready in" not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"pbx-agent serve exited:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pbx-agent serve not ready:\n{self.log()}")
            time.sleep(0.2)
        return self

    @property
    def records_path(self) -> Path:
        """The agent's call records when the config left `state_dir` and `kpi` to us."""
        return self.state_dir / "calls.sqlite"

    def log(self) -> str:
        """Everything the agent logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: int) -> None:
        """Send a signal (SIGHUP to reload, SIGTERM to drain and stop)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_log(self, text: str, timeout_s: float = 30.0) -> bool:
        """Wait until ``text`` appears in the log; False on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return text in self.log()
            time.sleep(0.05)
        return False

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then wait; kill if it does not stop in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.exit_code = self.proc.wait(10)
        else:
            self.exit_code = self.proc.returncode
        return self.exit_code

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._dir.cleanup()
