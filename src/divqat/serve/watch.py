"""One extraction detector per API key, its state kept in the key database across restarts.

``KeyWatch`` builds a fresh detector for a key on its first request (or restores the one saved
in the ``detector_state`` table, if it was saved by the same detector with the same settings),
feeds it every answered request's images and answers in one thread of its own (so the event
loop keeps serving while a detector works, and each key's requests are observed in the order
they were answered), and saves its state:

- when the detector raises its first alarm for the key, the key's flag is written first, on its
  own (``KeyStore.flag``: when, by which detector, its score, after how many queries), so a
  failed state save never loses a flag (a failed flag write is retried on the key's next
  request); then its state;
- otherwise at most every ``save_every`` seconds per key, and for every key when the service
  stops (SIGTERM, Ctrl-C).

A save is in two steps: the detector's thread takes a copy of the state (``state_dict``, a
memory copy) after the request's verdict is handed back, and a thread of its own serializes and
writes it, on a database connection of its own. So the answers wait for neither, the event
loop's database connection is never held by a save, and the next observation waits only for the
copy: for PRADA's sets at their service bound (``max_set`` 512, 10 classes of 28x28 images,
16 MiB) 60 ms measured on the shared 2-core machine, against 115 ms to serialize and 80-230 ms
to write. The writes are paced: after a write that took t seconds the next starts no sooner
than ``SAVE_PAUSE`` x t later, so saves hold the database's write lock at most about
1 / (1 + SAVE_PAUSE) of the time (5 %) however large the states grow; and a key's next copy is
taken only once its previous one is written. So a crash (kill -9) loses at most
``save_every`` seconds (more when the writes are paced) of a key's stream from its detector's
memory, never a flag; ``save_every=0`` saves after every request, as fast as the pacing
allows.

``divqat keys unflag`` on a running service: the next request of the key finds its flag cleared
in the database and gives the key a fresh detector, which can flag it again; the old, alarmed
state is never written back (a pending copy of it is dropped, and a write of an alarmed state
happens only while the key is flagged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from divqat.checks import check_choice, check_number
from divqat.detectors import ON_ALARM, Detector, Verdict, state_from_bytes, state_to_bytes
from divqat.serve.store import KeyStore

log = logging.getLogger("divqat.serve")


SAVE_PAUSE = 19.0  # after a write of t seconds, the next no sooner than 19 t later (saves <= 5 %)


@dataclass(frozen=True)
class _Snapshot:
    """A copy of one key's detector state, waiting for the saver."""

    generation: int  # the key's detector generation when taken (a reset makes it stale)
    state: dict[str, Any]
    queries: int
    flagged: bool


