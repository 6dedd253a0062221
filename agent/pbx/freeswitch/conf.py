"""Read switch.conf.xml session limits the way FreeSWITCH's preprocessor and core do."""

from __future__ import annotations

import re
from xml.parsers import expat

from agent.capacity.limits import PbxLimit, PbxLimits
from agent.errors import ConfigError

_SET = re.compile(r"<X-PRE-PROCESS\s+cmd\s*=\s*\"set\"\s+data\s*=\s*\"([^\"]*)\"", re.IGNORECASE)
_VAR_REF = re.compile(r"\$\$\{([^}]*)\}")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))")
# FreeSWITCH core defaults (switch_core.c) used when switch.conf.xml sets nothing.
_DEFAULTS: dict[str, float | None] = {
    "max-sessions": 1000.0,
    "sessions-per-second": 30.0,
    "min-idle-cpu": None,
}


def _expand(line: str, variables: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        return variables.get(match.group(1), match.group(0))

    return _VAR_REF.sub(sub, line)


def preprocess(path: str, variables: dict[str, str]) -> str:
    """Expand known ``$${var}`` line by line, learning ``set`` commands (even in comments)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().split("\n")
    except OSError as exc:
        raise ConfigError(path, "file", f"cannot read: {exc.strerror or exc}") from exc
    out: list[str] = []
    for line in lines:
        expanded = _expand(line, variables)
        for data in _SET.findall(expanded):
            name, sep, value = data.partition("=")
            if sep and name.strip():
                variables[name.strip()] = value
        out.append(expanded)
    return "\n".join(out)


def _settings_params(text: str, path: str) -> list[tuple[str, str, int]]:
    params: list[tuple[str, str, int]] = []
    stack: list[str] = []
    state = {"settings_seen": False, "in_settings": False}
    parser = expat.ParserCreate()

    def start(tag: str, attrs: dict[str, str]) -> None:
        parent = stack[-1] if stack else ""
        stack.append(tag)
        if tag == "settings" and parent == "configuration" and not state["settings_seen"]:
            state["settings_seen"] = True
            state["in_settings"] = True
            return
        if tag == "param" and parent == "settings" and state["in_settings"]:
            params.append((attrs.get("name", ""), attrs.get("value", ""), parser.CurrentLineNumber))

    def end(tag: str) -> None:
        stack.pop()
        if tag == "settings" and state["in_settings"] and "settings" not in stack:
            state["in_settings"] = False

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(text, True)
    except expat.ExpatError as exc:
        raise ConfigError(f"{path}:{exc.lineno}", "xml", expat.errors.messages[exc.code]) from exc
    return params


def _value(name: str, raw: str, source: str) -> float | None:
    undefined = _VAR_REF.search(raw)
    if undefined is not None:
        raise ConfigError(source, name, f"undefined preprocessor variable {undefined.group(0)}")
    match = _NUMBER.match(raw)
    if match is None:
        raise ConfigError(source, name, f"not a number: {raw!r}")
    number = float(match.group(1))
    if number < 0:
        raise ConfigError(source, name, f"must not be negative: {raw!r}")
    if name != "min-idle-cpu":
        number = float(int(number))
    return number


def parse_switch_conf(path: str, vars_path: str | None = None) -> PbxLimits:
    """Parse max-sessions, sessions-per-second and min-idle-cpu from ``<settings>``."""
    variables: dict[str, str] = {}
    if vars_path is not None:
        preprocess(vars_path, variables)
    text = preprocess(path, variables)
    found: dict[str, PbxLimit] = {}
    for name, raw, lineno in _settings_params(text, path):
        key = name.lower()
        if key not in _DEFAULTS or not raw:
            continue
        source = f"{path}:{lineno}"
        number = _value(key, raw, source)
        if key == "min-idle-cpu":
            found[key] = PbxLimit(key, number or None, source)
        elif number:
            found[key] = PbxLimit(key, number, source)
    limits = tuple(found.get(key, PbxLimit(key, default, "default"))
                   for key, default in _DEFAULTS.items())
    return PbxLimits("freeswitch", limits)
