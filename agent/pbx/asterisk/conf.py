"""Read asterisk.conf ``[options]`` call limits with Asterisk's own config syntax."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

from agent.capacity.limits import PbxLimit, PbxLimits
from agent.errors import ConfigError

_MAX_INCLUDE_DEPTH = 32
_INT = re.compile(r"\s*([+-]?\d+)")
_FLOAT = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class _Var:
    name: str
    value: str
    source: str


@dataclass
class _Category:
    name: str
    template: bool
    variables: list[_Var] = field(default_factory=list)


@dataclass
class _Config:
    categories: list[_Category] = field(default_factory=list)
    current: _Category | None = None

    def find(self, name: str, *, include_templates: bool) -> _Category | None:
        for cat in self.categories:
            if cat.name.lower() == name.lower() and (include_templates or not cat.template):
                return cat
        return None


def strip_comments(line: str, depth: int) -> tuple[str, int]:
    """Drop ``;`` and ``;-- --;`` comments from one line; return (text, block depth after it)."""
    out: list[str] = []
    i = 0
    new = 0
    n = len(line)
    while i < n:
        ch = line[i]
        if ch != ";":
            if depth == 0:
                out.append(ch)
            i += 1
            continue
        if i > new and line[i - 1] == "\\":
            if depth == 0:
                out[-1] = ";"
            new = i + 1
        elif line[i + 1:i + 3] == "--" and line[i + 3:i + 4] != "-":
            depth += 1
            new = i + 3
        elif depth > 0 and i >= new + 2 and line[i - 2:i] == "--":
            depth -= 1
            new = i + 1
        elif depth == 0:
            break
        else:
            new = i + 1
        i = new
    return "".join(out).strip(), depth


def _include_targets(pattern: str, base_dir: str) -> list[str]:
    path = pattern if os.path.isabs(pattern) else os.path.join(base_dir, pattern)
    if _GLOB_CHARS.search(path):
        return sorted(glob.glob(path))
    return [path] if os.path.isfile(path) else []


def _directive(cfg: _Config, text: str, path: str, lineno: int, depth: int) -> None:
    parts = text[1:].split(None, 1)
    if not parts:
        return
    name = parts[0].lower()
    if name not in ("include", "tryinclude") or len(parts) < 2:
        return
    arg = parts[1].strip()
    if arg[:1] in ('"', "<") and len(arg) >= 2 and arg[-1] == ('"' if arg[0] == '"' else ">"):
        arg = arg[1:-1]
    targets = _include_targets(arg, os.path.dirname(os.path.abspath(path)))
    if not targets:
        if name == "include":
            raise ConfigError(f"{path}:{lineno}", "#include", f"cannot read included file {arg!r}")
        return
    for target in targets:
        _load(cfg, target, depth + 1)


def _category(cfg: _Config, text: str, path: str, lineno: int) -> None:
    close = text.find("]")
    if close < 0:
        raise ConfigError(f"{path}:{lineno}", text, "no closing ']'")
    name = text[1:close]
    rest = text[close + 1:]
    cat = _Category(name, template=False)
    if rest.startswith("("):
        end = rest.find(")")
        if end < 0:
            raise ConfigError(f"{path}:{lineno}", text, "no closing ')'")
        for opt in rest[1:end].split(","):
            opt = opt.strip()
            if opt == "!":
                cat.template = True
            elif opt == "+":
                existing = cfg.find(name, include_templates=False)
                if existing is None:
                    raise ConfigError(f"{path}:{lineno}", f"[{name}](+)",
                                      "category addition requested, but category does not exist")
                cfg.current = existing
                return
            elif opt:
                base = cfg.find(opt, include_templates=True)
                if base is None:
                    raise ConfigError(f"{path}:{lineno}", f"[{name}]({opt})",
                                      f"inheritance requested, but category {opt!r} does not exist")
                cat.variables.extend(base.variables)
    cfg.categories.append(cat)
    cfg.current = cat


def _variable(cfg: _Config, text: str, path: str, lineno: int) -> None:
    eq = text.find("=")
    if eq < 0:
        return
    if cfg.current is None:
        raise ConfigError(f"{path}:{lineno}", text[:eq].strip(), "no category context")
    name = text[:eq].strip()
    value = text[eq + 1:]
    if value.startswith(">"):
        value = value[1:]
    if name:
        cfg.current.variables.append(_Var(name, value.strip(), f"{path}:{lineno}"))


def _load(cfg: _Config, path: str, depth: int) -> None:
    if depth > _MAX_INCLUDE_DEPTH:
        raise ConfigError(path, "#include", f"includes nested deeper than {_MAX_INCLUDE_DEPTH}")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(path, "file", f"cannot read: {exc.strerror or exc}") from exc
    comment = 0
    for lineno, raw in enumerate(lines, start=1):
        text, comment = strip_comments(raw, comment)
        if not text:
            continue
        if text.startswith("["):
            _category(cfg, text, path, lineno)
        elif text.startswith("#"):
            _directive(cfg, text, path, lineno, depth)
        else:
            _variable(cfg, text, path, lineno)


def _number(var: _Var, pattern: re.Pattern[str]) -> float | None:
    match = pattern.match(var.value)
    if match is None:
        raise ConfigError(var.source, var.name, f"not a number: {var.value!r}")
    number = float(match.group(1))
    if number < 0:
        raise ConfigError(var.source, var.name, f"must not be negative: {var.value!r}")
    return number or None


def parse_asterisk_conf(path: str) -> PbxLimits:
    """Parse maxcalls, maxload and minmemfree from the first non-template ``[options]``."""
    cfg = _Config()
    _load(cfg, path, 0)
    found: dict[str, PbxLimit] = {}
    options = cfg.find("options", include_templates=False)
    patterns = {"maxcalls": _INT, "maxload": _FLOAT, "minmemfree": _INT}
    for var in options.variables if options is not None else []:
        key = var.name.lower()
        if key in patterns:
            found[key] = PbxLimit(key, _number(var, patterns[key]), var.source)
    limits = tuple(found.get(key, PbxLimit(key, None, "default")) for key in patterns)
    return PbxLimits("asterisk", limits)
