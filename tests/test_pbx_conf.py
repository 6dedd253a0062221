"""PBX channel-limit parsers against the recorded config samples and Asterisk/FreeSWITCH syntax."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from fixtures_path import FIXTURES

from agent.capacity.limits import PbxLimit, PbxLimits
from agent.errors import ConfigError
from agent.pbx.asterisk.conf import parse_asterisk_conf
from agent.pbx.freeswitch.conf import parse_switch_conf

AST = FIXTURES / "asterisk" / "config-samples"
FS = FIXTURES / "freeswitch" / "config-samples"
INCLUDE_ABS = "/etc/asterisk/asterisk_limits_local.conf"


def asterisk_verified() -> dict[str, tuple[int, float]]:
    """Map each sample name to (CoreMaxCalls, CoreMaxLoadAvg) as the real Asterisk reported."""
    text = (AST / "hand-written" / "verified_by_asterisk_22.10.1.txt").read_text(encoding="utf-8")
    result: dict[str, tuple[int, float]] = {}
    for block in re.split(r"^### ", text, flags=re.M)[1:]:
        name = block.split()[0]
        calls = re.search(r"^CoreMaxCalls: (\d+)$", block, re.M)
        load = re.search(r"^CoreMaxLoadAvg: ([\d.]+)$", block, re.M)
        assert calls and load, name
        result[name] = (int(calls.group(1)), float(load.group(1)))
    return result


def freeswitch_verified() -> dict[str, tuple[int, int, float]]:
    """Map each handwritten sample to (max sessions, sps, min idle cpu) from fs_cli output."""
    text = (FS / "handwritten" / "validation.txt").read_text(encoding="utf-8")
    result: dict[str, tuple[int, int, float]] = {}
    for block in re.split(r"^=== ", text, flags=re.M)[1:]:
        name = block.split()[0]
        if not name.endswith(".xml"):
            continue
        sessions = re.search(r"\+OK max sessions: (\d+)", block)
        sps = re.search(r"\+OK sessions per second: (\d+)", block)
        cpu = re.search(r"min idle cpu ([\d.]+)/", block)
        assert sessions and sps and cpu, name
        result[name] = (int(sessions.group(1)), int(sps.group(1)), float(cpu.group(1)))
    return result


def ast_sample_path(name: str, tmp_path: Path) -> Path:
    """Where a sample lives; the include variant is copied with its include mapped next to it."""
    if name == "asterisk.conf.sample":
        return AST / "vanilla" / name
    src = AST / "hand-written" / name
    text = src.read_text(encoding="utf-8")
    if INCLUDE_ABS not in text:
        return src
    shutil.copy(AST / "hand-written" / "asterisk_limits_local.conf", tmp_path)
    dst = tmp_path / name
    dst.write_text(text.replace(INCLUDE_ABS, "asterisk_limits_local.conf"), encoding="utf-8")
    return dst


def value(limits: PbxLimits, name: str) -> float:
    limit = limits.get(name)
    assert limit is not None
    return limit.value or 0.0


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_verified_file_covers_every_asterisk_sample() -> None:
    samples = {p.name for p in (AST / "hand-written").glob("asterisk.conf.*")}
    samples.add("asterisk.conf.sample")
    assert set(asterisk_verified()) == samples


@pytest.mark.parametrize("name", sorted(asterisk_verified()))
def test_asterisk_samples_parse_to_what_asterisk_reported(name: str, tmp_path: Path) -> None:
    calls, load = asterisk_verified()[name]
    limits = parse_asterisk_conf(str(ast_sample_path(name, tmp_path)))
    assert limits.pbx == "asterisk"
    assert value(limits, "maxcalls") == calls
    assert value(limits, "maxload") == pytest.approx(load)
    assert limits.max_calls() == (calls or None)


def test_asterisk_sources_point_at_file_and_line(tmp_path: Path) -> None:
    path = ast_sample_path("asterisk.conf.variant2-include", tmp_path)
    limits = parse_asterisk_conf(str(path))
    local = f"{tmp_path}/asterisk_limits_local.conf"
    assert limits.get("maxcalls") == PbxLimit("maxcalls", 75.0, f"{local}:4")
    assert limits.get("minmemfree") == PbxLimit("minmemfree", None, "default")
    v1 = parse_asterisk_conf(str(AST / "hand-written" / "asterisk.conf.variant1-inline-comments"))
    assert v1.get("maxload") == PbxLimit(
        "maxload", 0.9, f"{AST}/hand-written/asterisk.conf.variant1-inline-comments:25")


def test_missing_include_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "a.conf", "[options]\nmaxcalls = 5\n#include \"nope.conf\"\n")
    with pytest.raises(ConfigError) as err:
        parse_asterisk_conf(path)
    assert err.value.path == f"{path}:3"
    assert "nope.conf" in err.value.reason


def test_tryinclude_of_missing_file_is_silent(tmp_path: Path) -> None:
    path = write(tmp_path, "a.conf", "[options]\nmaxcalls = 5\n#tryinclude \"nope.conf\"\n")
    assert parse_asterisk_conf(path).max_calls() == 5


def test_include_is_relative_to_config_dir_and_keeps_open_section(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path, "sub/limits.conf", "maxcalls => 12 ; inline\n[other]\nx = 1\n")
    path = write(tmp_path, "a.conf", "[options]\n#include <sub/limits.conf>\nmaxload = 2\n")
    limits = parse_asterisk_conf(path)
    assert limits.get("maxcalls") == PbxLimit("maxcalls", 12.0, f"{tmp_path}/sub/limits.conf:1")
    assert value(limits, "maxload") == 0.0  # after the include, [other] is the open section


def test_block_comments_span_lines_nest_and_resume_mid_line(tmp_path: Path) -> None:
    text = (
        "[options]\n"
        ";-- outer\n maxcalls = 1\n ;-- inner --;\n maxcalls = 2\n--;\n"
        "maxload = 3 ;-- gone --; \n"
        "minmemfree = 4;-- x\n--; maxcalls = 7\n"
    )
    limits = parse_asterisk_conf(write(tmp_path, "a.conf", text))
    assert value(limits, "maxcalls") == 7
    assert value(limits, "maxload") == 3
    assert value(limits, "minmemfree") == 4


def test_escaped_semicolon_is_not_a_comment(tmp_path: Path) -> None:
    text = "[options]\nmaxcalls = 9\\;x ; real comment\n"
    limits = parse_asterisk_conf(write(tmp_path, "a.conf", text))
    assert value(limits, "maxcalls") == 9


def test_templates_are_skipped_but_inheritable(tmp_path: Path) -> None:
    text = (
        "[options](!)\nmaxcalls = 99\n"
        "[base](!)\nmaxcalls = 40\nmaxload = 1.25\n"
        "[options](base)\nmaxload = 2\n"
    )
    limits = parse_asterisk_conf(write(tmp_path, "a.conf", text))
    assert limits.get("maxcalls") == PbxLimit("maxcalls", 40.0, f"{tmp_path}/a.conf:4")
    assert value(limits, "maxload") == 2.0


def test_only_template_options_means_no_limits(tmp_path: Path) -> None:
    limits = parse_asterisk_conf(write(tmp_path, "a.conf", "[options](!)\nmaxcalls = 99\n"))
    assert limits.max_calls() is None


def test_second_plain_options_ignored_and_plus_merges(tmp_path: Path) -> None:
    plain = write(tmp_path, "a.conf", "[options]\nmaxcalls = 3\n[x]\n[options]\nmaxcalls = 30\n")
    plus = write(tmp_path, "b.conf", "[options]\nmaxcalls = 3\n[x]\n[options](+)\nmaxcalls = 30\n")
    assert parse_asterisk_conf(plain).max_calls() == 3
    assert parse_asterisk_conf(plus).max_calls() == 30


@pytest.mark.parametrize("text, reason", [
    ("maxcalls = 3\n", "no category"),
    ("[options\nmaxcalls = 3\n", "no closing ']'"),
    ("[options](+)\nmaxcalls = 3\n", "does not exist"),
    ("[options](nobase)\nmaxcalls = 3\n", "does not exist"),
    ("[options]\nmaxcalls = lots\n", "not a number"),
    ("[options]\nmaxload = -1\n", "negative"),
])
def test_asterisk_errors(text: str, reason: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        parse_asterisk_conf(write(tmp_path, "a.conf", text))


def test_include_loop_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "a.conf", "[options]\n#include \"a.conf\"\n")
    with pytest.raises(ConfigError, match="nested"):
        parse_asterisk_conf(path)


def test_every_handwritten_freeswitch_sample_is_verified() -> None:
    samples = {p.name for p in (FS / "handwritten").glob("*.xml")}
    assert set(freeswitch_verified()) == samples


@pytest.mark.parametrize("name", sorted(freeswitch_verified()))
def test_freeswitch_samples_parse_to_what_freeswitch_reported(name: str) -> None:
    sessions, sps, cpu = freeswitch_verified()[name]
    limits = parse_switch_conf(str(FS / "handwritten" / name))
    assert limits.pbx == "freeswitch"
    assert value(limits, "max-sessions") == sessions
    assert value(limits, "sessions-per-second") == sps
    assert value(limits, "min-idle-cpu") == pytest.approx(cpu)
    assert limits.max_calls() == sessions - 1


@pytest.mark.parametrize("folder, sessions, sps, line", [
    ("vanilla", 1000, 30, 61),
    ("lab", 40, 20, 20),
])
def test_freeswitch_vanilla_and_lab(folder: str, sessions: int, sps: int, line: int) -> None:
    path = FS / folder / "switch.conf.xml"
    limits = parse_switch_conf(str(path))
    assert limits.get("max-sessions") == PbxLimit("max-sessions", float(sessions), f"{path}:{line}")
    assert value(limits, "sessions-per-second") == sps
    assert limits.get("min-idle-cpu") == PbxLimit("min-idle-cpu", None, "default")


def test_freeswitch_max_calls_off_by_one() -> None:
    limits = PbxLimits("freeswitch", (PbxLimit("max-sessions", 3.0, "x:1"),))
    assert limits.max_calls() == 2  # 03_max_sessions_3: max 3 admitted 2 inbound calls
    assert PbxLimits("freeswitch", (PbxLimit("max-sessions", 1.0, "x:1"),)).max_calls() == 0
    assert PbxLimits("freeswitch", ()).max_calls() is None


def test_commented_params_ignored_with_sources() -> None:
    path = FS / "handwritten" / "switch.conf.HANDWRITTEN.commented_params.xml"
    limits = parse_switch_conf(str(path))
    assert limits.get("max-sessions") == PbxLimit("max-sessions", 120.0, f"{path}:7")
    assert limits.get("sessions-per-second") == PbxLimit("sessions-per-second", 30.0, f"{path}:12")


def test_vars_file_resolves_preprocessor_variables(tmp_path: Path) -> None:
    vars_xml = '<include>\n  <X-PRE-PROCESS cmd="set" data="ms=64"/>\n</include>\n'
    vars_path = write(tmp_path, "vars.xml", vars_xml)
    conf = write(tmp_path, "switch.conf.xml", (
        '<configuration name="switch.conf">\n  <settings>\n'
        '    <param name="max-sessions" value="$${ms}"/>\n'
        '    <param name="min-idle-cpu" value="12.5"/>\n'
        "  </settings>\n</configuration>\n"
    ))
    limits = parse_switch_conf(conf, vars_path)
    assert limits.get("max-sessions") == PbxLimit("max-sessions", 64.0, f"{conf}:3")
    assert value(limits, "min-idle-cpu") == 12.5
    assert limits.max_calls() == 63
    with pytest.raises(ConfigError, match="undefined"):
        parse_switch_conf(conf)


def test_switch_conf_xml_errors(tmp_path: Path) -> None:
    bad = write(tmp_path, "a.xml", "<configuration>\n<settings>\n</configuration>\n")
    with pytest.raises(ConfigError) as err:
        parse_switch_conf(bad)
    assert err.value.path == f"{bad}:3"
    nan = write(tmp_path, "b.xml", '<configuration><settings><param name="max-sessions" value="x"/>'
                                   "</settings></configuration>")
    with pytest.raises(ConfigError, match="not a number"):
        parse_switch_conf(nan)
