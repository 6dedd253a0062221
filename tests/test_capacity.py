"""`pbx-agent capacity`'s engine: pure parts on synthetic steps, then short real runs.

The real runs start `pbx-agent serve` with the real default models and place the default call
mix over the real protocols (FastAGI + AudioSocket; outbound ESL + unicast); they assert that
the run completes and reports, never how fast this machine is.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.sim.caller import Synth
from agent.sim.capacity import (
    CPU_METRIC,
    DEFAULT_MIX,
    WARMUP_SCRIPT,
    AgentLog,
    AudioBank,
    CallMix,
    CallSample,
    CapacityOptions,
    CapacityResult,
    StepResult,
    agent_config_text,
    format_markdown,
    format_summary,
    judge_step,
    naive_ratios,
    parse_mix,
    parse_stage_cpu,
    per_call_minute,
    percentile,
    resolve_script,
    run_capacity,
    safe_capacity,
    should_stop,
    sizing_lines,
    stage_cpu_delta,
    step_through,
    summarize_step,
    write_report,
)

MACHINE = {"cpu_count": 2, "cpu_model": "Test CPU", "ram_gib": 8.0, "platform": "Linux-test",
           "python": "3.11.7"}


def _step(n: int, passed: bool = True, p95: float | None = 800.0) -> StepResult:
    step = summarize_step(n, [], 10.0)
    step.calls, step.completed, step.completion = 4, 4, 1.0
    step.p50_ms, step.p95_ms, step.p99_ms = (None if p95 is None else p95 / 2), p95, p95
    step.passed = passed
    step.failures = [] if passed else ["p95 too slow"]
    return step


def _sample(script: str = "mix_faq", result: str = "DONE", duration_s: float = 30.0,
            latencies: tuple[float | None, ...] = (500.0, 700.0), *, expect: str = "DONE",
            call_id: str = "1.1", texts: tuple[str, ...] = ("hello there", "goodbye now"),
            **kw: object) -> CallSample:
    sample = CallSample(script=script, expect_result=expect, call_id=call_id,
                        callerid="+15550000001", started_s=0.0, duration_s=duration_s,
                        result=result, turn_latency_ms=list(latencies), turn_texts=list(texts),
                        wer_turns=[bool(t) for t in texts])
    for key, value in kw.items():
        setattr(sample, key, value)
    return sample


# -- options, mix ------------------------------------------------------------------------------

def test_options_normalize_and_validate() -> None:
    opts = CapacityOptions(steps=(4, 1, 2, 2))
    assert opts.steps == (1, 2, 4)
    assert opts.mix == dict(DEFAULT_MIX) and opts.step_s == 120.0
    assert (opts.p95_ms, opts.completion, opts.wer) == (1200.0, 0.99, 0.15)
    for bad in ({"pbx": "sip"}, {"steps": ()}, {"steps": (0, 1)}, {"step_s": 0},
                {"naive": True, "compare_naive": True}, {"target": "nohost"},
                {"target": "127.0.0.1:4573", "compare_naive": True},
                {"mix": {"faq": -1}}, {"mix": {"faq": 0}}, {"completion": 1.5},
                {"warmup_calls": -1}, {"stop_after_failures": 0}):
        with pytest.raises(ValueError):
            CapacityOptions(**bad)  # type: ignore[arg-type]


def test_parse_mix() -> None:
    assert parse_mix("faq=35, llm=25,transfer=0.5") == {"faq": 35.0, "llm": 25.0,
                                                         "transfer": 0.5}
    for bad in ("faq", "faq=x", "faq=-1", "", "=3"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_default_mix_scripts_exist_and_expect_a_result() -> None:
    mix = CallMix.load(DEFAULT_MIX)
    assert mix.names == tuple(DEFAULT_MIX)
    for script in mix.scripts:
        assert script.name.startswith("mix_") and script.expect_result in ("DONE", "TRANSFER")
        assert script.turns
    by_name = dict(zip(mix.names, mix.scripts, strict=True))
    assert by_name["transfer"].expect_result == "TRANSFER"
    assert any(t.text == "" for t in by_name["silence"].turns)
    assert by_name["bargein"].turns[0].barge_in_after_ms is not None
    assert by_name["hangup"].turns[-1].hangup_after_ms is not None
    with pytest.raises(ValueError):
        resolve_script("no-such-script")


def test_mix_drawing_is_seeded_and_honours_weights() -> None:
    mix = CallMix.load({"faq": 35, "llm": 25, "transfer": 15, "silence": 5, "bargein": 10,
                        "hangup": 10, "demo": 0})
    assert "demo" not in mix.names  # weight 0: never drawn

    def draws(seed: int) -> list[int]:
        rng = random.Random(seed)
        return [mix.draw(rng) for _ in range(200)]

    assert draws(7) == draws(7) and draws(7) != draws(8)
    rng = random.Random(1)
    draws = 20000
    counts = [0] * len(mix.names)
    for _ in range(draws):
        counts[mix.draw(rng)] += 1
    total = sum(mix.weights)
    for name, weight, count in zip(mix.names, mix.weights, counts, strict=True):
        assert abs(count / draws - weight / total) < 0.015, (name, count)


class _ToneSynth:
    """A synthesizer that counts its calls and returns a little audio."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def synthesize(self, text: str) -> bytes:
        self.texts.append(text)
        return b"\x10\x27\xf0\xd8" * 2000


