"""Side work: a bounded, persistent background queue for work off the call path.

CRM notes, message delivery and post-call webhooks must not hold a caller on the line, nor be
lost when the CRM is down for an hour or the daemon restarts. A call thread ``put()``s a job
(an integration name and a JSON payload) and goes on at once: ``put()`` only appends to an
in-memory inbox under a lock that no I/O and no delivery ever holds.

One worker thread ("pbx-sidework") owns the SQLite file (WAL): it moves the inbox into the
``jobs`` table, delivers the oldest due job, deletes it on success and otherwise schedules it
again with an exponential back-off, until ``max_attempts`` failures give it up. Pending jobs
survive a restart (``stop()`` persists the inbox; ``start()`` counts what it finds as
``restored``). With no file (or one that cannot be opened) the table lives in memory and the
jobs still pending at ``stop()`` are counted as ``lost``.

The queue is bounded by ``max_jobs``: a full queue drops its oldest pending job (never the one
being delivered) and counts it. Logs name integrations and counts, never payloads.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.integrations.spec import SideWorkConfig

_LOGGER = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    integration TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL)"""
_INSERT = ("INSERT INTO jobs (integration, payload, attempts, next_at, created_at) "
           "VALUES (?, ?, 0, ?, ?)")
_DROP_OLDEST = ("DELETE FROM jobs WHERE id IN "
                "(SELECT id FROM jobs WHERE id != ? ORDER BY id LIMIT ?)")


@dataclass(frozen=True)
class SideWorkStats:
    """Counters of the queue (``depth`` = jobs pending: queued, stored or being delivered)."""

    depth: int
    dropped: int
    lost: int
    delivered: int
    failed: int
    restored: int


@dataclass(frozen=True)
class _Job:
    id: int
    integration: str
    payload: str
    attempts: int


def _open_db(path: str) -> sqlite3.Connection:
    """A connection with the jobs table; handed from ``start()`` to the worker thread."""
    conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
    try:
        if path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
        conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


