"""Per-turn response latency of one call at a time, FAQ path vs LLM path, on this machine.

    .venv/bin/python benchmarks/latency.py [--calls 2] [--script bench] [--json out.json]

Starts the agent in-process with the default config and models, places scripted calls through
the Asterisk simulator (FastAGI + AudioSocket over 127.0.0.1, real time), and prints
p50/p95 of the response latency (end of caller speech -> first non-silent agent frame, as the
caller measures it, endpointing included) per path, resident memory with all models loaded,
and time from start to ready.
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


async def main(calls: int, script_name: str) -> dict[str, object]:
    t0 = time.perf_counter()
    config = default_config()
    loop = asyncio.get_running_loop()
    engines = await loop.run_in_executor(None, load_engines, config)
    agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
    await agent.start()
    ready_s = time.perf_counter() - t0
    rss_ready = psutil.Process().memory_info().rss / (1 << 20)
    voice = PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15)
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--script", default="bench")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    out = asyncio.run(main(args.calls, args.script))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