def test_audio_bank_synthesizes_each_text_once() -> None:
    mix = CallMix.load({"faq": 1, "bargein": 1, "silence": 1})
    synth = _ToneSynth()
    bank = AudioBank.render(mix, synth, variants=3)
    texts = {t.text for s in (*mix.scripts, WARMUP_SCRIPT) for t in s.turns if t.text}
    assert sorted(synth.texts) == sorted(texts)  # three noise variants, one synthesis each
    assert len(bank.warmup) == len(WARMUP_SCRIPT.turns) and bank.warmup[0]
    silence = mix.names.index("silence")
    audio = bank.turn_audio(silence, 1)
    assert len(audio) == len(mix.scripts[silence].turns)
    assert audio[1] == b"" and audio[0]
    assert bank.turn_audio(silence, 0)[0] != audio[0]  # another noise seed
    assert bank.turn_audio(silence, 4) == bank.turn_audio(silence, 1)


# -- steps -------------------------------------------------------------------------------------

def test_safe_capacity_selection() -> None:
    assert safe_capacity([_step(1), _step(2), _step(4)]) == 4
    assert safe_capacity([_step(1), _step(2), _step(4, False), _step(6)]) == 2  # not monotonic
    assert safe_capacity([_step(4, False), _step(2), _step(1)]) == 2  # any order
    assert safe_capacity([_step(1, False), _step(2)]) == 0
    assert safe_capacity([]) == 0


def test_early_stop() -> None:
    assert not should_stop([_step(1), _step(2, False)], 2)
    assert should_stop([_step(1), _step(2, False), _step(4, False)], 2)
    assert not should_stop([_step(1, False), _step(2), _step(4, False)], 2)
    assert should_stop([_step(1, False)], 1)

    verdicts = {1: True, 2: True, 4: False, 6: True, 8: False, 10: False, 12: True, 16: True}
    ran: list[int] = []
    lines: list[str] = []

    def run_step(n: int) -> StepResult:
        ran.append(n)
        return _step(n, verdicts[n])

    mode = step_through(CapacityOptions(), run_step, lines.append, settle_s=0)
    assert ran == [1, 2, 4, 6, 8, 10]  # 8 and 10 failed in a row
    assert mode.stopped_early and mode.safe_capacity == 2
    assert any("step 1/8: 1 concurrent" in line for line in lines)
    assert any("FAIL" in line for line in lines)

    ran.clear()
    mode = step_through(CapacityOptions(steps=(1, 2, 4), stop_after_failures=1),
                        run_step, lines.append, settle_s=0)
    assert ran == [1, 2, 4] and not mode.stopped_early and mode.safe_capacity == 2
    dead = step_through(CapacityOptions(steps=(1, 2)), run_step, lines.append,
                        alive=lambda: False, settle_s=0)
    assert dead.steps == [] and dead.error and dead.safe_capacity == 0


