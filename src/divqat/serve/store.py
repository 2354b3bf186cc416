"""API keys, their budgets and rate limits, and the audit log: one SQLite file (WAL).

Tables:

- ``keys``: one row per API key: name, output level, query budget and images counted against
  it, rate limit (images per window, a fixed window) and its current window, created / revoked.
  The secret itself is never stored, only its SHA-256.
- ``audit``: one row per request of a known key: time, images sent, images counted, outcome
  (``ok``, ``in_flight``, or the refusal's error code), HTTP status, latency and the SHA-256 of
  the images as the victim saw them.

Secrets look like ``dq_<key id>_<43 random characters>`` (256 random bits): the key id is
looked up, the secret's hash compared in constant time. A plain SHA-256 suffices because the
secret is random, not a password: there is nothing to guess from its hash.

Accounting (``reserve``): one ``BEGIN IMMEDIATE`` transaction checks the key, its budget and its
rate window, counts the images and writes the request's audit row (``in_flight``), and commits
before the victim sees the images; ``finish`` then records the outcome. So a request refused for
budget or rate counts nothing, concurrent requests can never pass the budget together, and a
crash never loses a counted image: images answered <= images counted <= answered + in flight.
An answer computed but not delivered (the client hung up) stays counted. A request the victim
failed on is refunded (outcome ``error``, nothing counted).

Durability: ``synchronous=NORMAL`` in WAL mode keeps every committed transaction through a crash
of the service (kill -9); ``fsync=True`` (``synchronous=FULL``) also through a power cut, at
about 0.3 ms more per transaction measured here.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divqat.errors import ConfigError, DivqatError

SCHEMA_VERSION = 1
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
    revoked REAL
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
    batch_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_key ON audit (key, time);
"""


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


class KeyStore:
    """The key database at ``path`` (created on first use with ``create=True``).

    One connection, usable from one thread at a time (the service gives it a thread of its
    own; a lock guards misuse). Every method commits before it returns.
    """

    def __init__(self, path: str | Path, *, create: bool = True, fsync: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"no key database at {self.path} (create a key first: divqat keys "
                             f"create NAME --budget N --db {self.path})")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                row = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
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
        key_id = secrets.token_hex(6)
        secret = f"{SECRET_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM keys WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"a key named {name!r} exists already (revoke it or pick another name)")
            self._db.execute(
                "INSERT INTO keys (name, key_id, secret_sha256, output, budget, rate, window, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, key_id, hash_secret(secret), output, budget, rate, float(window), time.time()))
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
               refund: bool = False) -> None:
        """Record a reserved request's outcome; ``refund``: the victim failed, give the images
        back (to the budget and the rate window) and mark the row as counting nothing."""
        update = ("UPDATE audit SET outcome = ?, status = ?, latency_ms = ? WHERE id = ?",
                  (outcome, status, latency_ms, audit_id))
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
                "COUNT(a.id), "
                "COALESCE(SUM(a.outcome = 'ok'), 0), "
                "COALESCE(SUM(CASE WHEN a.outcome = 'ok' THEN a.images END), 0), "
                "COALESCE(SUM(a.counted), 0), "
                "COALESCE(SUM(a.outcome = 'in_flight'), 0), "
                "COALESCE(SUM(a.outcome NOT IN ('ok', 'in_flight')), 0), "
                "MIN(a.time), MAX(a.time) "
                f"FROM keys k LEFT JOIN audit a ON a.key = k.id {where} GROUP BY k.id ORDER BY k.id",
                args).fetchall()
        columns = ("name", "output", "budget", "used", "rate", "window", "revoked", "requests",
                   "answered_requests", "images_answered", "images_counted", "in_flight",
                   "refused_requests", "first", "last")
        return [dict(zip(columns, r, strict=True)) for r in rows]

    def audit(self, name: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, newest first (all keys, or one), at most ``limit``."""
        where, args = ("WHERE k.name = ?", [name]) if name is not None else ("", [])
        if name is not None:
            self.key(name)
        sql = ("SELECT a.id, k.name, a.time, a.images, a.counted, a.outcome, a.status, a.latency_ms, "
               f"a.batch_sha256 FROM audit a JOIN keys k ON k.id = a.key {where} ORDER BY a.id DESC")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        columns = ("id", "key", "time", "images", "counted", "outcome", "status", "latency_ms",
                   "batch_sha256")
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
