"""Per-turn response latency of one call at a time, FAQ path vs LLM path, on this machine.

    .venv/bin/python benchmarks/latency.py [--pbx asterisk|freeswitch|both] [--calls 2]
                                           [--script bench] [--json out.json]

Asterisk: starts the agent in-process with the default config and models and places scripted
calls through the Asterisk simulator (FastAGI + AudioSocket over 127.0.0.1, real time).
FreeSWITCH: starts `pbx-agent serve` (gevent) as a child process and places the same calls
through the FreeSWITCH simulator (outbound ESL + unicast UDP). Prints, per PBX, p50/p95 of the
response latency (end of caller speech -> first non-silent agent frame, as the caller measures
it, endpointing included) per path, resident memory with all models loaded, and time from
start to ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import psutil

from agent.config import default_config
from agent.engine.tts import PiperTts
from agent.models import require
from agent.runtime.aio import AsteriskAgent
from agent.runtime.engines import load_engines
from agent.sim.caller import builtin_script
from agent.sim.run import run_sim_call


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(by_path: dict[str, list[float]]) -> dict[str, dict[str, int]]:
    """n, p50, p95 and mean per path."""
    return {path: {"n": len(v), "p50_ms": round(pct(v, 0.5)), "p95_ms": round(pct(v, 0.95)),
                   "mean_ms": round(statistics.fmean(v))} for path, v in sorted(by_path.items())}


def run_freeswitch(calls: int, script_name: str) -> dict[str, object]:
    """The same calls against the gevent FreeSWITCH agent in a child process."""
    from agent.sim.process import AgentProcess, free_port

    port = free_port()
    cfg = (f"pbx: freeswitch\nlisten:\n  esl: 127.0.0.1:{port}\nlog_level: INFO\n"
           "transfers: {front-desk: '1000', billing: '1001', emergency: '1999'}\n")
    voice = PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15,
                     deterministic=True)
    script = builtin_script(script_name)
    by_path: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with AgentProcess(cfg) as proc:
        ready_s = time.perf_counter() - t0
        assert proc.proc is not None
        child = psutil.Process(proc.proc.pid)
        rss_ready = child.memory_info().rss / (1 << 20)
        for i in range(calls):
            report = asyncio.run(run_sim_call("127.0.0.1", port, script, voice, seed=i,
                                              pbx="freeswitch"))
            for row in report.rows:
                if row.latency_ms is not None:
                    from agent.sim.process import heard_turns

                    turns = heard_turns(proc.log(), report.call_id)
                    idx = report.rows.index(row)
                    path = turns[idx][1] if idx < len(turns) else "?"
                    by_path.setdefault(path, []).append(row.latency_ms)
            print(f"freeswitch call {i + 1}/{calls}: {report.result} "
                  f"{[round(r.latency_ms or -1) for r in report.rows]} "
                  f"max queued frames {report.pbx.max_inflight_frames}", flush=True)
        rss_end = child.memory_info().rss / (1 << 20)
    return {"ready_s": round(ready_s, 2), "rss_ready_mib": round(rss_ready),
            "rss_end_mib": round(rss_end), "paths": summarize(by_path)}


async def main(calls: int, script_name: str) -> dict[str, object]:
    t0 = time.perf_counter()
    config = default_config()
    loop = asyncio.get_running_loop()
    engines = await loop.run_in_executor(None, load_engines, config)
    agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
    await agent.start()
    ready_s = time.perf_counter() - t0
    rss_ready = psutil.Process().memory_info().rss / (1 << 20)
    voice = PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15,
                     deterministic=True)
    script = builtin_script(script_name)
    by_path: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {"stt_ms": [], "llm_first_token_ms": []}

    def heard(uniqueid: str) -> list[tuple[str, str]]:
        for s in agent.finished:
            if s.uniqueid == uniqueid:
                return [(t.caller_text, t.path) for t in s.outcome.turns]
        return []

    try:
        for i in range(calls):
            report = await run_sim_call("127.0.0.1", agent.fastagi.port, script, voice,
                                        None, heard, seed=i)
            for row in report.rows:
                if row.latency_ms is not None:
                    by_path.setdefault(row.path or "?", []).append(row.latency_ms)
            outcome = next(s.outcome for s in agent.finished
                           if s.uniqueid == report.pbx.uniqueid)
            for t in outcome.turns:
                stages["stt_ms"].append(t.stt_ms)
                if t.llm_first_token_ms is not None:
                    stages["llm_first_token_ms"].append(t.llm_first_token_ms)
            print(f"call {i + 1}/{calls}: {report.result} "
                  f"{[(r.path, round(r.latency_ms or -1)) for r in report.rows]}", flush=True)
    finally:
        await agent.close()
        engines.close()
    rss_peak = psutil.Process().memory_info().rss / (1 << 20)
    result: dict[str, object] = {
        "ready_s": round(ready_s, 2), "rss_ready_mib": round(rss_ready), "rss_end_mib":
        round(rss_peak), "load_times_s": {k: round(v, 2) for k, v in engines.load_times_s.items()},
        "stt_backend": engines.stt_backend, "paths": {}, "stages": {},
    }
    print(f"\nstart to ready: {ready_s:.1f} s   RSS ready {rss_ready:.0f} MiB, "
          f"after calls {rss_peak:.0f} MiB   (stt={engines.stt_backend})")
    print(f"{'path':10s} {'n':>3s} {'p50 ms':>8s} {'p95 ms':>8s} {'mean ms':>8s}")
    for path, values in sorted(by_path.items()):
        row = {"n": len(values), "p50_ms": round(pct(values, 0.5)),
               "p95_ms": round(pct(values, 0.95)), "mean_ms": round(statistics.fmean(values))}
        result["paths"][path] = row  # type: ignore[index]
        print(f"{path:10s} {row['n']:3d} {row['p50_ms']:8d} {row['p95_ms']:8d} "
              f"{row['mean_ms']:8d}")
    for name, values in stages.items():
        if values:
            result["stages"][name] = {"p50": round(pct(values, 0.5)),  # type: ignore[index]
                                      "p95": round(pct(values, 0.95))}
            print(f"stage {name}: p50 {pct(values, 0.5):.0f} ms, p95 {pct(values, 0.95):.0f} ms")
    return result


def side_by_side(results: dict[str, dict[str, object]]) -> None:
    """Print the PBX kinds' figures next to each other."""
    kinds = list(results)
    print("\n" + " " * 24 + "".join(f"{k:>22s}" for k in kinds))
    for key, label in (("ready_s", "start to ready (s)"), ("rss_ready_mib", "RSS ready (MiB)"),
                       ("rss_end_mib", "RSS after calls (MiB)")):
        print(f"{label:24s}" + "".join(f"{results[k][key]!s:>22s}" for k in kinds))
    paths = sorted({p for k in kinds for p in results[k]["paths"]})  # type: ignore[attr-defined]
    for path in paths:
        cells = []
        for k in kinds:
            row = results[k]["paths"].get(path)  # type: ignore[attr-defined]
            cells.append(f"{row['p50_ms']} / {row['p95_ms']} (n={row['n']})" if row else "-")
        print(f"{path + ' p50/p95 ms':24s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pbx", choices=("asterisk", "freeswitch", "both"), default="asterisk")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--script", default="bench")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    results: dict[str, dict[str, object]] = {}
    if args.pbx in ("asterisk", "both"):
        results["asterisk"] = asyncio.run(main(args.calls, args.script))
    if args.pbx in ("freeswitch", "both"):
        results["freeswitch"] = run_freeswitch(args.calls, args.script)
    if len(results) > 1:
        side_by_side(results)
    out: dict[str, object] = results if len(results) > 1 else next(iter(results.values()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