def test_judge_step_against_targets() -> None:
    opts = CapacityOptions()
    good = summarize_step(2, [_sample(), _sample(call_id="1.2")], 60.0)
    assert judge_step(good, opts).passed and good.failures == []
    slow = summarize_step(2, [_sample(latencies=(900.0, 1500.0))], 60.0)
    assert not judge_step(slow, opts).passed and "p95" in slow.failures[0]
    busy = summarize_step(2, [_sample(), _sample(result="BUSY", latencies=())], 60.0)
    assert busy.refused == 1 and busy.completion == 0.5
    assert not judge_step(busy, opts).passed
    wrong = _sample()
    wrong.wers = [0.5]
    assert not judge_step(summarize_step(1, [wrong], 60.0), opts).passed
    silent = summarize_step(1, [_sample(latencies=(None, None))], 60.0)
    assert not judge_step(silent, opts).passed  # no latency measured: cannot pass
    assert not judge_step(summarize_step(1, [], 60.0), opts).passed


def test_per_call_minute_arithmetic() -> None:
    assert per_call_minute({"stt": 3.0, "llm": 6.0}, 180.0) == {"stt": 1.0, "llm": 2.0}
    assert per_call_minute(None, 180.0) is None
    assert per_call_minute({"stt": 1.0}, 0.0) is None
    assert stage_cpu_delta({"stt": 1.0, "llm": 2.0}, {"stt": 4.0, "llm": 2.5, "tts": 1.0}) == \
        {"llm": 0.5, "stt": 3.0, "tts": 1.0}
    assert stage_cpu_delta(None, {"stt": 1.0}) is None

    samples = [_sample(duration_s=120.0), _sample(duration_s=240.0, call_id="1.2")]
    step = summarize_step(2, samples, 60.0, cpu_s=30.0, sim_cpu_s=6.0, rss_peak=512 << 20,
                          stage_cpu_s={"stt": 6.0, "llm": 12.0, "tts": 3.0, "other": 9.0},
                          cpu_count=2)
    assert step.call_minutes == pytest.approx(6.0)
    per = step.cpu_s_per_call_min
    assert per == pytest.approx({"stt": 1.0, "llm": 2.0, "tts": 0.5, "other": 1.5, "total": 5.0})
    assert step.cpu_core_percent == pytest.approx(50.0)
    assert step.cpu_box_percent == pytest.approx(25.0)
    assert step.sim_cpu_core_percent == pytest.approx(10.0)
    assert step.rss_peak_mib == pytest.approx(512.0)
    assert step.latency_n == 4 and step.p50_ms == pytest.approx(600.0)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
    assert percentile([], 0.5) is None


def test_call_completion_and_word_error() -> None:
    assert _sample().completed
    assert not _sample(result="BUSY").completed and _sample(result="BUSY").refused
    assert not _sample(result="ERROR").completed
    assert not _sample(result="TRANSFER").completed  # expected DONE
    assert not _sample(error="no end").completed
    hung = _sample(result="", hangup_script=True, hung_up=True)
    assert hung.completed  # Asterisk takes no result after the caller hung up

    call = _sample(texts=("what time do you open", "", "thank you goodbye"))
    call.wer_turns = [True, False, True]
    call.score_heard(["what time do you open", "thank you bye"], ["faq", "goodbye"])
    assert call.wers == [0.0, pytest.approx(1 / 3)]
    assert call.paths == ["faq", "goodbye"]
    call.score_heard(["what time", "do you open", "thank you goodbye"])  # split utterance
    assert call.wers == [0.0]
    barge = _sample(texts=("sorry where are you", "bye now"))
    barge.wer_turns = [False, True]
    barge.score_heard(["where are you", "bye now"])
    assert barge.wers == [0.0]  # the barge-in turn is not counted
    refused = _sample(result="BUSY")
    refused.score_heard([])
    assert refused.wers == []


def test_path_latencies_align_with_spoken_turns() -> None:
    call = _sample(texts=("where can i park", "", "thats all"), latencies=(400.0, None, 600.0))
    call.paths = ["faq", "goodbye"]
    assert call.path_latencies() == [("faq", 400.0), ("goodbye", 600.0)]
    call.paths = ["faq"]
    assert call.path_latencies() == []
    step = summarize_step(1, [_sample(texts=("a b", "c d"), latencies=(400.0, 800.0),
                                      paths=["faq", "llm"])], 30.0)
    assert step.by_path["faq"]["n"] == 1 and step.by_path["llm"]["p95_ms"] == 800.0


