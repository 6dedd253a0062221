"""The `pbx-agent` command: serve, demo, check, limits, status, report, capacity, models."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.config import Config, default_config, load_config, resolve_config_path
from agent.errors import AgentError, ConfigError

_LOGGER = logging.getLogger("agent")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / (1 << 20)


def _load(args: argparse.Namespace, embedded_default: bool = False) -> Config:
    if embedded_default and not args.config:
        return default_config()
    return load_config(resolve_config_path(args.config))


# -- serve -------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    """Run the agent for the PBX named in the config."""
    config = _load(args)
    _setup_logging(config.log_level)
    if config.pbx == "freeswitch":
        # gevent process: asyncio is never imported here
        from agent.runtime.engines import load_engines

        try:
            from agent.runtime.green import serve
        except ImportError as exc:
            print(f"{config.path}: pbx: freeswitch needs gevent and greenswitch ({exc}); "
                  "install them with: pip install 'pbx-agent[freeswitch]'", file=sys.stderr)
            return 2

        t0 = time.perf_counter()

        def ready(agent: object) -> None:
            _LOGGER.info("ready in %.1f s, RSS %.0f MiB", time.perf_counter() - t0, _rss_mib())

        return serve(config, load_engines, ready)
    import asyncio

    from agent.runtime.aio import serve as serve_asterisk
    from agent.runtime.engines import load_engines

    return asyncio.run(serve_asterisk(config, load_engines))


# -- demo --------------------------------------------------------------------------------------

async def _demo(config: Config, script_name: str, quiet: bool) -> int:
    import asyncio

    from agent.engine.tts import PiperTts
    from agent.models import require
    from agent.runtime.aio import AsteriskAgent
    from agent.runtime.engines import load_engines
    from agent.sim.caller import builtin_script, load_script
    from agent.sim.run import format_table, run_sim_call

    script = load_script(script_name) if Path(script_name).exists() else builtin_script(
        script_name)
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    engines = await loop.run_in_executor(None, load_engines, config)
    agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
    await agent.start()
    ready_s = time.perf_counter() - t0
    rss = _rss_mib()
    print(f"agent ready in {ready_s:.1f} s (stt={engines.stt_backend}); RSS {rss:.0f} MiB; "
          f"FastAGI 127.0.0.1:{agent.fastagi.port}, AudioSocket 127.0.0.1:{agent.audiosocket.port}")
    caller_voice = PiperTts(str(require("piper-en-us-joe-medium", config.models.tts_voice)),
                            out_rate_hz=config.rate_hz, length_scale=script.length_scale,
                            deterministic=True)

    def transcribe(pcm: bytes) -> str:
        stream = engines.stt.open_stream(config.rate_hz)
        stream.accept(pcm)
        return stream.finish().text

    def agent_turns(uniqueid: str) -> list[tuple[str, str]]:
        for summary in agent.finished:
            if summary.uniqueid == uniqueid:
                return [(t.caller_text, t.path) for t in summary.outcome.turns]
        return []

    try:
        report = await run_sim_call("127.0.0.1", agent.fastagi.port, script, caller_voice,
                                    transcribe, agent_turns, config.rate_hz)
    finally:
        await agent.close()
        engines.close()
    print(f"\ngreeting: {report.greeting_text}\n")
    print(format_table(report))
    stages = next((s.outcome for s in agent.finished if s.uniqueid == report.pbx.uniqueid), None)
    if stages is not None and not quiet:
        print("\nagent-side stage timings (ms): stt decode / llm first token / first audio queued")
        for i, t in enumerate(stages.turns, 1):
            llm = "-" if t.llm_first_token_ms is None else f"{t.llm_first_token_ms:.0f}"
            tts = "-" if t.tts_first_audio_ms is None else f"{t.tts_first_audio_ms:.0f}"
            print(f"  turn {i}: {t.path:8s} stt {t.stt_ms:.0f} / llm {llm} / tts {tts}")
    print(f"\nAGENT_RESULT={report.result} AGENT_TRANSFER_TO={report.transfer_to} "
          f"AGENT_REASON={report.reason}")
    wer = report.mean_wer()
    print(f"caller-transcript word error: {'-' if wer is None else f'{wer:.0%}'}; "
          f"longest gap in agent audio: {report.caller.max_agent_gap_ms:.0f} ms; "
          f"peak RSS {_rss_mib():.0f} MiB")
    ok = not report.pbx.idle_timeout_fired and (
        not script.expect_result or report.result == script.expect_result)
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the agent in-process and run one simulated call end to end."""
    config = _load(args, embedded_default=True)
    _setup_logging("DEBUG" if args.verbose else "WARNING")
    import asyncio

    if args.pbx == "freeswitch":
        return asyncio.run(_demo_freeswitch(config, args.script))
    return asyncio.run(_demo(config, args.script, args.quiet))


