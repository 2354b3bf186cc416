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

A save runs in the detector's thread after the request's verdict is handed back: the answer
never waits for it (the next observation waits behind it, so each key's stream stays in order).
So a crash (kill -9) loses at most ``save_every`` seconds of a key's stream from its detector's
memory, never a flag; ``save_every=0`` saves after every request.

``divqat keys unflag`` on a running service: the next request of the key (or the next save)
finds its flag cleared in the database and gives the key a fresh detector, which can flag it
again; the old, alarmed state is never written back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch import Tensor

from divqat.checks import check_choice, check_number
from divqat.detectors import ON_ALARM, Detector, Verdict, state_from_bytes, state_to_bytes
from divqat.serve.store import KeyStore

log = logging.getLogger("divqat.serve")


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
        self._executor: ThreadPoolExecutor | None = None
        self._detectors: dict[int, Detector] = {}
        self._saved: dict[int, float] = {}
        self._dirty: set[int] = set()
        self._flagged: set[int] = set()  # keys whose flag is in the database, as far as we know
        self.resets = 0  # detectors started afresh after `divqat keys unflag`

    def open(self, store: KeyStore) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="divqat-detector")

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
        self._flagged.discard(key_id)
        self._detectors.pop(key_id, None)
        self._dirty.discard(key_id)
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

    def _save_if_due(self, key_id: int) -> None:
        now = time.monotonic()
        if key_id in self._dirty and not self._unflagged(key_id) \
                and now - self._saved.get(key_id, -math.inf) >= self.save_every:
            try:
                self._save(key_id, now)
            except Exception:
                log.exception("the detector state of key %d could not be saved", key_id)

    def _save(self, key_id: int, now: float) -> None:
        detector = self._detectors[key_id]
        if not self._store.save_detector_state(key_id, self.name, self.config,
                                               state_to_bytes(detector.state_dict()), detector.queries,
                                               flagged=detector.verdict().flagged):
            self._unflagged(key_id)  # unflagged meanwhile: this alarmed state is gone for good
        self._saved[key_id] = now
        self._dirty.discard(key_id)

    def flush(self) -> None:
        """Save every key's state that changed since its last save."""
        for key_id in sorted(self._dirty):
            if not self._unflagged(key_id):
                self._save(key_id, time.monotonic())

    def close(self) -> None:
        if self._executor is None:
            return
        self._executor.submit(self.flush).result()
        self._executor.shutdown(wait=True)
        self._executor = None