def test_agent_log_parse() -> None:
    log = "\n".join([
        "2026-01-01 INFO agent.runtime.aio: call 17.1: turn 1 path=faq heard='Where can I park?'",
        "2026-01-01 INFO agent.call.session: call 17.2: heard 'hi' (120 ms)",
        "2026-01-01 INFO agent.runtime.aio: call 17.1: turn 2 path=goodbye heard=\"That's all\"",
        "2026-01-01 INFO agent.runtime.aio: call 17.1: DONE caller-goodbye ",
        "2026-01-01 INFO agent.runtime.aio: call 17.3: refused (capacity) 3 of 3 in use",
        "2026-01-01 INFO agent.runtime.aio: call 17.2: TRANSFER intent:front-desk PJSIP/100",
    ])
    parsed = AgentLog.parse(log)
    assert parsed.heard["17.1"] == ["Where can I park?", "That's all"]
    assert parsed.paths["17.1"] == ["faq", "goodbye"]
    assert parsed.ended == {"17.1": ("DONE", "caller-goodbye"), "17.3": ("BUSY", "capacity"),
                            "17.2": ("TRANSFER", "intent:front-desk")}


PROM_TEXT = f"""# HELP pbx_agent_engine_cpu_seconds CPU seconds per stage.
# TYPE pbx_agent_engine_cpu_seconds counter
{CPU_METRIC}{{stage="stt"}} 12.5
{CPU_METRIC}{{stage="llm"}} 30.0
{CPU_METRIC}{{stage="tts"}} 4.25
{CPU_METRIC}{{stage="other"}} 8.0
# HELP pbx_agent_active_calls Calls now.
# TYPE pbx_agent_active_calls gauge
pbx_agent_active_calls 2.0
"""


def test_parse_stage_cpu() -> None:
    assert parse_stage_cpu(PROM_TEXT) == {"stt": 12.5, "llm": 30.0, "tts": 4.25, "other": 8.0}
    assert parse_stage_cpu("") == {}


def test_parse_stage_cpu_reads_the_agents_own_metrics() -> None:
    from agent.kpi.metrics import AgentMetrics

    metrics = AgentMetrics("asterisk")
    metrics.bind(cpu_seconds=lambda: {"stt": 1.5, "llm": 2.0, "tts": 0.5, "other": 0.25})
    text = metrics.render().decode()
    assert parse_stage_cpu(text) == {"stt": 1.5, "llm": 2.0, "tts": 0.5, "other": 0.25}


# -- the started agent's config ----------------------------------------------------------------

def test_agent_config_text_is_accepted_by_the_agent(tmp_path: Path) -> None:
    base = ("turn:\n  no_input_timeout_ms: 7000\nmax_calls: 1\nstate_dir: /nonexistent\n"
            "capacity:\n  drain_timeout_s: 5\n  live: {host: 127.0.0.1, port: 5038, "
            "username: u, secret: s}\nkpi:\n  mask_caller: none\n")
    opts = CapacityOptions(pbx="asterisk", steps=(1, 2, 4), base_config=base)
    text = agent_config_text(opts, naive=True, state_dir=str(tmp_path), listen_ports=(4573, 4574),
                             metrics_port=9999, shedding_path=str(tmp_path / "shed.yaml"))
    cfg = parse_config(text, "<capacity>")
    assert cfg.pbx == "asterisk" and cfg.naive and cfg.max_calls == 6
    assert cfg.state_dir == str(tmp_path) and cfg.log_level == "INFO"
    assert cfg.capacity.engine_calls == 6 and cfg.capacity.pbx_conf == "none"
    assert cfg.capacity.live is None and cfg.capacity.drain_timeout_s == 5
    assert cfg.capacity.shedding == str(tmp_path / "shed.yaml")
    assert cfg.kpi.metrics is not None and cfg.kpi.metrics.port == 9999
    assert cfg.kpi.records == "" and cfg.kpi.mask_caller == "none"
    assert cfg.turn.no_input_timeout_ms == 7000
    assert cfg.listen.fastagi.port == 4573 and cfg.listen.audiosocket.port == 4574

    fs = agent_config_text(CapacityOptions(pbx="freeswitch", steps=(1,)), naive=False,
                           state_dir=str(tmp_path), listen_ports=(8084,), metrics_port=9998,
                           shedding_path="")
    cfg = parse_config(fs, "<capacity>")
    assert cfg.pbx == "freeswitch" and not cfg.naive and cfg.max_calls == 3
    assert cfg.listen.esl.port == 8084 and cfg.transfers["emergency"] == "1999"
    rel = CapacityOptions(base_config="agent: clinic.yaml\n",
                          base_config_path=str(tmp_path / "etc" / "agent.yaml"))
    text = agent_config_text(rel, naive=False, state_dir="", listen_ports=(1, 2),
                             metrics_port=3, shedding_path="")
    assert f"agent: {tmp_path / 'etc' / 'clinic.yaml'}" in text
    with pytest.raises(ValueError):
        agent_config_text(CapacityOptions(base_config="- a list"), naive=False, state_dir="",
                          listen_ports=(1, 2), metrics_port=3, shedding_path="")