async def _demo_freeswitch(config: Config, script_name: str) -> int:
    """The FreeSWITCH demo: the gevent agent in a child process, the simulator here."""
    import asyncio

    import yaml

    from agent.engine.stt import WhisperStt
    from agent.engine.tts import PiperTts
    from agent.models import require
    from agent.sim.caller import builtin_script, load_script
    from agent.sim.process import AgentProcess, free_port, heard_turns
    from agent.sim.run import format_table, run_sim_call

    script = load_script(script_name) if Path(script_name).exists() else builtin_script(
        script_name)
    port = free_port()
    cfg = {"pbx": "freeswitch", "rate_hz": config.rate_hz, "max_calls": config.max_calls,
           "listen": {"esl": f"127.0.0.1:{port}"}, "log_level": "INFO",
           "transfers": dict(config.transfers)}
    if config.path and not config.path.startswith("<"):
        cfg["agent"] = str(Path(config.path).resolve())  # keep a custom agent definition
    t0 = time.perf_counter()
    with AgentProcess(yaml.safe_dump(cfg)) as proc:
        print(f"agent (gevent, pid {proc.proc.pid if proc.proc else '?'}) ready in "
              f"{time.perf_counter() - t0:.1f} s; outbound ESL 127.0.0.1:{port}")
        voice = PiperTts(str(require("piper-en-us-joe-medium", config.models.tts_voice)),
                         out_rate_hz=config.rate_hz, length_scale=script.length_scale,
                            deterministic=True)
        stt = WhisperStt(str(require("whisper-tiny-en", config.models.whisper_model)))
        report = await run_sim_call(
            "127.0.0.1", port, script, voice,
            lambda pcm: stt.transcribe(pcm, config.rate_hz).text,
            lambda call_id: heard_turns(proc.log(), call_id), config.rate_hz,
            pbx="freeswitch")
        await asyncio.sleep(0)
    print(f"\ngreeting: {report.greeting_text}\n")
    print(format_table(report))
    fs = report.pbx
    print(f"\nagent_result={report.result} agent_transfer_to={report.transfer_to} "
          f"agent_reason={report.reason}")
    wer = report.mean_wer()
    print(f"caller-transcript word error: {'-' if wer is None else f'{wer:.0%}'}; "
          f"longest gap in agent audio: {report.caller.max_agent_gap_ms:.0f} ms; "
          f"max frames queued in FreeSWITCH's UDP buffer: {fs.max_inflight_frames}")
    ok = fs.error is None and (not script.expect_result or report.result == script.expect_result)
    return 0 if ok else 1


# -- check -------------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and the models it needs; non-zero exit on any problem."""
    from agent.models import get_spec, locate, verify

    problems: list[str] = []
    try:
        config = _load(args)
        print(f"config {config.path}: ok ({len(config.agent.faq)} FAQ entries, "
              f"{len(config.agent.intents)} intents, transfers: {', '.join(config.transfers)})")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    m = config.models
    needed = [("piper-en-us-joe-medium", m.tts_voice), ("smollm2-135m-instruct-q4_1", m.llm_model)]
    if m.stt_backend == "vosk":
        needed.append(("vosk-small-en-us", m.vosk_model))
    else:
        needed.append(("whisper-tiny-en", m.whisper_model))
    for name, override in needed:
        if override:
            ok = Path(override).exists()
            print(f"model {name}: {override} {'ok' if ok else 'MISSING'}")
            if not ok:
                problems.append(f"models: {override} does not exist")
            continue
        status = locate(get_spec(name))
        problem = status.problem or (verify(status) if args.verify else "")
        if problem:
            problems.append(f"model {name}: {problem}; install with: {status.spec.install}")
            print(f"model {name}: MISSING ({problem}); install with: {status.spec.install}")
        else:
            print(f"model {name}: ok ({status.path})")
    from agent.runtime.governor import load_shed_rules, read_static_limits

    try:
        rules = load_shed_rules(config)
        print(f"shedding: {len(rules.rules)} rules from {rules.path}: ok")
    except ConfigError as exc:
        print(f"shedding: {exc}")
        problems.append(f"shedding rules: {exc}")
    static = read_static_limits(config)
    if static.limits is not None:
        print(f"PBX limits: {static.path}: ok (max calls "
              f"{static.limits.max_calls() or 'unlimited'})")
    else:  # the PBX enforces its own limits either way: a warning, not a failure
        print(f"PBX limits: warning: {static.problem}")
    problems += _check_kpi(config)
    problems += _check_integrations(config)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


