"""The service's watermark state, kept in its key database (``divqat serve --watermark``).

Two tables beside the keys (same SQLite file, readable by its owner only; this module creates
them and reads them, the key tables stay the service's):

- ``watermark_keys``: per API key (by its row id in the key database: a rotated key keeps its
  marks, a new key reusing a revoked key's name gets its own), its name, its watermark secret
  (32 random bytes, drawn on the key's first query to a watermarking service and kept, so a
  restarted service marks the same images the same way), the rate it was created at, the victim's
  input shape and classes, and how many answers were given and marked under the watermark;
- ``watermark_marks``: per key, at most ``max_marks`` distinct marked inputs and as many controls
  (the first ones), each the uint8 image as the victim saw it, its (would-be) mark label and its
  query time. Never shown to a client; ``load_marks`` / ``divqat verify --marks`` read them.

The secret is stored as it is, unlike the API keys' secrets (only their hashes): the service
needs it to mark, and ``divqat verify`` does not (the labels are stored). Keys are shown by
their name in the key database's ``keys`` table where it has one (a revoked key whose name went to
a new key shows under its retired name), else by the name recorded here.

``KeyedWatermarks`` is what the service holds: one ``Watermark`` per key, over this store.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from divqat.errors import ArtifactError
from divqat.ownership.marks import CONTROL, MARK, SQLITE_MAGIC, KeyMarks, read_npz
from divqat.ownership.watermark import DEFAULT_MAX_MARKS, SECRET_BYTES, Watermark

_SCHEMA = """
CREATE TABLE IF NOT EXISTS watermark_keys (
    key INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    secret BLOB NOT NULL,
    rate REAL NOT NULL,
    input_shape TEXT NOT NULL,
    num_classes INTEGER NOT NULL,
    answered INTEGER NOT NULL DEFAULT 0,
    marked INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS watermark_marks (
    key INTEGER NOT NULL REFERENCES watermark_keys(key),
    kind TEXT NOT NULL,
    digest BLOB NOT NULL,
    label INTEGER NOT NULL,
    time REAL NOT NULL,
    image BLOB NOT NULL,
    PRIMARY KEY (key, kind, digest)
);
"""


class MarkStore:
    """The watermark tables of the SQLite file ``path`` (created with ``create=True``).

    One connection, guarded by a lock; every method commits before it returns.
    """

    def __init__(self, path: str | Path, *, create: bool = True,
                 max_marks: int = DEFAULT_MAX_MARKS) -> None:
        self.path = Path(path)
        self.max_marks = max_marks
        if not create and not self.path.is_file():
            raise ArtifactError(f"no key database at {self.path}")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            if create:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
        except sqlite3.DatabaseError as e:
            raise ArtifactError(f"{self.path} is not a readable SQLite key database ({e})") from None

    @staticmethod
    def holds_marks(path: str | Path) -> bool:
        """Whether the SQLite file ``path`` has watermark tables (read without writing)."""
        try:
            db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
            try:
                return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'watermark_keys'"
                                  ).fetchone() is not None
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return False

    def close(self) -> None:
        self._db.close()

    def secret(self, key: int, name: str, *, rate: float, input_shape: Sequence[int],
               num_classes: int) -> bytes:
        """The secret of the key with row id ``key`` (called ``name``); drawn and stored on its
        first use."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT secret FROM watermark_keys WHERE key = ?", (key,)).fetchone()
                if row is None:
                    secret = secrets.token_bytes(SECRET_BYTES)
                    self._db.execute(
                        "INSERT INTO watermark_keys (key, name, secret, rate, input_shape, num_classes, "
                        "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (int(key), name, secret, float(rate), json.dumps([int(s) for s in input_shape]),
                         int(num_classes), time.time()))
                else:
                    secret = bytes(row[0])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return secret

    def add(self, key: int, kind: str, digests: Sequence[bytes], pixels: np.ndarray,
            labels: np.ndarray, when: float, answered: int = 0, marked: int = 0) -> None:
        """Record inputs of ``kind`` (mark or control) for ``key``, up to ``max_marks`` per kind
        (an input recorded before is not recorded again), and add to the key's counters."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if digests:
                    have = self._db.execute("SELECT COUNT(*) FROM watermark_marks WHERE key = ? AND kind = ?",
                                            (key, kind)).fetchone()[0]
                    for digest, image, label in zip(digests, pixels, labels, strict=True):
                        if have >= self.max_marks:
                            break
                        have += self._db.execute(
                            "INSERT OR IGNORE INTO watermark_marks (key, kind, digest, label, time, image) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (key, kind, digest, int(label), float(when), image.tobytes())).rowcount
                if answered or marked:
                    self._db.execute("UPDATE watermark_keys SET answered = answered + ?, marked = marked + ? "
                                     "WHERE key = ?", (int(answered), int(marked), key))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def read(self, key: int | None = None) -> list[KeyMarks]:
        """Every key's marks (or one key's, by row id), in the order they were recorded."""
        where, args = ("WHERE w.key = ?", (key,)) if key is not None else ("", ())
        with self._lock:
            # The key database's own names where it has them (a retired key's new name).
            has_keys = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'keys'"
                                        ).fetchone() is not None
            name = "COALESCE(k.name, w.name)" if has_keys else "w.name"
            join = "LEFT JOIN keys k ON k.id = w.key" if has_keys else ""
            keys = self._db.execute(f"SELECT w.key, {name}, w.rate, w.input_shape, w.num_classes, "
                                    f"w.answered, w.marked FROM watermark_keys w {join} {where} "
                                    "ORDER BY w.key", args).fetchall()
        out = []
        for row_id, name, rate, shape_text, num_classes, answered, marked in keys:
            shape = tuple(json.loads(shape_text))
            parts = {}
            for kind in (MARK, CONTROL):
                with self._lock:
                    rows = self._db.execute("SELECT label, time, image FROM watermark_marks WHERE key = ? "
                                            "AND kind = ? ORDER BY rowid", (row_id, kind)).fetchall()
                images = (np.stack([np.frombuffer(r[2], dtype=np.uint8).reshape(shape) for r in rows])
                          if rows else np.zeros((0, *shape), np.uint8))
                parts[f"{kind}_images"] = images
                parts[f"{kind}_labels"] = np.array([r[0] for r in rows], dtype=np.int64)
                parts[f"{kind}_times"] = np.array([r[1] for r in rows], dtype=np.float64)
            out.append(KeyMarks(name, shape, int(num_classes), float(rate), **parts, answered=answered,
                                marked=marked, source=str(self.path)))
        return out


class _KeySink:
    """A ``MarkSink`` writing one key's marks to the store. The counters ride along with the next
    write of a mark or control (and ``flush``), so an unmarked request costs no write."""

    def __init__(self, store: MarkStore, key: int) -> None:
        self.store, self.key = store, key
        self.answered = self.marked = 0

    def record(self, kind: str, digests: Sequence[bytes], pixels: np.ndarray, labels: np.ndarray,
               when: float) -> None:
        self.store.add(self.key, kind, digests, pixels, labels, when, self.answered, self.marked)
        self.answered = self.marked = 0

    def count(self, answered: int, marked: int) -> None:
        self.answered += answered
        self.marked += marked

    def flush(self) -> None:
        if self.answered or self.marked:
            self.store.add(self.key, MARK, [], np.zeros((0,), np.uint8), np.zeros(0), math.nan,
                           self.answered, self.marked)
            self.answered = self.marked = 0


class KeyedWatermarks:
    """The service's watermark: one ``Watermark`` per API key, its secret and marks in the key
    database ``db`` (``MarkStore``).

    Arguments:
        db (path): the service's key database.
        rate (float): fraction of each key's distinct images marked. (DAWN's 0.005.)
        num_classes (int), input_shape (C, H, W): the victim's.
        max_marks (int): marks (and, apart, controls) kept per key. (Default: 10,000.)

    ``apply(key, name, answers, images, reference)`` marks one request's defended answers (N, K)
    for the key with row id ``key`` in the key database, called ``name`` (``reference``: the clean
    victim's labels (N,)), and records its marks and controls.
    """

    def __init__(self, db: str | Path, rate: float, num_classes: int, input_shape: Sequence[int], *,
                 max_marks: int = DEFAULT_MAX_MARKS) -> None:
        Watermark(num_classes, rate=rate)  # the rate and classes checked before anything is opened
        self.db, self.rate, self.num_classes = Path(db), rate, num_classes
        self.input_shape = tuple(int(s) for s in input_shape)
        self.max_marks = max_marks
        self._store: MarkStore | None = None
        self._keys: dict[int, Watermark] = {}

    def open(self) -> None:
        if self._store is None:
            self._store = MarkStore(self.db, max_marks=self.max_marks)

    def close(self) -> None:
        """Write the counters still held and close the store."""
        if self._store is not None:
            for watermark in self._keys.values():
                watermark.log.flush()
            self._store.close()
            self._store = None
            self._keys.clear()

    def watermark(self, key: int, name: str) -> Watermark:
        """The watermark of the key with row id ``key`` (its secret drawn on first use)."""
        if self._store is None:
            self.open()
        if key not in self._keys:
            secret = self._store.secret(key, name, rate=self.rate, input_shape=self.input_shape,
                                        num_classes=self.num_classes)
            self._keys[key] = Watermark(self.num_classes, secret, self.rate, key=name,
                                        log=_KeySink(self._store, key))
        return self._keys[key]

    def apply(self, key: int, name: str, answers: Tensor, images: Tensor, reference: Tensor | None = None,
              now: float | None = None) -> Tensor:
        return self.watermark(key, name).apply(answers, images, reference, now)

    def read(self, key: int | None = None) -> list[KeyMarks]:
        """The marks kept so far (every key's, or one key's)."""
        if self._store is None:
            self.open()
        for watermark in self._keys.values():
            watermark.log.flush()
        return self._store.read(key)


__all__ = ["KeyedWatermarks", "MarkStore", "load_marks"]


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def load_marks(path: str | Path) -> list[KeyMarks]:
    """Every key's marks at ``path``: a ``.npz`` file (``save_marks``), a service's key database
    (``divqat serve --watermark``: every key it marked), or a folder holding either (a service's
    state folder; an attack's output folder). ``ArtifactError`` when there are none."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no marks at {path} (`divqat attack --watermark` writes OUT/marks.npz; "
                            "`divqat serve --watermark` keeps them in its --db)")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    found: list[KeyMarks] = []
    for file in files:
        if file.suffix == ".npz":
            found.append(read_npz(file))
        elif _is_sqlite(file) and MarkStore.holds_marks(file):
            store = MarkStore(file, create=False)
            try:
                found.extend(store.read())
            finally:
                store.close()
        elif not path.is_dir():
            raise ArtifactError(f"{file} is neither a marks file (.npz) nor a key database with marks")
    if not found:
        raise ArtifactError(f"no watermark marks in {path} (no .npz marks file, no key database "
                            "that `divqat serve --watermark` marked answers in)")
    return found