# -- reports -----------------------------------------------------------------------------------

def _result(naive: bool = True, **options: object) -> CapacityResult:
    opts = CapacityOptions(steps=(1, 2, 4), compare_naive=naive, **options)  # type: ignore[arg-type]
    samples = [_sample(), _sample(call_id="1.2", result="TRANSFER", expect="TRANSFER")]
    steps = []
    for n, p95 in ((1, 600.0), (2, 900.0), (4, 1500.0)):
        step = summarize_step(n, samples, 60.0, cpu_s=20.0 * n, rss_peak=700 << 20,
                              stage_cpu_s={"stt": 1.0, "llm": 4.0, "tts": 1.0, "other": 0.5})
        step.p95_ms = p95
        steps.append(judge_step(step, opts))
    result = CapacityResult(options=opts.summary(), machine=MACHINE,
                            started_at="2026-01-02T03:04:05Z", finished_at="2026-01-02T03:14:05Z",
                            steps=steps, safe_capacity=safe_capacity(steps),
                            agent_ready_s=12.0, agent_rss_ready_mib=650.0,
                            sizing=sizing_lines(opts, safe_capacity(steps), steps))
    if naive:
        nsteps = [judge_step(summarize_step(1, samples, 60.0), opts),
                  judge_step(summarize_step(2, samples, 60.0), opts)]
        nsteps[0].p95_ms, nsteps[1].p95_ms = 1000.0, 2500.0
        for s in nsteps:
            judge_step(s, opts)
        result.naive_steps = nsteps
        result.naive_safe_capacity = safe_capacity(nsteps)
        result.ratios = naive_ratios(steps, nsteps, result.safe_capacity,
                                     result.naive_safe_capacity)
    return result


def test_naive_ratios() -> None:
    result = _result()
    assert result.safe_capacity == 2 and result.naive_safe_capacity == 1
    assert result.ratios is not None
    assert result.ratios["safe_capacity_ratio"] == 2.0
    rows = result.ratios["p95_at_equal_steps"]
    assert [r["concurrent"] for r in rows] == [1, 2]
    assert rows[1]["naive_over_normal"] == pytest.approx(2500.0 / 900.0)
    assert naive_ratios([], [], 3, 0)["safe_capacity_ratio"] is None


def test_erlang_sizing_lines() -> None:
    result = _result(naive=False, calls_per_hour=60.0, aht_s=180.0)
    assert result.sizing and "3.00 erlangs" in result.sizing[0]
    assert "blocking with 2 calls" in result.sizing[1]
    measured = _result(naive=False, calls_per_hour=60.0)
    assert "AHT: mean call length measured" in measured.sizing[0]
    assert _result(naive=False).sizing == []


