"""API keys, their budgets and rate limits, and the audit log: one SQLite file (WAL).

Tables:

- ``keys``: one row per API key: name, output level, query budget and images counted against
  it, rate limit (images per window, a fixed window) and its current window, created / revoked.
  The secret itself is never stored, only its SHA-256.
- ``audit``: one row per request of a known key: time, images sent, images counted, outcome
  (``ok``, ``in_flight``, or the refusal's error code), HTTP status, latency and the SHA-256 of
  the images as the victim saw them; with an extraction detector (``divqat serve --detector``),
  its score after the request and whether the alarm was raised.
- ``detector_state``: per key, the detector's memory of the key's query stream (the detector's
  ``state_dict``), so a restarted service goes on where it stopped; and on ``keys``, when and
  by which detector the key was flagged (kept when the detector's state is reset).

Secrets look like ``dq_<key id>_<43 random characters>`` (256 random bits): the key id is
looked up, the secret's hash compared in constant time. A plain SHA-256 suffices because the
secret is random, not a password: there is nothing to guess from its hash.

Key lifecycle: ``rotate_key`` gives a key a new secret (the old one is refused from then on)
and keeps everything else, since budget, usage, audit rows, detector state and flag hang on the
key's row, not on its secret. A revoked key stays revoked; its name can be given to a new key,
and the revoked one is then listed as ``NAME.revoked-ID`` with its history.

Accounting (``reserve``): one ``BEGIN IMMEDIATE`` transaction checks the key, its budget and its
rate window, counts the images and writes the request's audit row (``in_flight``), and commits
before the victim sees the images; ``finish`` then records the outcome. So a request refused for
budget or rate counts nothing, concurrent requests can never pass the budget together, and a
crash never loses a counted image: images answered <= images counted <= answered + in flight.
An answer computed but not delivered (the client hung up) stays counted. A request the victim
failed on is refunded (outcome ``error``, nothing counted).

Before any of that, ``check_room`` refuses a key with no budget or rate left before its
request's body is even read (the service calls it first, so a refused request costs no decode).

The database is created readable and writable by its owner only (0600; SQLite gives its WAL and
shared-memory files the same mode): it holds the keys' hashes, their clients' query history and,
with PRADA, raw queries.

Durability: ``synchronous=NORMAL`` in WAL mode keeps every committed transaction through a crash
of the service (kill -9); ``fsync=True`` (``synchronous=FULL``) also through a power cut, at
about 0.3 ms more per transaction measured here.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divqat.errors import ConfigError, DivqatError

SCHEMA_VERSION = 2  # 2: extraction detectors (flags on keys, scores in the audit, detector_state)
SECRET_PREFIX = "dq"
_SECRET = re.compile(r"^dq_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_OUTPUT = re.compile(r"^(soft|labels|top-([1-9][0-9]*))$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL UNIQUE,
    secret_sha256 BLOB NOT NULL,
    output TEXT NOT NULL,
    budget INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    rate INTEGER,
    window REAL NOT NULL,
    window_start REAL NOT NULL DEFAULT 0,
    window_used INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    revoked REAL,
    flagged REAL,
    flag_detector TEXT,
    flag_score REAL,
    flag_queries INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    key INTEGER NOT NULL REFERENCES keys(id),
    time REAL NOT NULL,
    images INTEGER NOT NULL,
    counted INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    latency_ms REAL,
    batch_sha256 TEXT,
    detector_score REAL,
    alarm INTEGER
);
CREATE INDEX IF NOT EXISTS audit_by_key ON audit (key, time);
CREATE TABLE IF NOT EXISTS detector_state (
    key INTEGER PRIMARY KEY REFERENCES keys(id),
    detector TEXT NOT NULL,
    config TEXT NOT NULL,
    state BLOB NOT NULL,
    queries INTEGER NOT NULL,
    updated REAL NOT NULL
);
"""
# What schema 1 lacks (ALTER TABLE on opening an older database).
_MIGRATE_1_TO_2 = (
    "ALTER TABLE keys ADD COLUMN flagged REAL",
    "ALTER TABLE keys ADD COLUMN flag_detector TEXT",
    "ALTER TABLE keys ADD COLUMN flag_score REAL",
    "ALTER TABLE keys ADD COLUMN flag_queries INTEGER",
    "ALTER TABLE audit ADD COLUMN detector_score REAL",
    "ALTER TABLE audit ADD COLUMN alarm INTEGER",
)