def _check_kpi(config: Config) -> list[str]:
    """Call records writable, metrics port free (a running agent holding it is only noted)."""
    import os
    import socket

    problems = []
    path = config.kpi.records_path(config.state_dir)
    if path is None:
        print("call records: off (kpi.records: off)")
    else:
        where = Path(path).parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if os.access(where, os.W_OK | os.X_OK) and (not Path(path).exists()
                                                    or os.access(path, os.W_OK)):
            print(f"call records: {path}: ok")
        else:
            print(f"call records: {path}: NOT WRITABLE")
            problems.append(f"{config.path}: kpi.records: {path} is not writable by this user "
                            f"(set state_dir or kpi.records, or kpi.records: off)")
    ep = config.kpi.metrics
    if ep is None:
        print("metrics: off (kpi.metrics: off)")
    else:
        with socket.socket() as sock:
            in_use = sock.connect_ex((ep.host, ep.port)) == 0
        print(f"metrics: http://{ep}/metrics" + (" (in use: an agent is running, or another "
                                                 "program holds the port)" if in_use else ": ok"))
    return problems


def _check_integrations(config: Config) -> list[str]:
    """Flows loaded; each webhook's secrets readable (files root-only) and its host reachable.

    An unreachable system is a warning, not a failure: the flows take their fallback at once.
    """
    import os
    import socket
    import stat
    from urllib.parse import urlsplit

    flows = config.agent.flows
    if flows:
        print(f"flows: {len(flows)} ok ("
              + ", ".join(f"{f.name} [{f.start}, {len(f.steps)} steps]" for f in flows) + ")")
    problems: list[str] = []
    for name, spec in config.integrations.items():
        notes: list[str] = []
        for header, secret in spec.secret_headers:
            key = f"{config.path}: integrations.{name}.secret_headers.{header}"
            if secret.env and os.environ.get(secret.env):
                continue
            if secret.file:
                try:
                    mode = os.stat(secret.file).st_mode
                except OSError as exc:
                    problems.append(f"{key}: cannot read {secret.file}: {exc.strerror}")
                    continue
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    problems.append(f"{key}: {secret.file} is readable by group or others "
                                    f"(chmod 600 it)")
                elif not os.access(secret.file, os.R_OK):
                    problems.append(f"{key}: {secret.file} is not readable by this user")
            else:
                notes.append(f"${secret.env} not set here (set it in the service environment)")
        parts = urlsplit(spec.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=1.0):
                reach = "reachable"
        except OSError as exc:
            reach = f"NOT REACHABLE ({exc.strerror or exc}; flows take their fallback)"
        print(f"integration {name}: {spec.method} {parts.scheme}://{parts.hostname}:{port}"
              f"{parts.path} timeout {spec.timeout_ms} ms: {reach}"
              + "".join(f"; warning: {n}" for n in notes))
    side = config.sidework
    print(f"side work: up to {side.max_jobs} jobs, {side.max_attempts} attempts"
          + (f", post-call to {', '.join(side.post_call)}" if side.post_call else ""))
    return problems


# -- status and report -------------------------------------------------------------------------

def _metrics_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    try:
        config = load_config(resolve_config_path(args.config))
        ep = config.kpi.metrics
    except ConfigError:
        ep = None
        config = None
    if config is not None and ep is None:
        raise AgentError(f"{config.path}: kpi.metrics: off, so there is no live status; "
                         "turn it on or pass --url")
    host, port = (ep.host, ep.port) if ep is not None else ("127.0.0.1", 9464)
    return f"http://{_connectable(host)}:{port}/metrics"


def _connectable(host: str) -> str:
    """The address to connect to for a listener bound to ``host`` (a wildcard bind is reached
    on loopback)."""
    import ipaddress

    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return host
    return "127.0.0.1" if unspecified else host


