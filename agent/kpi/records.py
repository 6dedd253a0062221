"""The durable call records: one SQLite row per call, written off the call's hot path.

Durability, and what it costs the call:

- A call hands its finished :class:`~agent.kpi.model.CallRecord` to :meth:`RecordStore.submit`,
  which never blocks: it puts the record on a bounded in-memory queue and returns. One writer
  thread (``kpi-records``) owns the SQLite connection and does all the disk I/O, so a slow or
  full disk delays the records, never a caller.
- When the queue is full (the disk cannot keep up, or the writer is stuck on a locked file), the
  new record is dropped, counted in :attr:`RecordStore.dropped` and a warning is logged at most
  once a minute. Answering phones matters more than the statistics about them.
- Each record is written in its own transaction and committed on its own, so a crash or a kill
  loses at most the records still queued, never one already written. A record that cannot be
  written (disk full, database locked past ``busy_timeout``) is logged with its call id, counted
  in :attr:`RecordStore.write_errors`, and the writer goes on with the next one.
- The file is in WAL mode with ``synchronous=NORMAL``: a commit survives the process dying at any
  point; only a power loss or OS crash may roll back the last few commits (never corrupt the
  file). WAL also lets ``pbx-agent report`` read (:func:`read_records`) while the agent writes.
- :meth:`RecordStore.close` (the agent's drain) writes what is still queued before it returns.

The schema is versioned with ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`). Writing a record
whose ``call_id`` is already stored replaces it, turns, integrations and flows included, so a
retried write is idempotent.

Schema history (every change so far is additive, so older files are upgraded in place):

- 1: ``calls``, ``turns``, ``integrations``;
- 2: ``integrations.attempts`` and ``integrations.breaker``, and the ``flows`` table.

Opening a file for writing upgrades it: missing columns are added (``ALTER TABLE ... ADD
COLUMN``, found by ``PRAGMA table_info``, with defaults that describe the old rows: 1 attempt,
breaker closed), missing tables are created, and ``user_version`` is set, in one transaction.
Reading (:func:`read_records`) never writes: it reads an older file as it is, filling in the
same defaults, so ``pbx-agent report`` works on a file the agent has not opened since the
upgrade.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import ConfigError
from agent.kpi.model import CallRecord, FlowRun, IntegrationCall, TurnKpi

_LOGGER = logging.getLogger(__name__)

MASK_MODES = ("full", "last4", "hash", "none")
SCHEMA_VERSION = 2
_CONFIG_KEY = "kpi.records"
_BUSY_TIMEOUT_MS = 5000
_DROP_WARNING_INTERVAL_S = 60.0
_THREAD_NAME = "kpi-records"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
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
CREATE INDEX IF NOT EXISTS calls_started_at ON calls(started_at);
CREATE INDEX IF NOT EXISTS calls_outcome ON calls(outcome);
CREATE TABLE IF NOT EXISTS turns (
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
CREATE TABLE IF NOT EXISTS integrations (
    call_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    ok INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    timed_out INTEGER NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    breaker TEXT NOT NULL DEFAULT 'closed',
    PRIMARY KEY (call_id, seq)
);
CREATE TABLE IF NOT EXISTS flows (
    call_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    outcome TEXT NOT NULL,
    steps INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    PRIMARY KEY (call_id, seq)
);
"""

_ADDED_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "integrations": (("attempts", "INTEGER NOT NULL DEFAULT 1", "1"),
                     ("breaker", "TEXT NOT NULL DEFAULT 'closed'", "'closed'")),
}
"""Columns added since schema 1, by table: (name, declaration, value for rows without it)."""

_CALL_COLUMNS = ("call_id", "pbx", "pbx_call_id", "caller", "did", "priority_class",
                 "started_at", "answered_at", "ended_at", "duration_s", "outcome", "result",
                 "reason", "transfer_to", "shed_level", "satisfaction", "barge_ins", "turns",
                 "mean_response_ms")