class SideWorkQueue:
    """Jobs for integrations, delivered in the background with retries and back-off."""

    #: longest idle wait of the worker before it looks at the table again (s)
    idle_poll_s: float = 0.5
    #: a warning about dropped jobs at most this often (s)
    drop_log_every_s: float = 10.0

    def __init__(self, config: SideWorkConfig, deliver: Callable[[str, Mapping[str, Any]], bool],
                 *, path: str | None, clock: Callable[[], float] = time.time) -> None:
        """``deliver(integration, payload)`` returns True when the job is done (it should be
        bounded by its own timeout; an exception counts as a failure); ``path`` is the SQLite
        file (None = memory only); ``clock`` schedules retries (seconds)."""
        self.config = config
        self._deliver = deliver
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        # (integration, payload JSON, created_at), oldest first
        self._inbox: deque[tuple[str, str, float]] = deque()
        self._rows = 0        # rows in the table (the job being delivered included)
        self._transit = 0     # jobs taken from the inbox, not yet in the table
        self._debt = 0        # oldest rows to delete (dropped by put(), applied by the worker)
        self._inflight_id: int | None = None
        self._dropped = self._lost = self._delivered = self._failed = self._restored = 0
        self._started = False
        self._stopping = False
        self._orphaned = False  # stop() gave up waiting for the worker
        self._thread: threading.Thread | None = None
        self._last_drop_log = -math.inf
        self._unlogged_drops = 0
        self._unlogged_late = 0

    # -- call threads ---------------------------------------------------------------------

    def put(self, integration: str, payload: Mapping[str, Any]) -> None:
        """Queue a job; never blocks on I/O or on a delivery in progress."""
        try:
            body = json.dumps(dict(payload), default=str, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            with self._lock:
                self._failed += 1
            _LOGGER.error("side work for %s: payload cannot be encoded (%s); not queued",
                          integration, type(exc).__name__)
            return
        created = self._clock()
        drops = late = 0
        with self._lock:
            if self._stopping:
                self._lost += 1
                self._unlogged_late += 1
            else:
                keep = True
                if self._depth() >= max(1, self.config.max_jobs):
                    keep = self._drop_oldest()
                    self._dropped += 1
                    self._unlogged_drops += 1
                if keep:
                    self._inbox.append((integration, body, created))
            now = time.monotonic()
            if ((self._unlogged_drops or self._unlogged_late)
                    and now - self._last_drop_log >= self.drop_log_every_s):
                self._last_drop_log = now
                drops, self._unlogged_drops = self._unlogged_drops, 0
                late, self._unlogged_late = self._unlogged_late, 0
        self._wake.set()
        if drops:
            _LOGGER.warning("side work queue full (%d jobs): dropped %d oldest job(s)",
                            self.config.max_jobs, drops)
        if late:
            _LOGGER.warning("side work queue stopped: %d job(s) lost", late)

    def _drop_oldest(self) -> bool:
        """Drop the oldest pending job (under the lock); False: the new job is the one dropped
        (only the job being delivered is pending, and it cannot be taken back)."""
        droppable = (self._rows + self._transit - self._debt
                     - (1 if self._inflight_id is not None else 0))
        if droppable > 0:
            self._debt += 1  # stored jobs are older than the inbox: the worker deletes them
            return True
        if self._inbox:
            self._inbox.popleft()
            return True
        return False

    def _depth(self) -> int:
        return len(self._inbox) + self._transit + self._rows - self._debt

    def stats(self) -> SideWorkStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return SideWorkStats(depth=self._depth(), dropped=self._dropped, lost=self._lost,
                                 delivered=self._delivered, failed=self._failed,
                                 restored=self._restored)

    def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is pending and no delivery runs (False after ``timeout_s``)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._depth() == 0 and self._inflight_id is None, timeout_s)

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the file (pending jobs in it count as ``restored``) and start the worker."""
        with self._lock:
            if self._started or self._stopping:
                return
            self._started = True
        conn: sqlite3.Connection | None = None
        if self._path is not None:
            try:
                conn = _open_db(self._path)
            except (sqlite3.Error, OSError) as exc:
                _LOGGER.error("side work: cannot open %s (%s); running memory-only, pending "
                              "jobs will be lost at stop", self._path, exc)
                self._path = None
        if conn is None:
            conn = _open_db(":memory:")
        restored = int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
        with self._lock:
            self._rows += restored
            self._restored += restored
        if restored:
            _LOGGER.info("side work: %d pending job(s) restored from %s", restored, self._path)
        self._thread = threading.Thread(target=self._run, args=(conn,), name="pbx-sidework",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker; pending jobs are kept in the file, or counted (and logged) as
        ``lost`` when memory-only. A delivery still running after ``timeout_s`` is left to
        finish on its own. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if not thread.is_alive():
                return
            _LOGGER.warning("side work: a delivery is still running after %.1f s; "
                            "stopping without waiting for it", timeout_s)
        self._salvage()

    def _salvage(self) -> None:
        """Persist (or count as lost) what the worker did not: it never ran, or it is stuck."""
        with self._changed:
            self._orphaned = True
            batch = list(self._inbox)
            self._inbox.clear()
            debt, self._debt = self._debt, 0
            inflight = self._inflight_id
            if self._path is None:
                lost = max(0, len(batch) + self._transit + self._rows - debt
                           - (1 if inflight is not None else 0))
                self._lost += lost
                # only the job being delivered is left; the worker settles it
                self._rows = 1 if inflight is not None else 0
                self._transit = 0
                self._changed.notify_all()
        if self._path is None:
            if lost:
                _LOGGER.warning("side work: %d pending job(s) lost at stop (memory-only)", lost)
            return
        try:
            conn = _open_db(self._path)
            try:
                with conn:
                    conn.executemany(_INSERT, [(i, p, c, c) for i, p, c in batch])
                    deleted = conn.execute(_DROP_OLDEST, (-1 if inflight is None else inflight,
                                                          debt)).rowcount if debt else 0
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            with self._changed:
                self._lost += len(batch)
                self._debt += debt
                self._changed.notify_all()
            _LOGGER.error("side work: cannot keep %d job(s) in %s (%s); lost", len(batch),
                          self._path, exc)
            return
        with self._changed:
            self._rows += len(batch) - deleted
            self._debt += debt - deleted
            pending = self._rows
            self._changed.notify_all()
        _LOGGER.info("side work: %d pending job(s) kept in %s for the next start", pending,
                     self._path)

    # -- the worker -----------------------------------------------------------------------

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    if self._stopping:
                        break
                try:
                    self._flush(conn)
                    self._apply_debt(conn)
                    job, wait = self._pick(conn)
                except sqlite3.Error:
                    _LOGGER.exception("side work: database error; retrying")
                    self._wake.wait(self.idle_poll_s)
                    continue
                if job is None:
                    self._wake.wait(wait)
                    continue
                ok = self._attempt(job)
                try:
                    self._settle(conn, job, ok)
                except sqlite3.Error:
                    _LOGGER.exception("side work: database error after delivering to %s",
                                      job.integration)
                    with self._changed:
                        self._inflight_id = None
                        self._changed.notify_all()
            self._exit(conn)
        finally:
            conn.close()

    def _flush(self, conn: sqlite3.Connection) -> None:
        """Move the inbox into the table."""
        with self._lock:
            if not self._inbox:
                return
            batch = list(self._inbox)
            self._inbox.clear()
            self._transit = len(batch)
        try:
            with conn:
                conn.executemany(_INSERT, [(i, p, c, c) for i, p, c in batch])
        except sqlite3.Error:
            with self._lock:
                self._inbox.extendleft(reversed(batch))
                self._transit = 0
                excess = self._debt - self._rows  # drops meant for the batch: take them here
                while excess > 0 and self._inbox:
                    self._inbox.popleft()
                    self._debt -= 1
                    excess -= 1
            raise
        with self._changed:
            if not (self._orphaned and self._path is None):  # else already counted lost
                self._rows += len(batch)
            self._transit = 0
            self._changed.notify_all()

    def _apply_debt(self, conn: sqlite3.Connection) -> None:
        """Delete the oldest rows that put() dropped."""
        with self._lock:
            debt = self._debt
        if debt <= 0:
            return
        with conn:
            deleted = conn.execute(_DROP_OLDEST, (-1, debt)).rowcount
        with self._changed:
            self._rows = max(0, self._rows - deleted)
            self._debt = max(0, min(self._debt - deleted, self._rows))
            self._changed.notify_all()

    def _pick(self, conn: sqlite3.Connection) -> tuple[_Job | None, float]:
        """The oldest due job (marked in flight), or None and how long to wait."""
        now = self._clock()
        row = conn.execute("SELECT id, integration, payload, attempts FROM jobs "
                           "WHERE next_at <= ? ORDER BY id LIMIT 1", (now,)).fetchone()
        if row is not None:
            job = _Job(int(row[0]), str(row[1]), str(row[2]), int(row[3]))
            with self._lock:
                self._inflight_id = job.id
            return job, 0.0
        nxt = conn.execute("SELECT MIN(next_at) FROM jobs").fetchone()[0]
        if nxt is None:
            return None, self.idle_poll_s
        return None, min(self.idle_poll_s, max(0.001, float(nxt) - now))

    def _attempt(self, job: _Job) -> bool:
        try:
            payload = json.loads(job.payload)
            return bool(self._deliver(job.integration, payload))
        except Exception as exc:  # noqa: BLE001 - a failed delivery, whatever the cause
            _LOGGER.warning("side work for %s: delivery raised %s", job.integration,
                            type(exc).__name__)
            return False

    def _settle(self, conn: sqlite3.Connection, job: _Job, ok: bool) -> None:
        attempts = job.attempts + 1
        if ok or attempts >= self.config.max_attempts:
            with conn:
                deleted = conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,)).rowcount
            with self._changed:
                self._rows -= deleted
                if ok:
                    self._delivered += 1
                else:
                    self._failed += 1
                self._inflight_id = None
                self._changed.notify_all()
            if not ok:
                _LOGGER.warning("side work for %s given up after %d attempts",
                                job.integration, attempts)
            return
        delay = min(self.config.backoff_s * 2 ** (attempts - 1), self.config.max_backoff_s)
        with conn:
            conn.execute("UPDATE jobs SET attempts = ?, next_at = ? WHERE id = ?",
                         (attempts, self._clock() + delay, job.id))
        with self._changed:
            self._inflight_id = None
            self._changed.notify_all()
        _LOGGER.info("side work for %s: attempt %d failed; next in %.1f s", job.integration,
                     attempts, delay)

    def _exit(self, conn: sqlite3.Connection) -> None:
        """On stop: keep what is pending in the file, or count it as lost."""
        if self._path is None:
            with self._changed:
                lost = max(0, self._depth())
                self._lost += lost
                self._inbox.clear()
                self._rows = self._debt = self._transit = 0
                self._changed.notify_all()
            if lost:
                _LOGGER.warning("side work: %d pending job(s) lost at stop (memory-only)", lost)
            return
        try:
            self._flush(conn)
            self._apply_debt(conn)
        except sqlite3.Error as exc:
            with self._changed:
                lost = len(self._inbox)
                self._lost += lost
                self._inbox.clear()
                self._changed.notify_all()
            _LOGGER.error("side work: cannot keep %d job(s) in %s (%s); lost", lost,
                          self._path, exc)
        with self._lock:
            pending = self._depth()
            orphaned = self._orphaned
        if not orphaned:
            _LOGGER.info("side work: %d pending job(s) kept in %s for the next start",
                         pending, self._path)