def cmd_status(args: argparse.Namespace) -> int:
    """Live status of the running agent, read from its metrics endpoint."""
    import json

    from agent.kpi.metrics import fetch_metrics, format_status, snapshot_from_metrics

    url = _metrics_url(args)
    try:
        snap = snapshot_from_metrics(fetch_metrics(url))
    except ConnectionError as exc:
        print(f"pbx-agent status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(snap), indent=2, sort_keys=True))
    else:
        print(format_status(snap))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The capacity-planning KPIs over a window of call records."""
    import json

    from agent.kpi.records import read_records
    from agent.kpi.report import compute_kpis, format_table, parse_since, render_html, to_json

    if args.db:
        path = str(args.db)
    else:
        config = _load(args)
        records_path = config.kpi.records_path(config.state_dir)
        if records_path is None:
            raise AgentError(f"{config.path}: kpi.records: off, so there are no call records")
        path = records_path
    now = time.time()
    try:
        since = parse_since(args.since, now)
        until = parse_since(args.until, now) if args.until else now
    except ValueError as exc:
        print(f"pbx-agent report: {exc}", file=sys.stderr)
        return 2
    try:
        records = read_records(path, since, until)
    except (OSError, ValueError) as exc:
        print(f"pbx-agent report: {exc}", file=sys.stderr)
        return 1
    kpis = compute_kpis(records, since, until)
    if args.html:
        Path(args.html).write_text(render_html(kpis, records), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(kpis), indent=2, sort_keys=True))
    elif not args.html:
        print(format_table(kpis))
    return 0


# -- capacity ----------------------------------------------------------------------------------

def cmd_capacity(args: argparse.Namespace) -> int:
    """Measure the safe capacity over the real protocols; write the report."""
    from agent.sim.capacity import (
        DEFAULT_METRICS_URL,
        CapacityOptions,
        format_summary,
        parse_mix,
        run_capacity,
        write_report,
    )

    config: Config | None = None
    base = ""
    if args.config or Path(resolve_config_path(None)).exists():
        config = _load(args)
        base = Path(config.path).read_text(encoding="utf-8")
    if args.out:
        out = str(args.out)
    elif config is not None:
        out = str(Path(config.capacity.report_path(config.state_dir)).parent)
    else:
        out = "capacity"
    try:
        extra: dict[str, Any] = {"mix": parse_mix(args.mix)} if args.mix else {}
        options = CapacityOptions(
            pbx=args.pbx or (config.pbx if config is not None else "asterisk"),
            steps=tuple(int(n) for n in args.steps.split(",") if n.strip()),
            step_s=args.step_s, min_calls=args.min_calls, p95_ms=args.p95_ms,
            completion=args.completion, wer=args.wer,
            **extra,
            seed=args.seed, naive=args.naive, compare_naive=args.compare_naive, out_dir=out,
            base_config=base, base_config_path=config.path if config is not None else "",
            target=args.target, warmup_calls=args.warmup_calls,
            metrics_url=args.metrics_url or DEFAULT_METRICS_URL, agent_pid=args.pid,
            calls_per_hour=args.calls_per_hour, aht_s=args.aht,
            target_blocking=args.target_blocking, stop_after_failures=args.stop_after)
    except ValueError as exc:
        print(f"pbx-agent capacity: {exc}", file=sys.stderr)
        return 2
    _setup_logging("WARNING")
    try:
        result = run_capacity(options, progress=lambda line: print(line, file=sys.stderr,
                                                                   flush=True))
    except RuntimeError as exc:  # the agent did not start: its log is in the message
        print(f"pbx-agent capacity: {exc}", file=sys.stderr)
        return 1
    files = write_report(result, out)
    print(format_summary(result))
    for kind, path in files.items():
        print(f"{kind}: {path}")
    if config is not None and args.target is None:
        print(f"the agent reads {config.capacity.report_path(config.state_dir)} at start and "
              f"on `systemctl reload pbx-agent@{config.pbx}`")
    return 0


# -- limits ------------------------------------------------------------------------------------

def _fetch_live(config: Config) -> tuple[object | None, str]:
    """One live reading over AMI / inbound ESL: (LiveLimits or None, problem text)."""
    live = config.capacity.live
    if live is None:
        return None, "capacity.live not configured"
    try:
        if config.pbx == "asterisk":
            import asyncio

            from agent.pbx.asterisk.ami import AmiLimitsMonitor

            monitor = AmiLimitsMonitor(live.host, live.port, live.username, live.secret.read(),
                                       poll_s=config.capacity.live_poll_s)
            return asyncio.run(monitor.fetch_once()), ""
        from agent.pbx.freeswitch.inbound import fetch_esl_limits

        return fetch_esl_limits(live.host, live.port, live.secret.read()), ""
    except Exception as exc:  # a dead PBX connection is a finding here, not a crash
        return None, str(exc)


def cmd_limits(args: argparse.Namespace) -> int:
    """Print each limit, where it came from, and the effective capacity."""
    import json

    from agent.runtime.governor import Governor

    config = _load(args)
    live, live_problem = _fetch_live(config) if args.live else (None, "not asked (--live)")
    governor = Governor(config, live=lambda: live)  # type: ignore[arg-type, return-value]
    static = governor.static
    cap = governor.capacity()
    terms = governor.terms()
    headroom = governor.admission.effective_headroom(cap.value)
    if args.json:
        print(json.dumps({
            "pbx": config.pbx,
            "pbx_conf": static.path,
            "pbx_conf_problem": static.problem or None,
            "limits": [{"name": lim.name, "value": lim.value, "source": lim.source}
                       for lim in (static.limits.limits if static.limits else ())],
            "live": None if live is None else {k: v for k, v in vars(live).items()},
            "live_problem": live_problem or None,
            "terms": [{"name": t.name, "value": t.value, "source": t.source} for t in terms],
            "effective_capacity": cap.value,
            "bound_by": cap.binding,
            "priority_headroom": headroom,
            "shedding_rules": len(governor.rules.rules),
            "shedding_file": governor.rules.path,
        }, indent=2))
        return 0
    print(f"PBX {config.pbx}: {static.path or '-'}")
    if static.limits is not None:
        for lim in static.limits.limits:
            value = "unset" if lim.value is None else f"{lim.value:g}"
            print(f"  {lim.name:20s} {value:>8s}   {lim.source}")
    else:
        print(f"  (no limits read: {static.problem})")
    if live is not None:
        shown = {k: v for k, v in vars(live).items() if v is not None and k not in ("pbx", "at")}
        print("live: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    else:
        print(f"live: - ({live_problem})")
    print("capacity terms:")
    for t in terms:
        value = "no limit" if t.value is None else str(t.value)
        print(f"  {t.name:8s} {value:>8s}   {t.source}")
    print(f"effective capacity: {cap.value} concurrent calls (bound by {cap.binding}); "
          f"{headroom} kept for priority callers")
    print(f"shedding: {len(governor.rules.rules)} rules from {governor.rules.path}")
    return 0


# -- models ------------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    """List the manifest's models and whether each is installed, or install one."""
    from agent.models import get_spec, install, load_manifest, locate, models_dir

    if args.action == "install":
        if not args.name:
            print("models install: name a model (see `pbx-agent models`)", file=sys.stderr)
            return 2
        spec = get_spec(args.name)
        base = Path(args.dir) if args.dir else models_dir()
        path = install(spec, base, url=args.url or "", sha256=args.sha256 or "")
        print(f"installed {spec.name} in {path}")
        return 0
    missing = 0
    for spec in load_manifest():
        status = locate(spec, Path(args.dir) if args.dir else None)
        if status.installed:
            state = f"installed  {status.path}"
        else:
            state = f"missing    install with: {spec.install}"
            missing += spec.default
        default = "default" if spec.default else "optional"
        print(f"{spec.name:28s} {spec.kind:4s} {default:8s} {state}")
    return 1 if missing else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `pbx-agent`."""
    p = argparse.ArgumentParser(prog="pbx-agent", description=__doc__)
    p.add_argument("--config", help="config file (default: $PBX_AGENT_CONFIG or "
                   "/etc/pbx-agent/agent.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the agent for the configured PBX")
    s.set_defaults(func=cmd_serve)
    d = sub.add_parser("demo", help="run one simulated call end to end on the embedded default")
    d.add_argument("--pbx", default="asterisk", choices=("asterisk", "freeswitch"))
    d.add_argument("--script", default="demo", help="builtin script name or a YAML file")
    d.add_argument("--quiet", action="store_true", help="table only")
    d.add_argument("--verbose", action="store_true", help="agent logs on stderr")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("check", help="validate config and models; non-zero exit on problems")
    c.add_argument("--verify", action="store_true", help="also checksum the model files")
    c.set_defaults(func=cmd_check)
    li = sub.add_parser("limits", help="print the PBX's limits, their sources and the "
                        "effective capacity")
    li.add_argument("--live", action="store_true",
                    help="also ask the running PBX (AMI / inbound ESL from capacity.live)")
    li.add_argument("--json", action="store_true", help="machine-readable output")
    li.set_defaults(func=cmd_limits)
    st = sub.add_parser("status", help="live calls, capacity, shedding level and recent latency "
                        "of the running agent (from its metrics endpoint)")
    st.add_argument("--url", help="metrics URL (default: kpi.metrics of the config)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    r = sub.add_parser("report", help="capacity-planning KPIs from the call records")
    r.add_argument("--since", default="24h", help="window start: 30m, 24h, 7d or an ISO date "
                   "(default 24h)")
    r.add_argument("--until", help="window end (default now)")
    r.add_argument("--db", help="call records file (default: kpi.records of the config)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("--html", metavar="FILE", help="write an HTML report with plots")
    r.set_defaults(func=cmd_report)

    ca = sub.add_parser("capacity", help="measure how many concurrent calls this box takes at "
                        "the latency and quality targets (simulated callers, real protocols)")
    ca.add_argument("--pbx", choices=("asterisk", "freeswitch"),
                    help="protocol to drive (default: the config's pbx)")
    ca.add_argument("--steps", default="1,2,4,6,8,10,12,16",
                    help="concurrent calls per step, comma-separated (default 1,2,4,...,16)")
    ca.add_argument("--step-s", type=float, default=120.0,
                    help="seconds per step (several turns per call; default 120)")
    ca.add_argument("--min-calls", type=int, default=10,
                    help="a step goes on until at least this many calls were placed, so low "
                    "steps sample the whole mix (default 10)")
    ca.add_argument("--p95-ms", type=float, default=1200.0, help="latency target (default 1200)")
    ca.add_argument("--completion", type=float, default=0.99,
                    help="completion target 0..1 (default 0.99)")
    ca.add_argument("--wer", type=float, default=0.15, help="STT word error target (default 0.15)")
    ca.add_argument("--mix", help="caller mix, e.g. faq=35,llm=25,transfer=15,silence=5,"
                    "bargein=10,hangup=10 (the default)")
    ca.add_argument("--seed", type=int, default=0)
    naive = ca.add_mutually_exclusive_group()
    naive.add_argument("--naive", action="store_true",
                       help="measure the naive baseline only (see README)")
    naive.add_argument("--compare-naive", action="store_true",
                       help="also measure the naive baseline and report the ratio")
    ca.add_argument("--out", help="report folder (default: <state_dir>/capacity of the config, "
                    "else ./capacity)")
    ca.add_argument("--target", metavar="HOST:PORT",
                    help="drive a running agent (its FastAGI or ESL listener) instead of "
                    "starting one")
    ca.add_argument("--metrics-url", help="the running agent's metrics endpoint (with --target)")
    ca.add_argument("--pid", type=int, help="the running agent's pid (with --target; default: "
                    "the process listening on the target port)")
    ca.add_argument("--calls-per-hour", type=float, help="busy-hour calls for Erlang B sizing")
    ca.add_argument("--aht", type=float, help="average handling time, s (default: measured)")
    ca.add_argument("--target-blocking", type=float, default=0.01,
                    help="blocking probability the sizing aims for (default 0.01)")
    ca.add_argument("--stop-after", type=int, default=2,
                    help="stop after this many failing steps in a row (default 2)")
    ca.add_argument("--warmup-calls", type=int, default=1,
                    help="unmeasured calls before the first step (default 1)")
    ca.set_defaults(func=cmd_capacity)

    m = sub.add_parser("models", help="list models, or `models install NAME`")
    m.add_argument("action", nargs="?", default="list", choices=("list", "install"))
    m.add_argument("name", nargs="?")
    m.add_argument("--dir", help="models directory (default $PBX_AGENT_MODELS_DIR or "
                   "/var/lib/pbx-agent/models)")
    m.add_argument("--url", help="download from this mirror instead of the manifest URL")
    m.add_argument("--sha256", help="expected sha256 when --url points at another archive")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pbx-agent` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (AgentError, ConfigError) as exc:
        print(f"pbx-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