class KeyWatch:
    """Detectors per key for the prediction API.

    Arguments:
        make (callable): builds a fresh detector (one per key).
        settings (dict): what the detectors run with (name, parameters, calibration); a saved
            state is restored only into a detector with exactly these settings.
        on_alarm (str): ``flag``, ``block`` or ``labels-only`` (see ``divqat.serve.app``).
        save_every (float): seconds between saves of a key's state, >= 0. (Default: 1.)
    """

    def __init__(self, make: Callable[[], Detector], settings: dict[str, Any],
                 on_alarm: str = "flag", save_every: float = 1.0) -> None:
        self.make = make
        self.name = make().name
        self.config = json.dumps(settings, sort_keys=True, default=str)
        self.on_alarm = check_choice("serve", "on_alarm", on_alarm, ON_ALARM)
        self.save_every = check_number("serve", "save_every", save_every, low=0.0)
        self._store: KeyStore | None = None
        self._writer: KeyStore | None = None  # the saver's own connection to the key database
        self._executor: ThreadPoolExecutor | None = None
        self._detectors: dict[int, Detector] = {}
        self._saved: dict[int, float] = {}
        self._dirty: set[int] = set()
        self._flagged: set[int] = set()  # keys whose flag is in the database, as far as we know
        self._generation: dict[int, int] = {}  # bumped when a key's detector starts afresh
        self._pending: dict[int, _Snapshot] = {}  # the saver's queue: the latest copy per key
        self._cond = threading.Condition()  # guards _pending and _closing
        self._closing = False
        self._reset_lock = threading.Lock()  # a reset and a write of the same key never interleave
        self._pause = threading.Event()  # set on close: no more pacing
        self._saver: threading.Thread | None = None
        self.resets = 0  # detectors started afresh after `divqat keys unflag`
        self.writes = 0  # states written
        self.write_seconds = 0.0  # in all, serialization and database

    def open(self, store: KeyStore) -> None:
        self._store = store
        self._writer = KeyStore(store.path, create=False, fsync=store.fsync)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="divqat-detector")
        self._saver = threading.Thread(target=self._save_loop, name="divqat-detector-save", daemon=True)
        self._saver.start()

    async def observe(self, key_id: int, images: Tensor, answers: Tensor) -> Verdict:
        """The key's detector after watching this request (its flag already written when this
        request raised the alarm; its state saved later, off the answer's path)."""
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(self._executor, self._observe, key_id, images, answers)
        self._executor.submit(self._save_if_due, key_id)
        return verdict

    def _detector(self, key_id: int) -> Detector:
        detector = self._detectors.get(key_id)
        if detector is None:
            detector = self.make()
            saved = self._store.detector_state(key_id, self.name, self.config)
            if saved is not None:
                detector.load_state_dict(state_from_bytes(saved))
            if self._store.flagged_at(key_id) is not None:
                self._flagged.add(key_id)
            self._detectors[key_id] = detector
            self._saved[key_id] = time.monotonic()
        return detector

    def _unflagged(self, key_id: int) -> bool:
        """True (and the key's detector forgotten) when the key was flagged but its flag is gone
        from the database: ``divqat keys unflag`` ran."""
        if key_id not in self._flagged or self._store.flagged_at(key_id) is not None:
            return False
        with self._reset_lock:  # no copy of the old detector is written after this
            self._flagged.discard(key_id)
            self._detectors.pop(key_id, None)
            self._dirty.discard(key_id)
            self._generation[key_id] = self._generation.get(key_id, 0) + 1
            with self._cond:
                self._pending.pop(key_id, None)
        self.resets += 1
        log.info("key %d was unflagged: its detector starts afresh", key_id)
        return True

    def _observe(self, key_id: int, images: Tensor, answers: Tensor) -> Verdict:
        self._unflagged(key_id)
        detector = self._detector(key_id)
        verdict = detector.observe(images, answers)
        self._dirty.add(key_id)
        if verdict.flagged and key_id not in self._flagged:
            try:
                self._store.flag(key_id, self.name, verdict.score, verdict.first_alarm)
                self._flagged.add(key_id)
                self._saved[key_id] = -math.inf  # the state is saved at once too
            except Exception:  # retried on the key's next request; the verdict still stands
                log.exception("the flag of key %d could not be written", key_id)
        return verdict

    # ------------------------------------------------------------------ saving (two threads)

    def _save_if_due(self, key_id: int) -> None:
        """In the detector's thread: hand a copy of the key's state to the saver when due and
        when the saver has written the key's previous copy (so copies are taken no faster than
        the paced writes take them away: copying costs the detector's thread time too)."""
        now = time.monotonic()
        if key_id in self._dirty and key_id not in self._pending and not self._unflagged(key_id) \
                and now - self._saved.get(key_id, -math.inf) >= self.save_every:
            self._hand_over(key_id, now)

    def _hand_over(self, key_id: int, now: float) -> None:
        detector = self._detectors[key_id]
        snapshot = _Snapshot(self._generation.get(key_id, 0), detector.state_dict(), detector.queries,
                             detector.verdict().flagged)
        with self._cond:
            self._pending[key_id] = snapshot  # a copy not yet written is replaced: it is older
            self._cond.notify()
        self._saved[key_id] = now
        self._dirty.discard(key_id)

    def _save_loop(self) -> None:
        """The saver's thread: writes the pending copies, oldest key first, paced."""
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                key_id = next(iter(self._pending))
                snapshot = self._pending.pop(key_id)
            start = time.perf_counter()
            try:
                self._write(key_id, snapshot)
            except Exception:
                log.exception("the detector state of key %d could not be saved", key_id)
            seconds = time.perf_counter() - start
            self.writes += 1
            self.write_seconds += seconds
            self._pause.wait(SAVE_PAUSE * seconds)

    def _write(self, key_id: int, snapshot: _Snapshot) -> None:
        data = state_to_bytes(snapshot.state)
        with self._reset_lock:
            if snapshot.generation != self._generation.get(key_id, 0):
                return  # the key's detector started afresh since: this copy is stale
            # An alarmed state is written only while the key is flagged: after `keys unflag`
            # the next request starts a fresh detector, and the old state must not come back.
            self._writer.save_detector_state(key_id, self.name, self.config, data, snapshot.queries,
                                             flagged=snapshot.flagged)

    def flush(self) -> None:
        """Hand every key's state that changed since its last save to the saver (in the
        detector's thread, or with no observation running)."""
        now = time.monotonic()
        for key_id in sorted(self._dirty):
            if not self._unflagged(key_id):
                self._hand_over(key_id, now)

    def close(self) -> None:
        """Save every key's changed state (the pending writes unpaced), then stop both threads."""
        if self._executor is None:
            return
        self._executor.submit(self.flush).result()
        self._executor.shutdown(wait=True)
        self._executor = None
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._pause.set()
        self._saver.join()
        self._writer.close()