def test_write_report(tmp_path: Path) -> None:
    result = _result(calls_per_hour=120.0, aht_s=150.0)
    paths = write_report(result, tmp_path / "capacity")
    assert paths["json"].name == "capacity-20260102T031405Z.json"
    data = json.loads(paths["json"].read_text())
    assert data["safe_capacity"] == 2 and isinstance(data["safe_capacity"], int)
    assert data["finished_at"] == "2026-01-02T03:14:05Z"
    for key in ("started_at", "machine", "options", "steps", "naive_steps",
                "naive_safe_capacity", "ratios", "sizing"):
        assert key in data, key
    assert data["steps"][0]["cpu_s_per_call_min"]["llm"] > 0
    assert json.loads(paths["latest"].read_text()) == data

    md = paths["md"].read_text()
    assert "**Safe capacity: 2 concurrent calls**" in md
    assert "| concurrent | calls placed | p50 ms | p95 ms | p99 ms | completion | WER |" in md
    assert md.count("\n| 4 | 2 |") == 1 and "FAIL: p95 1500 ms > 1200 ms" in md
    assert md.count("\n| **2** | 2 |") == 1 and md.count("\n| **1** | 2 |") == 1
    assert "## Naive baseline" in md and "naive **1** (× 2.00)" in md
    assert "## Erlang B sizing" in md and "Test CPU" in md
    assert "CPU-s/call-min llm" in md

    png = paths["png"].read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG")

    summary = format_summary(result)
    assert summary.startswith("safe capacity: 2 concurrent") and "naive baseline: 1" in summary
    assert "| 1 |" in format_markdown(_result(naive=False))


def test_engine_report_is_read_by_the_governor(tmp_path: Path) -> None:
    from agent.capacity.admission import engine_capacity_from_report

    paths = write_report(_result(naive=False), tmp_path)
    term = engine_capacity_from_report(str(paths["latest"]))
    assert term.value == 2 and "2026-01-02T03:14:05Z" in term.source


# -- real runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caller_voice() -> Iterator[Synth]:
    from agent.sim.capacity import default_caller_voice

    yield default_caller_voice()


def _check_real_run(result: CapacityResult, steps: tuple[int, ...], out: Path,
                    lines: list[str]) -> None:
    print("\n" + format_summary(result))
    assert [s.concurrent for s in result.steps] == list(steps)
    assert not result.error
    for step in result.steps:
        assert step.calls >= 1, step
        assert step.latency_n >= 1 and step.p50_ms is not None and step.p95_ms is not None
        assert step.p99_ms is not None
        assert step.cpu_core_percent is not None and step.rss_peak_mib is not None
        assert step.stage_cpu_s is not None and step.cpu_s_per_call_min is not None
        assert step.errors == 0, step.call_log
        assert step.wer_n >= 1, step.call_log  # the agent's log was read
    assert result.agent_ready_s is not None
    paths = write_report(result, out)
    for kind in ("json", "md", "png", "latest"):
        assert paths[kind].is_file() and paths[kind].stat().st_size > 0, kind
    data = json.loads(paths["latest"].read_text())
    assert isinstance(data["safe_capacity"], int) and data["finished_at"].endswith("Z")
    assert any("step 1/" in line for line in lines)
    assert any(" s, " in line and "calls done" in line for line in lines)  # progress in steps
    print(paths["md"].read_text())


def test_real_short_run_asterisk(tmp_path: Path, caller_voice: Synth) -> None:
    lines: list[str] = []
    opts = CapacityOptions(pbx="asterisk", steps=(1, 2), step_s=15.0, seed=1,
                           min_calls=0)
    result = run_capacity(opts, progress=lines.append, synth=caller_voice)
    _check_real_run(result, (1, 2), tmp_path, lines)


def test_real_short_run_freeswitch(tmp_path: Path, caller_voice: Synth) -> None:
    lines: list[str] = []
    opts = CapacityOptions(pbx="freeswitch", steps=(1,), step_s=15.0, seed=2,
                           min_calls=0)
    result = run_capacity(opts, progress=lines.append, synth=caller_voice)
    _check_real_run(result, (1,), tmp_path, lines)


def test_min_calls_is_validated_and_reported() -> None:
    with pytest.raises(ValueError, match="min_calls"):
        CapacityOptions(min_calls=-1)
    assert CapacityOptions(min_calls=7).summary()["min_calls"] == 7