_TURN_COLUMNS = ("call_id", "idx", "path", "caller_text", "reply_text", "response_ms",
                 "stt_ms", "llm_first_token_ms", "tts_first_audio_ms", "barged_in",
                 "shed_level")
_INTEGRATION_COLUMNS = ("call_id", "seq", "name", "ok", "latency_ms", "timed_out", "error",
                        "attempts", "breaker")
_FLOW_COLUMNS = ("call_id", "seq", "name", "outcome", "steps", "started_at", "ended_at")


def _insert_sql(table: str, columns: tuple[str, ...], verb: str = "INSERT") -> str:
    marks = ", ".join("?" for _ in columns)
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({marks})"


_INSERT_CALL = _insert_sql("calls", _CALL_COLUMNS, "INSERT OR REPLACE")
_INSERT_TURN = _insert_sql("turns", _TURN_COLUMNS)
_INSERT_INTEGRATION = _insert_sql("integrations", _INTEGRATION_COLUMNS)
_INSERT_FLOW = _insert_sql("flows", _FLOW_COLUMNS)


def mask_caller(number: str, mode: str) -> str:
    """The caller ID as stored under ``mode`` (one of :data:`MASK_MODES`).

    - ``full``: as is;
    - ``last4``: every digit but the last four becomes ``*`` (``+`` and other non-digits are
      kept); a number of four digits or fewer is masked entirely;
    - ``hash``: ``sha256:`` and the first 12 hex digits of the number's SHA-256. It is unsalted
      and stable, so it links a caller's repeat calls (and a known number can be hashed and
      looked up): pseudonymous, not anonymous;
    - ``none``: the empty string.

    An empty caller ID stays empty in every mode. An unknown mode raises ``ValueError``.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown caller mask mode {mode!r} (use one of {', '.join(MASK_MODES)})")
    if not number or mode == "none":
        return ""
    if mode == "full":
        return number
    if mode == "hash":
        return "sha256:" + hashlib.sha256(number.encode("utf-8")).hexdigest()[:12]
    digits = sum(1 for ch in number if ch.isdigit())
    to_mask = digits - 4 if digits > 4 else digits
    out = []
    for ch in number:
        if ch.isdigit() and to_mask > 0:
            out.append("*")
            to_mask -= 1
        else:
            out.append(ch)
    return "".join(out)


def default_records_path(state_dir: str) -> str:
    """The call records file under ``state_dir``: ``<state_dir>/calls.sqlite``."""
    return str(Path(state_dir) / "calls.sqlite")


def _mean_response_ms(record: CallRecord) -> float | None:
    values = [t.response_ms for t in record.turns if t.response_ms is not None]
    return sum(values) / len(values) if values else None


def _insert_record(conn: sqlite3.Connection, record: CallRecord) -> None:
    """Write ``record`` (replacing a stored one with its call id) in one transaction."""
    cid = record.call_id
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM turns WHERE call_id = ?", (cid,))
        conn.execute("DELETE FROM integrations WHERE call_id = ?", (cid,))
        conn.execute("DELETE FROM flows WHERE call_id = ?", (cid,))
        conn.execute(_INSERT_CALL, (
            cid, record.pbx, record.pbx_call_id, record.caller, record.did,
            record.priority_class, record.started_at, record.answered_at, record.ended_at,
            record.duration_s, record.outcome, record.result, record.reason,
            record.transfer_to, record.shed_level, record.satisfaction, record.barge_ins,
            len(record.turns), _mean_response_ms(record)))
        conn.executemany(_INSERT_TURN, [
            (cid, t.index, t.path, t.caller_text, t.reply_text, t.response_ms, t.stt_ms,
             t.llm_first_token_ms, t.tts_first_audio_ms, int(t.barged_in), t.shed_level)
            for t in record.turns])
        conn.executemany(_INSERT_INTEGRATION, [
            (cid, seq, i.name, int(i.ok), i.latency_ms, int(i.timed_out), i.error,
             i.attempts, i.breaker)
            for seq, i in enumerate(record.integrations)])
        conn.executemany(_INSERT_FLOW, [
            (cid, seq, f.name, f.outcome, f.steps, f.started_at, f.ended_at)
            for seq, f in enumerate(record.flows)])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the original error is the one worth reporting
                _LOGGER.debug("call %s: rollback failed: %s", cid, exc)
        raise


def _open_reason(path: str, exc: BaseException) -> str:
    """A reason for a failed open that tells the operator what to fix."""
    if isinstance(exc, OSError):
        where = exc.filename or os.path.dirname(os.path.abspath(path))
        if isinstance(exc, PermissionError):
            return f"permission denied: the agent's user cannot create the directory {where}"
        if isinstance(exc, (NotADirectoryError, FileExistsError)):
            return f"{where} is not a directory (a parent of the records file is a file)"
        return f"cannot create the directory {where}: {exc.strerror or exc}"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                    and not os.access(path, os.R_OK | os.W_OK)):
        return f"permission denied: the agent's user cannot write {path} or {parent} ({exc})"
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        return f"the file exists but is not an SQLite database ({exc})"
    return f"cannot open the SQLite database: {exc}"


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The column names of ``table`` (empty when there is no such table)."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _create_or_upgrade(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`, in one transaction.

    Tables are created if missing and columns added since schema 1 are added where missing, so
    a file of any older version (or one left half-way by an older agent) ends up complete.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        for table, added in _ADDED_COLUMNS.items():
            have = _columns(conn, table)
            for name, declaration, _ in added:
                if name not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the original error is the one worth reporting
                _LOGGER.debug("schema upgrade: rollback failed: %s", exc)
        raise


def _open_for_writing(path: str) -> sqlite3.Connection:
    """Create the directory and the schema; return a connection in WAL mode (or ConfigError)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ConfigError(path, _CONFIG_KEY, _open_reason(path, exc)) from exc
    conn: sqlite3.Connection | None = None
    try:
        # Opened here so that an error reaches start()'s caller; from then on only the writer
        # thread uses it (and closes it), hence check_same_thread=False.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            _LOGGER.warning("call records %s: journal mode is %s, not WAL (readers will wait "
                            "for the writer)", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(path, _CONFIG_KEY,
                              f"written by a newer pbx-agent (schema version {version}, this "
                              f"one knows {SCHEMA_VERSION}); point kpi.records at a new file")
        _create_or_upgrade(conn)
        return conn
    except ConfigError:
        if conn is not None:
            conn.close()
        raise
    except (sqlite3.Error, OSError) as exc:
        if conn is not None:
            conn.close()
        raise ConfigError(path, _CONFIG_KEY, _open_reason(path, exc)) from exc


