"""The call records store: masking, SQLite round trips, the writer thread's failure modes."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.kpi import records
from agent.kpi.model import (
    FLOW_OUTCOMES,
    OUTCOMES,
    CallRecord,
    FlowRun,
    IntegrationCall,
    TurnKpi,
    classify_outcome,
)
from agent.kpi.records import (
    MASK_MODES,
    RecordStore,
    count_records,
    default_records_path,
    mask_caller,
    read_records,
)

REPO = Path(__file__).resolve().parents[1]


def make_record(call_id: str, started_at: float = 1_700_000_000.0,
                outcome: str = "completed") -> CallRecord:
    """A small record for tests that do not care about its turns."""
    return CallRecord(call_id=call_id, pbx="asterisk", pbx_call_id=f"pbx-{call_id}",
                      caller="*******0177", did="100", started_at=started_at,
                      answered_at=started_at + 0.5, ended_at=started_at + 30.0,
                      outcome=outcome, result="DONE", reason="caller-goodbye")


def full_record() -> CallRecord:
    """A record with every field set, and the optional ones None where they may be."""
    return CallRecord(
        call_id="c0ffee", pbx="freeswitch", pbx_call_id="7f9c-uuid", caller="+******3456",
        did="4930100", priority_class="vip", started_at=1_700_000_000.25,
        answered_at=1_700_000_001.5, ended_at=1_700_000_095.75, outcome="transferred",
        result="TRANSFER", reason="intent:billing", transfer_to="billing", shed_level="brief",
        satisfaction=None, barge_ins=2,
        turns=[
            TurnKpi(index=0, path="faq", caller_text="when are you open", reply_text="9 to 5",
                    response_ms=612.5, stt_ms=120.0, llm_first_token_ms=None,
                    tts_first_audio_ms=0.0, barged_in=False, shed_level="normal"),
            TurnKpi(index=1, path="llm-brief", caller_text="my bill is wrong",
                    reply_text="I'll get you to billing", response_ms=None, stt_ms=None,
                    llm_first_token_ms=340.25, tts_first_audio_ms=88.0, barged_in=True,
                    shed_level="brief"),
            TurnKpi(index=2, path="transfer"),
        ],
        integrations=[
            IntegrationCall(name="crm-lookup", ok=True, latency_ms=45.5),
            IntegrationCall(name="webhook", ok=False, latency_ms=2000.0, timed_out=True,
                            error="timeout after 2000 ms", attempts=2, breaker="half-open"),
            IntegrationCall(name="webhook", ok=False, latency_ms=0.0, error="breaker-open",
                            attempts=0, breaker="open"),
        ],
        flows=[
            FlowRun(name="booking", outcome="fallback", steps=4, started_at=1_700_000_010.5,
                    ended_at=1_700_000_040.25),
            FlowRun(name="routing", outcome="completed", steps=2, started_at=1_700_000_041.0,
                    ended_at=1_700_000_050.0),
        ])

# The schema of the previous version (SCHEMA_VERSION 1), as it created its files.
SCHEMA_V1 = """
CREATE TABLE calls (
    call_id TEXT PRIMARY KEY,
    pbx TEXT NOT NULL,
    pbx_call_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    did TEXT NOT NULL,
    priority_class TEXT NOT NULL,
    started_at REAL NOT NULL,
    answered_at REAL,
    ended_at REAL NOT NULL,
    duration_s REAL NOT NULL,
    outcome TEXT NOT NULL,
    result TEXT NOT NULL,
    reason TEXT NOT NULL,
    transfer_to TEXT NOT NULL,
    shed_level TEXT NOT NULL,
    satisfaction INTEGER,
    barge_ins INTEGER NOT NULL,
    turns INTEGER NOT NULL,
    mean_response_ms REAL
);
CREATE INDEX calls_started_at ON calls(started_at);
CREATE INDEX calls_outcome ON calls(outcome);
CREATE TABLE turns (
    call_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    path TEXT NOT NULL,
    caller_text TEXT NOT NULL,
    reply_text TEXT NOT NULL,
    response_ms REAL,
    stt_ms REAL,
    llm_first_token_ms REAL,
    tts_first_audio_ms REAL,
    barged_in INTEGER NOT NULL,
    shed_level TEXT NOT NULL,
    PRIMARY KEY (call_id, idx)
);
CREATE TABLE integrations (
    call_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    ok INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    timed_out INTEGER NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (call_id, seq)
);
PRAGMA user_version = 1;
"""


def old_file(db: str) -> CallRecord:
    """A file as the previous version wrote it (WAL, schema 1), with one call; that call."""
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA_V1)
        conn.execute("INSERT INTO calls VALUES ('old', 'asterisk', 'u1', '****0177', '100', '', "
                     "1000.0, 1000.5, 1030.0, 30.0, 'completed', 'DONE', 'caller-goodbye', '', "
                     "'normal', 4, 0, 1, 700.0)")
        conn.execute("INSERT INTO turns VALUES ('old', 0, 'faq', 'hi', 'hello', 700.0, 200.0, "
                     "NULL, 0.0, 0, 'normal')")
        conn.execute("INSERT INTO integrations VALUES ('old', 0, 'crm', 1, 80.0, 0, '')")
        conn.execute("INSERT INTO integrations VALUES ('old', 1, 'crm', 0, 2000.0, 1, 'timeout')")
    finally:
        conn.close()
    return CallRecord(
        call_id="old", pbx="asterisk", pbx_call_id="u1", caller="****0177", did="100",
        started_at=1000.0, answered_at=1000.5, ended_at=1030.0, outcome="completed",
        result="DONE", reason="caller-goodbye", satisfaction=4,
        turns=[TurnKpi(index=0, path="faq", caller_text="hi", reply_text="hello",
                       response_ms=700.0, stt_ms=200.0, tts_first_audio_ms=0.0)],
        integrations=[IntegrationCall("crm", ok=True, latency_ms=80.0),
                      IntegrationCall("crm", ok=False, latency_ms=2000.0, timed_out=True,
                                      error="timeout")])


def columns(db: str, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "calls.sqlite")


@pytest.fixture
def store(db: str) -> Iterator[RecordStore]:
    s = RecordStore(db)
    s.start()
    yield s
    s.close()


def write(db: str, *recs: CallRecord) -> None:
    """Write ``recs`` through a store of their own and close it."""
    s = RecordStore(db)
    s.start()
    for r in recs:
        assert s.submit(r)
    s.close()
    assert s.written == len(recs) and s.write_errors == 0


# -- masking -----------------------------------------------------------------------------------


def test_mask_modes_are_the_documented_ones() -> None:
    assert MASK_MODES == ("full", "last4", "hash", "none")


@pytest.mark.parametrize(("number", "masked"), [
    ("04930123456", "*******3456"),
    ("+4930123456", "+******3456"),
    ("555-123-4567", "***-***-4567"),
    ("12345", "*2345"),
    ("1234", "****"),
    ("+12", "+**"),
    ("7", "*"),
    ("anonymous", "anonymous"),
])
def test_mask_last4(number: str, masked: str) -> None:
    assert mask_caller(number, "last4") == masked


def test_mask_full_none_hash() -> None:
    assert mask_caller("+4930123456", "full") == "+4930123456"
    assert mask_caller("+4930123456", "none") == ""
    hashed = mask_caller("+4930123456", "hash")
    assert hashed == "sha256:" + hashlib.sha256(b"+4930123456").hexdigest()[:12]
    assert mask_caller("+4930123456", "hash") == hashed  # stable: links repeat callers
    assert mask_caller("+4930123457", "hash") != hashed
    assert "4930123456" not in hashed


@pytest.mark.parametrize("mode", MASK_MODES)
def test_mask_empty_caller_stays_empty(mode: str) -> None:
    assert mask_caller("", mode) == ""


def test_mask_unknown_mode_names_it() -> None:
    with pytest.raises(ValueError, match="'last3'"):
        mask_caller("+4930123456", "last3")
    with pytest.raises(ValueError, match="'bogus'"):
        mask_caller("", "bogus")  # checked even when there is nothing to mask


def test_default_records_path() -> None:
    assert default_records_path("/var/lib/pbx-agent") == "/var/lib/pbx-agent/calls.sqlite"


# -- round trips -------------------------------------------------------------------------------


def test_round_trip_keeps_every_field_and_none(db: str) -> None:
    rec = full_record()
    write(db, rec)
    assert read_records(db) == [rec]
    assert count_records(db) == 1
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT duration_s, turns, mean_response_ms, satisfaction "
                           "FROM calls").fetchone()
    assert row == (95.5, 3, 612.5, None)


def test_flows_and_integration_fields_round_trip(db: str) -> None:
    rec = full_record()
    write(db, rec)
    (back,) = read_records(db)
    assert back.flows == rec.flows
    assert [f.outcome for f in back.flows] == ["fallback", "completed"]  # in run order
    assert [(i.attempts, i.breaker, i.error) for i in back.integrations] == [
        (1, "closed", ""), (2, "half-open", "timeout after 2000 ms"), (0, "open", "breaker-open")]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT call_id, seq, name, outcome, steps FROM flows "
                            "ORDER BY seq").fetchall()
    assert rows == [("c0ffee", 0, "booking", "fallback", 4), ("c0ffee", 1, "routing",
                                                              "completed", 2)]


def test_every_flow_outcome_round_trips(db: str) -> None:
    rec = make_record("f")
    rec.flows = [FlowRun(name=f"flow-{o}", outcome=o, steps=n) for n, o in enumerate(FLOW_OUTCOMES)]
    write(db, rec)
    assert read_records(db)[0].flows == rec.flows


def test_old_constructors_still_work() -> None:
    call = IntegrationCall("crm", True, 12.0)
    assert (call.timed_out, call.error, call.attempts, call.breaker) == (False, "", 1, "closed")
    assert CallRecord("x", "asterisk").flows == []
    run = FlowRun("booking", "completed")
    assert (run.steps, run.started_at, run.ended_at) == (0, 0.0, 0.0)


def test_refused_call_round_trip(db: str) -> None:
    rec = CallRecord(call_id="r1", pbx="asterisk", started_at=10.0, ended_at=10.0,
                     outcome="refused", result="BUSY", reason="shed:cpu",
                     shed_level="reject-new", satisfaction=None)
    write(db, rec)
    (back,) = read_records(db)
    assert back == rec
    assert back.answered_at is None and back.turns == [] and back.integrations == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT mean_response_ms FROM calls").fetchone() == (None,)


def test_every_outcome_written_and_read_back(db: str) -> None:
    cases = [("DONE", "caller-goodbye", False), ("TRANSFER", "dtmf-0", False),
             ("BUSY", "capacity", False), ("DONE", "caller-hangup", True),
             ("ERROR", "engine-error", False)]
    recs = []
    for n, (result, reason, hung_up) in enumerate(cases):
        rec = make_record(f"call-{n}", started_at=1000.0 + n,
                          outcome=classify_outcome(result, reason, hung_up))
        rec.result, rec.reason, rec.satisfaction = result, reason, n + 1
        recs.append(rec)
    assert sorted(r.outcome for r in recs) == sorted(OUTCOMES)
    write(db, *reversed(recs))
    assert read_records(db) == recs  # ordered by started_at, whatever the write order
    with sqlite3.connect(db) as conn:
        by_outcome = dict(conn.execute("SELECT outcome, COUNT(*) FROM calls GROUP BY outcome"))
    assert by_outcome == dict.fromkeys(OUTCOMES, 1)


def test_since_until_filter_on_started_at(db: str) -> None:
    write(db, make_record("a", 100.0), make_record("c", 300.0), make_record("b", 200.0))

    def ids(since: float | None = None, until: float | None = None) -> list[str]:
        return [r.call_id for r in read_records(db, since, until)]

    assert ids() == ["a", "b", "c"]
    assert ids(since=200.0) == ["b", "c"]  # since is inclusive
    assert ids(until=200.0) == ["a"]  # until is exclusive: adjacent windows never overlap
    assert ids(150.0, 300.0) == ["b"]
    assert ids(400.0) == []


def test_filtered_read_keeps_turns_of_the_selected_calls_only(db: str) -> None:
    early, late = full_record(), full_record()
    late.call_id, late.started_at, late.turns = "late", early.started_at + 3600, late.turns[:1]
    late.flows = late.flows[1:]
    write(db, early, late)
    (only,) = read_records(db, since=late.started_at)
    assert only == late
    assert [f.name for f in only.flows] == ["routing"]


def test_rewrite_of_same_call_id_replaces_it(store: RecordStore, db: str) -> None:
    first = full_record()
    second = full_record()
    second.outcome, second.result, second.reason = "abandoned", "DONE", "caller-hangup"
    second.turns, second.integrations = second.turns[:1], []
    second.flows = [FlowRun(name="after-hours", outcome="abandoned", steps=1)]
    assert store.submit(first)
    assert store.flush()
    assert store.submit(first)  # a retried write of the same record
    assert store.submit(second)
    assert store.flush()
    assert store.written == 3 and store.write_errors == 0
    assert read_records(db) == [second]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM turns").fetchone() == (1,)
        assert conn.execute("SELECT COUNT(*) FROM integrations").fetchone() == (0,)
        assert conn.execute("SELECT name FROM flows").fetchall() == [("after-hours",)]


def test_rewrite_without_flows_removes_the_stored_ones(store: RecordStore, db: str) -> None:
    rec = full_record()
    assert store.submit(rec)
    assert store.flush()
    rec.flows = []
    assert store.submit(rec)
    assert store.flush()
    assert read_records(db)[0].flows == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM flows").fetchone() == (0,)


# -- the file ----------------------------------------------------------------------------------


def test_schema_wal_and_version(store: RecordStore, db: str) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (records.SCHEMA_VERSION,)
        assert records.SCHEMA_VERSION == 2
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"calls", "turns", "integrations", "flows", "calls_started_at",
            "calls_outcome"} <= names
    assert columns(db, "integrations")[-2:] == ["attempts", "breaker"]
    assert columns(db, "flows") == ["call_id", "seq", "name", "outcome", "steps", "started_at",
                                    "ended_at"]


# -- upgrading a file of the previous version ----------------------------------------------------


def test_old_file_is_upgraded_on_open_and_keeps_its_records(db: str) -> None:
    old = old_file(db)
    assert "attempts" not in columns(db, "integrations") and columns(db, "flows") == []
    new = full_record()
    write(db, new)  # opens (and upgrades) the old file, then writes a new call
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (records.SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        # the old rows got the defaults that describe them: one attempt, breaker closed
        assert conn.execute("SELECT seq, attempts, breaker FROM integrations "
                            "WHERE call_id = 'old' ORDER BY seq").fetchall() == [
            (0, 1, "closed"), (1, 1, "closed")]
    assert columns(db, "integrations")[-2:] == ["attempts", "breaker"]
    assert "steps" in columns(db, "flows")
    assert read_records(db) == [old, new]
    assert count_records(db) == 2


def test_upgrading_twice_changes_nothing(db: str) -> None:
    old = old_file(db)
    write(db)
    before = columns(db, "integrations")
    write(db)
    assert columns(db, "integrations") == before
    assert read_records(db) == [old]


def test_upgrade_adds_only_the_missing_column(db: str) -> None:
    old = old_file(db)  # as if an upgrade had added one column and not the other
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE integrations ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
        conn.execute("UPDATE integrations SET attempts = 3 WHERE seq = 1")
    write(db)
    assert columns(db, "integrations").count("attempts") == 1
    old.integrations[1].attempts = 3
    assert read_records(db) == [old]


def test_replacing_an_old_record_after_the_upgrade(db: str) -> None:
    old = old_file(db)
    old.flows = [FlowRun(name="booking", outcome="completed", steps=3)]
    old.integrations = old.integrations[:1]
    write(db, old)
    assert read_records(db) == [old]


def test_old_file_is_read_as_is_without_writing(db: str) -> None:
    old = old_file(db)
    with sqlite3.connect(db) as conn:  # checkpointed and closed, as a stopped old agent leaves it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = Path(db).read_bytes()
    assert read_records(db) == [old]  # defaults filled in, no flows
    assert count_records(db) == 1
    assert Path(db).read_bytes() == before
    assert "attempts" not in columns(db, "integrations")


def test_reopening_an_existing_file_keeps_its_records(db: str) -> None:
    write(db, make_record("a"))
    write(db, make_record("b", 1_800_000_000.0))
    assert [r.call_id for r in read_records(db)] == ["a", "b"]


def test_one_named_daemon_writer_thread(store: RecordStore) -> None:
    writers = [t for t in threading.enumerate() if t.name == "kpi-records"]
    assert len(writers) == 1 and writers[0].daemon
    with pytest.raises(RuntimeError, match="already started"):
        store.start()


def test_written_record_survives_without_close(store: RecordStore, db: str) -> None:
    rec = full_record()
    assert store.submit(rec)
    assert store.flush()
    # another process's view, while the writer still holds the file open (no close yet)
    assert read_records(db) == [rec]
    assert count_records(db) == 1


def test_written_record_survives_a_killed_process(db: str) -> None:
    code = ("import os, sys\n"
            "from agent.kpi.records import RecordStore\n"
            "from tests.test_records import full_record\n"
            "s = RecordStore(sys.argv[1]); s.start()\n"
            "assert s.submit(full_record()) and s.flush()\n"
            "os._exit(0)  # no close, no checkpoint: as if killed\n")
    subprocess.run([sys.executable, "-c", code, db], cwd=REPO, check=True, timeout=60)
    assert Path(db + "-wal").exists()  # the record is in the WAL, not yet checkpointed
    assert read_records(db) == [full_record()]


def test_close_writes_what_is_queued(db: str) -> None:
    s = RecordStore(db)
    s.start()
    for n in range(50):
        assert s.submit(make_record(f"c{n}", float(n)))
    s.close()
    assert s.written == 50 and s.queue_depth == 0
    assert count_records(db) == 50
    assert not any(t.name == "kpi-records" for t in threading.enumerate())
    s.close()  # idempotent


def test_submit_after_close_is_dropped(db: str, caplog: pytest.LogCaptureFixture) -> None:
    s = RecordStore(db)
    s.start()
    s.close()
    with caplog.at_level(logging.WARNING, logger="agent.kpi.records"):
        assert s.submit(make_record("late")) is False
    assert s.dropped == 1
    assert "late" in caplog.text and "closed" in caplog.text


# -- the writer under trouble ------------------------------------------------------------------


def test_full_queue_drops_and_counts_without_blocking(
        db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    entered, release = threading.Event(), threading.Event()
    real_insert = records._insert_record

    def stuck_insert(conn: sqlite3.Connection, record: CallRecord) -> None:
        entered.set()
        assert release.wait(30), "test never released the writer"
        real_insert(conn, record)

    monkeypatch.setattr(records, "_insert_record", stuck_insert)
    now = [1000.0]
    s = RecordStore(db, queue_size=2, clock=lambda: now[0])
    s.start()
    try:
        assert s.submit(make_record("w1", 1.0))
        assert entered.wait(10)  # the writer holds w1 and is stuck in the disk write
        assert s.submit(make_record("q1", 2.0)) and s.submit(make_record("q2", 3.0))
        assert s.queue_depth == 2
        with caplog.at_level(logging.WARNING, logger="agent.kpi.records"):
            assert s.submit(make_record("x1")) is False
            assert s.submit(make_record("x2")) is False
            now[0] += 59.0
            assert s.submit(make_record("x3")) is False
            assert s.flush(timeout_s=0.05) is False  # still stuck: flush gives up, no hang
        warnings = [r for r in caplog.records if "not recorded" in r.getMessage()]
        assert len(warnings) == 1 and "x1" in warnings[0].getMessage()  # once a minute
        now[0] += 1.0
        with caplog.at_level(logging.WARNING, logger="agent.kpi.records"):
            assert s.submit(make_record("x4")) is False
        warnings = [r for r in caplog.records if "not recorded" in r.getMessage()]
        assert len(warnings) == 2 and "4 dropped" in warnings[1].getMessage()
        assert s.dropped == 4 and s.written == 0
    finally:
        release.set()
    assert s.flush()
    s.close()
    assert s.written == 3 and s.dropped == 4 and s.write_errors == 0
    assert [r.call_id for r in read_records(db)] == ["w1", "q1", "q2"]


def test_write_error_is_counted_and_the_writer_goes_on(
        store: RecordStore, db: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real_insert = records._insert_record
    failures = ["disk"]

    def flaky_insert(conn: sqlite3.Connection, record: CallRecord) -> None:
        if failures:
            failures.pop()
            raise sqlite3.OperationalError("database or disk is full")
        real_insert(conn, record)

    monkeypatch.setattr(records, "_insert_record", flaky_insert)
    with caplog.at_level(logging.ERROR, logger="agent.kpi.records"):
        assert store.submit(make_record("lost", 1.0))
        assert store.submit(make_record("kept", 2.0))
        assert store.flush()
    assert store.write_errors == 1 and store.written == 1
    assert "lost" in caplog.text and "disk is full" in caplog.text
    assert [r.call_id for r in read_records(db)] == ["kept"]


def test_failed_write_leaves_no_partial_call(store: RecordStore, db: str) -> None:
    bad = full_record()
    bad.turns[1].index = 0  # duplicate turn index: the turns insert fails mid-transaction
    assert store.submit(bad)
    assert store.submit(make_record("next"))
    assert store.flush()
    assert store.write_errors == 1 and store.written == 1
    assert [r.call_id for r in read_records(db)] == ["next"]  # no calls row without its turns
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM turns").fetchone() == (0,)


def test_failed_flow_write_leaves_no_partial_call(store: RecordStore, db: str) -> None:
    bad = full_record()
    bad.flows.append(FlowRun(name=None, outcome="failed"))  # type: ignore[arg-type]
    assert store.submit(bad)  # NOT NULL fails on the last insert of the transaction
    assert store.flush()
    assert store.write_errors == 1 and store.written == 0
    assert read_records(db) == []
    with sqlite3.connect(db) as conn:
        for table in ("calls", "turns", "integrations", "flows"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,), table


# -- errors the operator sees ------------------------------------------------------------------


def test_parent_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    path = str(blocker / "calls.sqlite")
    with pytest.raises(ConfigError) as err:
        RecordStore(path).start()
    assert err.value.path == path and err.value.key == "kpi.records"
    assert path in str(err.value) and "kpi.records" in str(err.value)
    assert "not a directory" in err.value.reason


# Root (as CI runs) writes through directory permissions, so the permission cases are made
# with the errors the OS and SQLite give a non-root user, at the points where they arise.


def test_unwritable_directory_is_a_config_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    path = str(locked / "sub" / "calls.sqlite")

    def denied(name: str, exist_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(records.os, "makedirs", denied)
    with pytest.raises(ConfigError) as err:
        RecordStore(path).start()
    assert path in str(err.value) and "kpi.records" in str(err.value)
    assert "permission denied" in err.value.reason
    monkeypatch.undo()

    # the directory exists but the file cannot be created in it
    locked.mkdir()
    path = str(locked / "calls.sqlite")

    def cannot_open(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(records.sqlite3, "connect", cannot_open)
    monkeypatch.setattr(records.os, "access", lambda p, mode: False)
    with pytest.raises(ConfigError) as err:
        RecordStore(path).start()
    assert "permission denied" in err.value.reason and path in err.value.reason


def test_a_file_that_is_not_sqlite_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite"
    path.write_bytes(b"this is not an SQLite file at all, just some text" * 100)
    with pytest.raises(ConfigError) as err:
        RecordStore(str(path)).start()
    assert str(path) in str(err.value) and "not an SQLite database" in err.value.reason


def test_a_newer_schema_is_refused(db: str) -> None:
    write(db, make_record("a"))
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {records.SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="newer pbx-agent"):
        RecordStore(db).start()
    with pytest.raises(ValueError, match="newer pbx-agent"):
        read_records(db)


def test_reading_a_missing_file_names_it(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere" / "calls.sqlite")
    with pytest.raises(FileNotFoundError) as err:
        read_records(path)
    assert path in str(err.value) and "no calls have been recorded" in str(err.value)
    with pytest.raises(FileNotFoundError, match="kpi.records"):
        count_records(path)
    assert not Path(path).parent.exists()  # reading never creates anything


def test_another_user_reads_a_closed_file_in_a_directory_it_cannot_write(
        db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    write(db, full_record())
    real = records._open_readonly
    tried: list[str] = []

    def no_shm(path: str, uri: str) -> sqlite3.Connection:
        tried.append(uri)
        if "immutable=1" not in uri:  # what SQLite says when it cannot create the -shm file
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(path, uri)

    monkeypatch.setattr(records, "_open_readonly", no_shm)
    assert read_records(db) == [full_record()]
    assert count_records(db) == 1
    assert any("immutable=1" in uri for uri in tried)


def test_queue_size_must_be_positive(db: str) -> None:
    with pytest.raises(ValueError, match="queue_size"):
        RecordStore(db, queue_size=0)
