"""Model manifest, `pbx-agent models` and the sha256-checked download (local HTTP server)."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.errors import AgentError, ModelMissing
from agent.models import get_spec, install, load_manifest, locate, require, sha256_file, verify


def make_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("vosk-model-small-en-us-0.15/am/final.mdl", b"not a real model")
        zf.writestr("vosk-model-small-en-us-0.15/conf/model.conf", b"--sample-frequency=16000\n")
    return buf.getvalue()


@pytest.fixture
def server() -> Iterator[tuple[str, bytes]]:
    archive = make_archive()
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", b"x")
    files = {"/model.zip": archive, "/evil.zip": evil.getvalue()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", archive
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_manifest_entries_are_complete() -> None:
    specs = load_manifest()
    names = {s.name for s in specs}
    assert {"whisper-tiny-en", "vosk-small-en-us", "smollm2-135m-instruct-q4_1",
            "piper-en-us-joe-medium", "vosk-ko"} <= names
    for spec in specs:
        assert len(spec.sha256) == 64 and spec.licence and spec.install
        assert spec.url or spec.package


def test_default_models_are_installed_and_match_their_sha256() -> None:
    for spec in load_manifest():
        if spec.default:
            status = locate(spec)
            assert status.installed, status.problem
            assert verify(status) == ""


def test_install_checks_sha256_and_unpacks(server: tuple[str, bytes], tmp_path: Path) -> None:
    base, archive = server
    spec = get_spec("vosk-small-en-us")
    digest = hashlib.sha256(archive).hexdigest()
    path = install(spec, tmp_path, url=f"{base}/model.zip", sha256=digest)
    assert path == tmp_path / "vosk-small-en-us"
    assert (path / "am" / "final.mdl").read_bytes() == b"not a real model"
    assert locate(spec, tmp_path).installed


def test_install_refuses_a_bad_checksum_and_leaves_nothing(server: tuple[str, bytes],
                                                           tmp_path: Path) -> None:
    base, _ = server
    spec = get_spec("vosk-small-en-us")  # the manifest's real sha256 won't match our archive
    with pytest.raises(AgentError, match="sha256 mismatch"):
        install(spec, tmp_path, url=f"{base}/model.zip")
    assert list(tmp_path.iterdir()) == []


def test_install_refuses_path_traversal(server: tuple[str, bytes], tmp_path: Path) -> None:
    base, _ = server
    evil = (tmp_path / "x").parent  # noqa: F841 - keeps the intent readable
    import urllib.request

    data = urllib.request.urlopen(f"{base}/evil.zip", timeout=5).read()
    with pytest.raises(AgentError, match="would escape"):
        install(get_spec("vosk-small-en-us"), tmp_path / "m", url=f"{base}/evil.zip",
                sha256=hashlib.sha256(data).hexdigest())
    assert not (tmp_path / "escape.txt").exists()


def test_install_reports_an_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="download of vosk-small-en-us .* failed"):
        install(get_spec("vosk-small-en-us"), tmp_path, url="http://127.0.0.1:9/none.zip",
                timeout_s=2)


def test_cli_models_install_and_list(server: tuple[str, bytes], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    base, archive = server
    rc = main(["models", "install", "vosk-small-en-us", "--dir", str(tmp_path),
               "--url", f"{base}/model.zip", "--sha256", hashlib.sha256(archive).hexdigest()])
    assert rc == 0
    assert main(["models", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "installed vosk-small-en-us" in out
    line = next(x for x in out.splitlines() if x.startswith("vosk-small-en-us "))
    assert "installed" in line and str(tmp_path) in line


def test_missing_model_names_the_install_command(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_AGENT_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelMissing, match="pbx-agent models install vosk-small-en-us"):
        require("vosk-small-en-us")
    with pytest.raises(ModelMissing, match="does not exist"):
        require("whisper-tiny-en", str(tmp_path / "nowhere"))


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"abc")
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