class _Stop:
    """The queue item that tells the writer to finish."""


_STOP = _Stop()


class RecordStore:
    """The call records file and its single writer thread; :meth:`submit` never blocks."""

    def __init__(self, path: str, queue_size: int = 1000, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self.path = path
        self._queue: queue.Queue[CallRecord | _Stop] = queue.Queue(maxsize=queue_size)
        self._clock = clock
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        """Records accepted by submit() and not yet written or failed (under _lock)."""
        self._written = 0
        self._dropped = 0
        self._write_errors = 0
        self._last_drop_warning: float | None = None
        self._abandon = threading.Event()
        self._closed = False
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

    @property
    def written(self) -> int:
        """Records written (committed) so far."""
        return self._written

    @property
    def dropped(self) -> int:
        """Records dropped because the queue was full (or the store closed)."""
        return self._dropped

    @property
    def write_errors(self) -> int:
        """Records the writer failed to write (each one logged with its call id)."""
        return self._write_errors

    @property
    def queue_depth(self) -> int:
        """Records waiting for the writer."""
        return self._queue.qsize()

    def start(self) -> None:
        """Open or create the file and start the writer thread (ConfigError if unwritable)."""
        if self._thread is not None:
            raise RuntimeError(f"call records {self.path}: already started")
        if self._closed:
            raise RuntimeError(f"call records {self.path}: closed")
        self._conn = _open_for_writing(self.path)
        self._thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
        self._thread.start()

    def submit(self, record: CallRecord) -> bool:
        """Queue ``record`` for writing without blocking; False (and counted) if dropped."""
        with self._lock:
            if not self._closed:
                try:
                    self._queue.put_nowait(record)
                except queue.Full:
                    pass
                else:
                    self._pending += 1
                    return True
            self._dropped += 1
            dropped, closed = self._dropped, self._closed
            now = self._clock()
            warn = (self._last_drop_warning is None
                    or now - self._last_drop_warning >= _DROP_WARNING_INTERVAL_S)
            if warn:
                self._last_drop_warning = now
        if warn:
            why = "closed" if closed else f"queue full ({self._queue.maxsize} waiting)"
            _LOGGER.warning("call records %s: call %s not recorded, %d dropped so far "
                            "(warned at most once a minute)", why, record.call_id, dropped)
        return False

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every submitted record is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending > 0:
                thread = self._thread
                if thread is None or not thread.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
            return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), stop the writer, close the file."""
        deadline = time.monotonic() + timeout_s
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.flush(timeout_s)
        with self._lock:
            self._closed = True
        if thread is None:
            if self._pending:
                _LOGGER.warning("call records %s: never started; %d record(s) not written",
                                self.path, self._pending)
            return
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            # The writer is stuck (flush timed out): stop after its current record rather
            # than write a full queue past our deadline.
            self._abandon.set()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            _LOGGER.error("call records %s: writer still busy after %.1f s; %d record(s) not "
                          "written", self.path, timeout_s, self._pending)
        elif self._pending:
            _LOGGER.warning("call records %s: closed with %d record(s) not written",
                            self.path, self._pending)

    def _run(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, _Stop):
                    break
                self._write(conn, item)
                if self._abandon.is_set():
                    break
        finally:
            try:
                conn.close()
            except sqlite3.Error as exc:
                _LOGGER.warning("call records %s: close failed: %s", self.path, exc)
            self._conn = None

    def _write(self, conn: sqlite3.Connection, record: CallRecord) -> None:
        try:
            _insert_record(conn, record)
        except Exception as exc:
            with self._idle:
                self._write_errors += 1
                self._pending -= 1
                self._idle.notify_all()
            _LOGGER.error("call %s: call record not written to %s: %s", record.call_id,
                          self.path, exc)
            return
        with self._idle:
            self._written += 1
            self._pending -= 1
            self._idle.notify_all()


def _connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to the records at ``path`` (FileNotFoundError if missing)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no call records: no calls have been recorded yet (or `pbx-agent serve` "
            f"has not run with kpi.records on)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: permission denied: this user cannot read the call "
                              f"records (run as the agent's user or root)")
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        return _open_readonly(path, uri)
    except sqlite3.OperationalError:
        if os.path.exists(path + "-wal"):
            raise
        # Closed cleanly (no WAL left) and this user cannot write the directory, so SQLite
        # cannot create the -shm file a WAL read needs. With no writer the file cannot change
        # under us, so it may be read as immutable.
        return _open_readonly(path, uri + "&immutable=1")


def _open_readonly(path: str, uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except BaseException:
        conn.close()
        raise
    if version > SCHEMA_VERSION:
        conn.close()
        raise ValueError(f"{path}: written by a newer pbx-agent (schema version {version}, "
                         f"this one reads {SCHEMA_VERSION})")
    return conn


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    return row.fetchone() is not None


def _has_schema(conn: sqlite3.Connection) -> bool:
    return _has_table(conn, "calls")


def _select_list(conn: sqlite3.Connection, table: str, columns: tuple[str, ...]) -> str:
    """``columns`` for a SELECT from ``table``; one an older file lacks reads as its default."""
    have = _columns(conn, table)
    defaults = {name: value for name, _, value in _ADDED_COLUMNS.get(table, ())}
    return ", ".join(c if c in have or c not in defaults else f"{defaults[c]} AS {c}"
                     for c in columns)


def read_records(path: str, since: float | None = None,
                 until: float | None = None) -> list[CallRecord]:
    """The calls with ``since <= started_at < until`` (either bound optional), oldest first."""
    conn = _connect_readonly(path)
    try:
        if not _has_schema(conn):
            return []
        where, args = [], []
        if since is not None:
            where.append("started_at >= ?")
            args.append(since)
        if until is not None:
            where.append("started_at < ?")
            args.append(until)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        # One read transaction, so calls, turns, integrations and flows are one consistent
        # snapshot even while the writer commits.
        conn.execute("BEGIN")
        rows = conn.execute(
            f"SELECT call_id, pbx, pbx_call_id, caller, did, priority_class, started_at, "
            f"answered_at, ended_at, outcome, result, reason, transfer_to, shed_level, "
            f"satisfaction, barge_ins FROM calls{clause} ORDER BY started_at, call_id",
            args).fetchall()
        records: dict[str, CallRecord] = {}
        for row in rows:
            records[row[0]] = CallRecord(
                call_id=row[0], pbx=row[1], pbx_call_id=row[2], caller=row[3], did=row[4],
                priority_class=row[5], started_at=row[6], answered_at=row[7], ended_at=row[8],
                outcome=row[9], result=row[10], reason=row[11], transfer_to=row[12],
                shed_level=row[13], satisfaction=row[14], barge_ins=row[15])
        if records:
            sub = f"SELECT call_id FROM calls{clause}"
            for t in conn.execute(
                    f"SELECT call_id, idx, path, caller_text, reply_text, response_ms, stt_ms, "
                    f"llm_first_token_ms, tts_first_audio_ms, barged_in, shed_level FROM turns "
                    f"WHERE call_id IN ({sub}) ORDER BY call_id, idx", args):
                records[t[0]].turns.append(TurnKpi(
                    index=t[1], path=t[2], caller_text=t[3], reply_text=t[4], response_ms=t[5],
                    stt_ms=t[6], llm_first_token_ms=t[7], tts_first_audio_ms=t[8],
                    barged_in=bool(t[9]), shed_level=t[10]))
            columns = _select_list(conn, "integrations", (
                "call_id", "name", "ok", "latency_ms", "timed_out", "error", "attempts",
                "breaker"))
            for i in conn.execute(
                    f"SELECT {columns} FROM integrations "
                    f"WHERE call_id IN ({sub}) ORDER BY call_id, seq", args):
                records[i[0]].integrations.append(IntegrationCall(
                    name=i[1], ok=bool(i[2]), latency_ms=i[3], timed_out=bool(i[4]),
                    error=i[5], attempts=i[6], breaker=i[7]))
            if _has_table(conn, "flows"):  # a schema 1 file has none
                for f in conn.execute(
                        f"SELECT call_id, name, outcome, steps, started_at, ended_at FROM flows "
                        f"WHERE call_id IN ({sub}) ORDER BY call_id, seq", args):
                    records[f[0]].flows.append(FlowRun(
                        name=f[1], outcome=f[2], steps=f[3], started_at=f[4], ended_at=f[5]))
        conn.execute("COMMIT")
        return list(records.values())
    finally:
        conn.close()


def count_records(path: str) -> int:
    """How many calls the records at ``path`` hold (FileNotFoundError if missing)."""
    conn = _connect_readonly(path)
    try:
        if not _has_schema(conn):
            return 0
        return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    finally:
        conn.close()