class StoreError(DivqatError):
    """The key database is missing, not a divqat key database, or a key name is unknown."""


class Refused(DivqatError):
    """A request the service refuses: ``status`` (401, 413, 429), ``code`` (the JSON error
    code), ``retry_after`` (seconds, for rate limits), and the key's state when known."""

    def __init__(self, status: int, code: str, message: str, *, key: KeyInfo | None = None,
                 retry_after: int | None = None, window: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.key, self.retry_after, self.window = key, retry_after, window


@dataclass(frozen=True)
class KeyInfo:
    """One API key as the service sees it (never the secret). ``used``: images counted against
    ``budget``; ``rate``: images per ``window`` seconds (None: no rate limit)."""

    id: int
    name: str
    key_id: str
    output: str
    budget: int
    used: int
    rate: int | None
    window: float
    created: float
    revoked: float | None

    @property
    def left(self) -> int:
        return max(0, self.budget - self.used)

    @property
    def label_only(self) -> bool:
        return self.output == "labels"

    @property
    def top_k(self) -> int | None:
        return int(self.output[4:]) if self.output.startswith("top-") else None


@dataclass(frozen=True)
class Reservation:
    """Images counted for one request: its audit row, the key after counting, and the rate
    window's (remaining images, seconds to its reset) when the key has a rate limit."""

    audit_id: int
    key: KeyInfo
    window: tuple[int, int] | None


def check_output(output: str) -> str:
    """``soft`` (defended posteriors), ``labels`` (argmax only) or ``top-K`` (the K largest)."""
    if not isinstance(output, str) or not _OUTPUT.match(output):
        raise ConfigError(f"output must be soft, labels or top-K (K >= 1, e.g. top-3), got {output!r}")
    return output


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


_KEY_COLUMNS = "id, name, key_id, output, budget, used, rate, window, created, revoked"


def _key(row: tuple) -> KeyInfo:
    return KeyInfo(*row)


def _new_secret() -> tuple[str, str]:
    """A key id (12 hex digits) and the secret holding it: ``dq_<key id>_<256 random bits>``."""
    key_id = secrets.token_hex(6)
    return key_id, f"{SECRET_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def retired_name(name: str, row_id: int) -> str:
    """The name a revoked key takes when its name goes to a new key: ``NAME.revoked-ID`` (its
    row id, so unique; the name cut to fit the 64 characters a name may have)."""
    suffix = f".revoked-{row_id}"
    return name[:64 - len(suffix)] + suffix


class KeyStore:
    """The key database at ``path`` (created on first use with ``create=True``).

    One connection, usable from one thread at a time (the service gives it a thread of its
    own; a lock guards misuse). Every method commits before it returns.
    """

    def __init__(self, path: str | Path, *, create: bool = True, fsync: bool = False) -> None:
        self.path, self.fsync = Path(path), fsync
        if not create and not self.path.is_file():
            raise StoreError(f"no key database at {self.path} (create a key first: divqat keys "
                             f"create NAME --budget N --db {self.path})")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():  # owner only, whatever the umask allows others
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._transaction():
                old = self._db.execute("SELECT name FROM sqlite_master WHERE name = 'meta'").fetchone()
                row = old and self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                if row is not None and row[0] == "1":  # written before the detectors
                    for statement in _MIGRATE_1_TO_2:
                        self._db.execute(statement)
                    self._db.execute("UPDATE meta SET value = ? WHERE name = 'schema'",
                                     (str(SCHEMA_VERSION),))
                    row = (str(SCHEMA_VERSION),)
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                if row is None:
                    self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    raise StoreError(f"{self.path} has key-database schema {row[0]}; this divqat "
                                     f"reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a divqat key database ({e})") from e

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # ------------------------------------------------------------------ keys (divqat keys)

    def create_key(self, name: str, budget: int, *, rate: int | None = None, window: float = 60.0,
                   output: str = "soft") -> tuple[KeyInfo, str]:
        """A new key; returns its record and the secret (shown once, never stored)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"key name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ConfigError(f"budget must be an integer >= 0 (images), got {budget!r}")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 1):
            raise ConfigError(f"rate must be an integer >= 1 (images per window), got {rate!r}")
        if isinstance(window, bool) or not isinstance(window, int | float) or not (
                math.isfinite(window) and window > 0):
            raise ConfigError(f"window must be a positive number of seconds, got {window!r}")
        check_output(output)
        key_id, secret = _new_secret()
        with self._lock, self._transaction():
            row = self._db.execute("SELECT id, revoked FROM keys WHERE name = ?", (name,)).fetchone()
            if row is not None and row[1] is None:
                raise ConfigError(f"a key named {name!r} exists already: pick another name, `divqat keys "
                                  f"rotate {name}` for a new secret, or `divqat keys revoke {name}` first")
            if row is not None:  # revoked: it keeps its history under another name
                retired = retired_name(name, row[0])
                if self._db.execute("SELECT 1 FROM keys WHERE name = ?", (retired,)).fetchone():
                    raise ConfigError(f"cannot rename the revoked key {name!r} to {retired!r}: a key has "
                                      "that name")
                self._db.execute("UPDATE keys SET name = ? WHERE id = ?", (retired, row[0]))
            self._db.execute(
                "INSERT INTO keys (name, key_id, secret_sha256, output, budget, rate, window, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, key_id, hash_secret(secret), output, budget, rate, float(window), time.time()))
        return self.key(name), secret

    def rotate_key(self, name: str) -> tuple[KeyInfo, str]:
        """A new secret for the key ``name``; the old one is refused (401) from its next request
        on. Everything else stays the key's: budget, images used, rate window, output level,
        audit rows, detector state and flag (they hang on the key's row, not on its secret).
        A revoked key stays revoked: ``ConfigError``."""
        key = self.key(name)
        if key.revoked is not None:
            raise ConfigError(f"the key {name!r} is revoked; revoked keys stay revoked: create a new key "
                              f"(`divqat keys create {name} ...` reuses the name; the old key's history "
                              f"stays under {retired_name(name, key.id)})")
        key_id, secret = _new_secret()
        with self._lock, self._transaction():
            self._db.execute("UPDATE keys SET key_id = ?, secret_sha256 = ? WHERE id = ? AND revoked IS NULL",
                             (key_id, hash_secret(secret), key.id))
        return self.key(name), secret

    def keys(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY id").fetchall()
        return [_key(r) for r in rows]

    def key(self, name: str) -> KeyInfo:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(k.name for k in self.keys()) or "none yet"
            raise StoreError(f"no key named {name!r} in {self.path} (keys: {known})")
        return _key(row)

    def revoke(self, name: str) -> KeyInfo:
        """Refuse the key (401) from its next request on; its name can be given to a new key
        (``create_key``), its history stays under ``NAME.revoked-ID``."""
        key = self.key(name)
        if key.revoked is None:
            with self._lock, self._transaction():
                self._db.execute("UPDATE keys SET revoked = ? WHERE id = ?", (time.time(), key.id))
        return self.key(name)

    # ------------------------------------------------------------------ the service's side

    def authenticate(self, secret: str | None) -> KeyInfo:
        """The key a secret belongs to; ``Refused`` (401) when it is missing, unknown or revoked."""
        if not secret:
            raise Refused(401, "missing_key", "no API key: send it as 'Authorization: Bearer KEY'")
        match = _SECRET.match(secret)
        with self._lock:
            row = None if match is None else self._db.execute(
                f"SELECT {_KEY_COLUMNS}, secret_sha256 FROM keys WHERE key_id = ?",
                (match.group(1),)).fetchone()
        # Compared in constant time even when there is no such key, against a dummy hash.
        stored = row[-1] if row is not None else b"\0" * 32
        if not hmac.compare_digest(hash_secret(secret), stored) or row is None:
            raise Refused(401, "unknown_key", "the API key is not known to this service")
        key = _key(row[:-1])
        if key.revoked is not None:
            raise Refused(401, "revoked_key", f"the API key {key.name!r} was revoked")
        return key

    def check_room(self, key_id: int, now: float, images: int = 1) -> None:
        """``Refused`` (429, nothing written) when ``images`` more would pass the key's budget
        or its current rate window; the cheap check made before a request's body is read.
        ``reserve`` decides for good once the images are known."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_KEY_COLUMNS}, window_start, window_used FROM keys WHERE id = ?",
                (key_id,)).fetchone()
        *row, w_start, w_used = row
        key = _key(row)
        if key.used + images > key.budget:
            raise Refused(429, "budget_exhausted", f"the key's query budget is used up ({key.used} of "
                          f"{key.budget}); nothing counted", key=key)
        if key.rate is not None and now < w_start + key.window and w_used + images > key.rate:
            reset = max(1, math.ceil(w_start + key.window - now))
            raise Refused(429, "rate_limited", f"rate limit: {key.rate} images per {key.window:g} s, "
                          f"{key.rate - w_used} left in this window; retry in {reset} s", key=key,
                          retry_after=reset, window=(key.rate - w_used, reset))

    def reserve(self, key_id: int, images: int, now: float, batch_sha256: str) -> Reservation:
        """Count ``images`` against the key, atomically, and open the request's audit row.

        Refused (nothing counted, the refusal audited): a key revoked meanwhile (401
        ``revoked_key``), a request that would pass the budget (429 ``budget_exhausted``), one
        over the rate window (429 ``rate_limited``, with ``retry_after``), one larger than the
        whole window (413 ``batch_over_rate``).
        """
        with self._lock, self._transaction():
            *row, w_start, w_used = self._db.execute(
                f"SELECT {_KEY_COLUMNS}, window_start, window_used FROM keys WHERE id = ?",
                (key_id,)).fetchone()
            key = _key(row)
            if now >= w_start + key.window:
                w_start, w_used = now, 0
            refusal = None
            if key.revoked is not None:
                refusal = Refused(401, "revoked_key", f"the API key {key.name!r} was revoked")
            elif key.used + images > key.budget:
                refusal = Refused(429, "budget_exhausted",
                                  f"{images} images would pass the key's query budget ({key.used} of "
                                  f"{key.budget} used, {key.left} left); nothing counted", key=key)
            elif key.rate is not None and images > key.rate:
                refusal = Refused(413, "batch_over_rate",
                                  f"{images} images are more than the key's rate allows in one window "
                                  f"({key.rate} per {key.window:g} s); send smaller requests", key=key)
            elif key.rate is not None and w_used + images > key.rate:
                reset = max(1, math.ceil(w_start + key.window - now))
                refusal = Refused(429, "rate_limited",
                                  f"rate limit: {key.rate} images per {key.window:g} s, {key.rate - w_used} "
                                  f"left in this window; retry in {reset} s", key=key,
                                  retry_after=reset, window=(key.rate - w_used, reset))
            if refusal is not None:  # audited, nothing counted (committed, then raised)
                self._db.execute(
                    "INSERT INTO audit (key, time, images, counted, outcome, status, latency_ms, "
                    "batch_sha256) VALUES (?, ?, ?, 0, ?, ?, NULL, ?)",
                    (key_id, now, images, refusal.code, refusal.status, batch_sha256))
            else:
                self._db.execute("UPDATE keys SET used = used + ?, window_start = ?, window_used = ? "
                                 "WHERE id = ?", (images, w_start, w_used + images, key_id))
                audit_id = self._db.execute(
                    "INSERT INTO audit (key, time, images, counted, outcome, status, latency_ms, "
                    "batch_sha256) VALUES (?, ?, ?, ?, 'in_flight', NULL, NULL, ?)",
                    (key_id, now, images, images, batch_sha256)).lastrowid
        if refusal is not None:
            raise refusal
        key = KeyInfo(**{**key.__dict__, "used": key.used + images})
        window = None
        if key.rate is not None:
            window = (key.rate - w_used - images, max(0, math.ceil(w_start + key.window - now)))
        return Reservation(audit_id, key, window)

    def finish(self, audit_id: int, outcome: str, status: int, latency_ms: float,
               refund: bool = False, detector_score: float | None = None,
               alarm: bool | None = None) -> None:
        """Record a reserved request's outcome; ``refund``: the victim failed, give the images
        back (to the budget and the rate window) and mark the row as counting nothing.
        ``detector_score``, ``alarm``: the extraction detector's verdict after the request."""
        update = ("UPDATE audit SET outcome = ?, status = ?, latency_ms = ?, detector_score = ?, "
                  "alarm = ? WHERE id = ?",
                  (outcome, status, latency_ms, detector_score, None if alarm is None else int(alarm),
                   audit_id))
        if not refund:
            with self._lock:  # one statement: a transaction of its own (autocommit)
                self._db.execute(*update)
            return
        with self._lock, self._transaction():
            key_id, counted = self._db.execute("SELECT key, counted FROM audit WHERE id = ?",
                                               (audit_id,)).fetchone()
            self._db.execute("UPDATE keys SET used = used - ?, window_used = max(0, window_used - ?) "
                             "WHERE id = ?", (counted, counted, key_id))
            self._db.execute("UPDATE audit SET counted = 0 WHERE id = ?", (audit_id,))
            self._db.execute(*update)

    def record(self, key_id: int, now: float, images: int, outcome: str, status: int,
               latency_ms: float | None = None) -> None:
        """An audit row for a request refused before anything was counted (bad input)."""
        with self._lock:  # one statement: a transaction of its own (autocommit)
            self._db.execute(
                "INSERT INTO audit (key, time, images, counted, outcome, status, latency_ms, batch_sha256) "
                "VALUES (?, ?, ?, 0, ?, ?, ?, NULL)", (key_id, now, images, outcome, status, latency_ms))

    # ------------------------------------------------------------------ extraction detectors

    def detector_state(self, key_id: int, detector: str, config: str) -> bytes | None:
        """The saved state of ``detector`` (with settings ``config``) for a key, or None (no
        state yet, or one of another detector or other settings: the stream starts afresh)."""
        with self._lock:
            row = self._db.execute("SELECT detector, config, state FROM detector_state WHERE key = ?",
                                   (key_id,)).fetchone()
        if row is None or row[0] != detector or row[1] != config:
            return None
        return bytes(row[2])

    def save_detector_state(self, key_id: int, detector: str, config: str, state: bytes,
                            queries: int, flagged: bool = False) -> bool:
        """Save a key's detector state; ``flagged``: the state is an alarmed one, saved only
        while the key is flagged (``unflag`` may have cleared it meanwhile: the stale state must
        not come back). False when it was not saved for that reason."""
        condition = " AND flagged IS NOT NULL" if flagged else ""
        with self._lock:  # one statement: a transaction of its own (autocommit)
            saved = self._db.execute(
                "INSERT INTO detector_state (key, detector, config, state, queries, updated) "
                f"SELECT ?, ?, ?, ?, ?, ? FROM keys WHERE id = ?{condition} "
                "ON CONFLICT (key) DO UPDATE SET detector = excluded.detector, "
                "config = excluded.config, state = excluded.state, queries = excluded.queries, "
                "updated = excluded.updated",
                (key_id, detector, config, state, queries, time.time(), key_id)).rowcount
        return saved > 0

    def flag(self, key_id: int, detector: str, score: float | None, queries: int | None) -> None:
        """Mark a key as flagged by ``detector`` (the first flag is kept)."""
        with self._lock:
            self._db.execute("UPDATE keys SET flagged = ?, flag_detector = ?, flag_score = ?, "
                             "flag_queries = ? WHERE id = ? AND flagged IS NULL",
                             (time.time(), detector, score, queries, key_id))

    def flags(self) -> dict[str, dict[str, Any]]:
        """Flagged keys by name: when, by which detector, its score, after how many queries."""
        with self._lock:
            rows = self._db.execute("SELECT name, flagged, flag_detector, flag_score, flag_queries "
                                    "FROM keys WHERE flagged IS NOT NULL").fetchall()
        return {r[0]: {"flagged": r[1], "detector": r[2], "score": r[3], "queries": r[4]} for r in rows}

    def unflag(self, name: str) -> KeyInfo:
        """Clear a key's flag and forget its detector state (its stream starts afresh)."""
        key = self.key(name)
        with self._lock, self._transaction():
            self._db.execute("UPDATE keys SET flagged = NULL, flag_detector = NULL, flag_score = NULL, "
                             "flag_queries = NULL WHERE id = ?", (key.id,))
            self._db.execute("DELETE FROM detector_state WHERE key = ?", (key.id,))
        return key

    def is_flagged(self, key_id: int) -> bool:
        return self.flagged_at(key_id) is not None

    def flagged_at(self, key_id: int) -> float | None:
        """When the key was flagged (``time.time()``), or None."""
        with self._lock:
            row = self._db.execute("SELECT flagged FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ reading the audit

    def usage(self, name: str | None = None) -> list[dict[str, Any]]:
        """Per key: the counter (``used`` of ``budget``) and the audit's view of it: requests by
        outcome, images answered (``ok``), images counted (must equal ``used``), in flight,
        refused, first and last request."""
        where, args = ("WHERE k.name = ?", (name,)) if name is not None else ("", ())
        if name is not None:
            self.key(name)  # a clear error for an unknown name
        with self._lock:
            rows = self._db.execute(
                "SELECT k.name, k.output, k.budget, k.used, k.rate, k.window, k.revoked, "
                "k.flagged, k.flag_detector, k.flag_queries, "
                "COUNT(a.id), "
                "COALESCE(SUM(a.outcome = 'ok'), 0), "
                "COALESCE(SUM(CASE WHEN a.outcome = 'ok' THEN a.images END), 0), "
                "COALESCE(SUM(a.counted), 0), "
                "COALESCE(SUM(a.outcome = 'in_flight'), 0), "
                "COALESCE(SUM(a.outcome NOT IN ('ok', 'in_flight')), 0), "
                "MIN(a.time), MAX(a.time) "
                f"FROM keys k LEFT JOIN audit a ON a.key = k.id {where} GROUP BY k.id ORDER BY k.id",
                args).fetchall()
        columns = ("name", "output", "budget", "used", "rate", "window", "revoked", "flagged",
                   "flag_detector", "flag_queries", "requests",
                   "answered_requests", "images_answered", "images_counted", "in_flight",
                   "refused_requests", "first", "last")
        return [dict(zip(columns, r, strict=True)) for r in rows]

    def audit(self, name: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, newest first (all keys, or one), at most ``limit``."""
        where, args = ("WHERE k.name = ?", [name]) if name is not None else ("", [])
        if name is not None:
            self.key(name)
        sql = ("SELECT a.id, k.name, a.time, a.images, a.counted, a.outcome, a.status, a.latency_ms, "
               "a.batch_sha256, a.detector_score, a.alarm "
               f"FROM audit a JOIN keys k ON k.id = a.key {where} ORDER BY a.id DESC")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        columns = ("id", "key", "time", "images", "counted", "outcome", "status", "latency_ms",
                   "batch_sha256", "detector_score", "alarm")
        return [dict(zip(columns, r, strict=True)) for r in rows]


class _Transaction:
    """``with``: BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error. IMMEDIATE takes the write
    lock at the start, so a check and the update it allows cannot interleave with another
    writer's (another request, or ``divqat keys`` in another process), and a reader that turns
    writer never meets a snapshot gone stale (which SQLite reports as busy without waiting)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
