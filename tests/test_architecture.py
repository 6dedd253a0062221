"""Dependency direction is the architecture: checked by reading imports."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules(sub: str) -> list[Path]:
    return sorted((AGENT / sub).rglob("*.py"))


def test_engine_and_dialog_never_import_asyncio_or_gevent() -> None:
    for path in modules("engine") + modules("dialog"):
        bad = {n for n in imports_of(path) if n.split(".")[0] in {"asyncio", "gevent"}}
        assert not bad, f"{path} imports {bad}"


def test_asterisk_side_never_imports_gevent() -> None:
    for path in modules("pbx/asterisk") + modules("call") + [AGENT / "runtime" / "aio.py"]:
        assert not any(n.split(".")[0] == "gevent" for n in imports_of(path)), path


def test_leaves_do_not_import_upper_layers() -> None:
    upper = ("agent.pbx", "agent.call", "agent.runtime", "agent.cli", "agent.sim")
    leaves = [AGENT / "config.py", AGENT / "errors.py", AGENT / "audio.py", AGENT / "models.py"]
    for path in leaves + modules("engine") + modules("dialog"):
        bad = {n for n in imports_of(path) if n.startswith(upper)}
        assert not bad, f"{path} imports {bad}"


def test_call_layer_does_not_import_pbx_modules() -> None:
    for path in modules("call"):
        bad = {n for n in imports_of(path) if n.startswith(("agent.pbx", "agent.runtime"))}
        assert not bad, f"{path} imports {bad}"


def test_freeswitch_side_never_imports_asyncio() -> None:
    for path in modules("pbx/freeswitch") + [AGENT / "runtime" / "green.py",
                                             AGENT / "runtime" / "engines.py"]:
        assert not any(n.split(".")[0] == "asyncio" for n in imports_of(path)), path


def test_call_session_is_runtime_neutral() -> None:
    for path in modules("call"):
        bad = {n for n in imports_of(path) if n.split(".")[0] in {"asyncio", "gevent"}}
        assert not bad, f"{path} imports {bad}"


def test_kpi_and_capacity_are_leaves() -> None:
    for sub in ("kpi", "capacity", "integrations"):
        for path in modules(sub):
            allowed = (f"agent.{sub}", "agent.errors", "agent.config")
            bad = {n for n in imports_of(path)
                   if n.startswith("agent.") and not n.startswith(allowed)}
            assert not bad, f"{path} imports {bad}"
