"""Flow turns versus FAQ and LLM turns, and a calendar that stalls while callers book.

    .venv/bin/python benchmarks/flows.py [--calls 3] [--stall-s 30] [--stall-calls 4]
                                         [--json out.json]

Asterisk in-process (default config and models, FastAGI + AudioSocket over 127.0.0.1, real
time); the calendar is `agent.sim.webhooks.WebhookServer` on 127.0.0.1.

1. Latency by path: `--calls` sequential calls of the `booking` script (a FAQ question, the
   booking flow, an LLM question, goodbye). Response latency per turn from the call records
   (end of caller speech -> first agent audio, endpointing included), p50/p95 per path.
2. Stall: the calendar holds every request for `--stall-s` seconds while `--stall-calls`
   callers book at once. Per call: the response latency of the day/time turn (first audio =
   the cached "Let me check the calendar."), how long the availability call took and why it
   ended (timeout, breaker-open), the outcome, the call's length; and whether any caller
   waited on the stall. One more caller books after them, while the breaker is open.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from agent.config import Config, default_config, parse_config
from agent.engine.bundle import EngineBundle
from agent.engine.tts import PiperTts
from agent.kpi.model import CallRecord
from agent.kpi.records import RecordStore, read_records
from agent.kpi.report import percentile
from agent.models import require
from agent.runtime.aio import AsteriskAgent
from agent.runtime.engines import load_engines
from agent.sim.caller import CallerScript, builtin_script, parse_script
from agent.sim.run import SimCallReport, run_sim_call
from agent.sim.webhooks import WebhookServer


def config_for(url: str, cooldown_s: float = 60.0) -> Config:
    """The default config with the calendar webhooks pointed at the test server."""
    base = default_config()
    extra = parse_config(
        "transfers: {front-desk: '1000', billing: '1001', emergency: '1999'}\n"
        "integrations:\n"
        f"  calendar-availability: {{url: '{url}/calendar/availability', idempotent: true,\n"
        "    timeout_ms: 1500, retries: 1,\n"
        "    breaker: {failures: 3, window_s: 60, slow_ms: 1200, "
        f"cooldown_s: {cooldown_s}}}}}\n"
        f"  calendar-booking: {{url: '{url}/calendar/bookings', timeout_ms: 2000}}\n"
        f"  messages: {{url: '{url}/messages'}}\n"
        "sidework: {path: 'off'}\n", "bench.yaml")
    return dataclasses.replace(
        base, max_calls=8, integrations=extra.integrations, sidework=extra.sidework,
        capacity=dataclasses.replace(base.capacity, pbx_conf="none", engine_calls=0,
                                     capacity_report="/nonexistent.json"))


async def place_calls(config: Config, engines: EngineBundle, voice: PiperTts, db: Path,
                      scripts: list[CallerScript], concurrent: bool,
                      then: tuple[CallerScript, ...] = ()) -> list[SimCallReport]:
    """Calls through the Asterisk simulator, records written to ``db``; ``then`` are placed
    one by one on the same agent after the first batch."""
    agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
    store = RecordStore(str(db))
    store.start()
    agent.kpi.store = store
    await agent.start()
    try:
        port = agent.fastagi.port
        if concurrent:
            out = list(await asyncio.gather(*(
                run_sim_call("127.0.0.1", port, s, voice, seed=i)
                for i, s in enumerate(scripts))))
        else:
            out = [await run_sim_call("127.0.0.1", port, s, voice, seed=i)
                   for i, s in enumerate(scripts)]
        for i, s in enumerate(then):
            out.append(await run_sim_call("127.0.0.1", port, s, voice, seed=100 + i))
        return out
    finally:
        await agent.close()
        store.close()


def by_path(records: list[CallRecord]) -> dict[str, dict[str, Any]]:
    """n, p50, p95 of the response latency per turn path."""
    values: dict[str, list[float]] = {}
    for rec in records:
        for turn in rec.turns:
            if turn.response_ms is not None:
                values.setdefault(turn.path, []).append(turn.response_ms)
    return {p: {"n": len(v), "p50_ms": round(percentile(v, 50)),
                "p95_ms": round(percentile(v, 95))} for p, v in sorted(values.items())}


def stall_script(i: int) -> CallerScript:
    """A caller who books, hears the fallback question, and says yes."""
    return parse_script({
        "name": f"stall-{i}", "caller": {"callerid": f"+1415555030{i}"},
        "voice": {"length_scale": 1.15, "noise_snr_db": 35, "mulaw": False},
        "turns": [{"say": "Hi, I'd like to book an appointment."},
                  {"say": "My name is John Smith."},
                  {"dtmf": "5551234567#"},
                  {"say": "Monday at 10 a.m."},
                  {"say": "Yes, please."}]})


def main() -> None:
    """Run both measurements and print them."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--stall-s", type=float, default=30.0)
    ap.add_argument("--stall-calls", type=int, default=4)
    ap.add_argument("--cooldown-s", type=float, default=60.0,
                    help="the calendar breaker's cool-down (a call lasts ~35 s: 60 keeps it "
                         "open for the caller after the stall batch; 30 shows a half-open trial)")
    ap.add_argument("--skip-paths", action="store_true", help="only the stall measurement")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    engines = load_engines(default_config())
    voice = PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15,
                     deterministic=True)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with WebhookServer() as server:
            if args.skip_paths:
                args.calls = 0
            config = config_for(server.url)
            db = Path(tmp) / "paths.sqlite"
            reports = asyncio.run(place_calls(config, engines, voice, db,
                                              [builtin_script("booking")] * args.calls, False))
            records = read_records(str(db))
            out["paths"] = by_path(records)
            out["path_calls"] = [{"result": r.result, "reason": r.reason} for r in reports]
            out["bookings"] = len(server.bookings)
        if args.calls:
            print(f"latency by path over {args.calls} booking calls (ms, endpointing included):")
            for path, row in out["paths"].items():
                print(f"  {path:8s} n={row['n']:3d}  p50 {row['p50_ms']:5d}  "
                      f"p95 {row['p95_ms']:5d}")
            print(f"  results: {[c['result'] for c in out['path_calls']]}, "
                  f"bookings made: {out['bookings']}")

        with WebhookServer() as server:
            server.stall_s = args.stall_s
            server.mode = "stall"
            config = config_for(server.url, args.cooldown_s)
            db = Path(tmp) / "stall.sqlite"
            reports = asyncio.run(place_calls(
                config, engines, voice, db,
                [stall_script(i) for i in range(args.stall_calls)], True,
                then=(stall_script(9),)))
            still_stalling = server.stalling
            unanswered = sum(1 for r in server.requests if not r.answered)
            server.release()
        recs = {r.pbx_call_id: r for r in read_records(str(db))}
        rows = []
        for rep in reports:
            rec = recs[rep.call_id]
            day_turn = next((t for t in rec.turns if "monday" in t.caller_text.lower()), None)
            calls = [{"error": i.error, "latency_ms": round(i.latency_ms),
                      "attempts": i.attempts, "breaker": i.breaker} for i in rec.integrations]
            rows.append({"result": rep.result, "reason": rep.reason,
                         "flow": [(f.name, f.outcome) for f in rec.flows],
                         "day_turn_response_ms": None if day_turn is None or
                         day_turn.response_ms is None else round(day_turn.response_ms),
                         "integrations": calls, "call_s": round(rec.duration_s, 1)})
        out["stall"] = {"stall_s": args.stall_s, "calls": rows,
                        "still_stalling_at_end": still_stalling,
                        "requests_never_answered": unanswered}
    print(f"calendar stalling {args.stall_s:.0f} s, {args.stall_calls} callers booking at once, "
          "then one more caller:")
    for i, row in enumerate(rows):
        after = " (after)" if i >= args.stall_calls else ""
        print(f"  call {i}{after}: {row['result']} {row['reason']} flow={row['flow']} "
              f"day-turn first audio {row['day_turn_response_ms']} ms, availability "
              f"{row['integrations']}, call {row['call_s']} s")
    print(f"  requests still held by the calendar when the calls were over: {still_stalling}"
          f" (never answered: {unanswered})")
    engines.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
