"""One extraction detector per API key, its state kept in the key database across restarts.

``KeyWatch`` builds a fresh detector for a key on its first request (or restores the one saved
in the ``detector_state`` table, if it was saved by the same detector with the same settings),
feeds it every answered request's images and answers in one thread of its own (so the event
loop keeps serving while a detector works, and each key's requests are observed in the order
they were answered), and saves its state:

- at once when the detector raises its first alarm for the key, together with the key's flag
  (``KeyStore.flag``: when, by which detector, its score, after how many queries);
- otherwise at most every ``save_every`` seconds per key (a growing state, PRADA's sets, costs
  milliseconds to write), and for every key when the service stops (SIGTERM, Ctrl-C).

So a crash (kill -9) loses at most ``save_every`` seconds of a key's stream from its detector's
memory, never a flag; ``save_every=0`` saves after every request.
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

    def open(self, store: KeyStore) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="divqat-detector")

    async def observe(self, key_id: int, images: Tensor, answers: Tensor) -> Verdict:
        """The key's detector after watching this request."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._observe, key_id, images, answers)

    def _detector(self, key_id: int) -> Detector:
        detector = self._detectors.get(key_id)
        if detector is None:
            detector = self.make()
            saved = self._store.detector_state(key_id, self.name, self.config)
            if saved is not None:
                detector.load_state_dict(state_from_bytes(saved))
            self._detectors[key_id] = detector
            self._saved[key_id] = time.monotonic()
        return detector

    def _observe(self, key_id: int, images: Tensor, answers: Tensor) -> Verdict:
        detector = self._detector(key_id)
        was_flagged = detector.verdict().flagged
        verdict = detector.observe(images, answers)
        now = time.monotonic()
        if verdict.flagged and not was_flagged:
            self._save(key_id, now)
            self._store.flag(key_id, self.name, verdict.score, verdict.first_alarm)
        elif now - self._saved.get(key_id, -math.inf) >= self.save_every:
            self._save(key_id, now)
        else:
            self._dirty.add(key_id)
        return verdict

    def _save(self, key_id: int, now: float) -> None:
        detector = self._detectors[key_id]
        self._store.save_detector_state(key_id, self.name, self.config,
                                        state_to_bytes(detector.state_dict()), detector.queries)
        self._saved[key_id] = now
        self._dirty.discard(key_id)

    def flush(self) -> None:
        """Save every key's state that changed since its last save."""
        for key_id in sorted(self._dirty):
            self._save(key_id, time.monotonic())

    def close(self) -> None:
        if self._executor is None:
            return
        self._executor.submit(self.flush).result()
        self._executor.shutdown(wait=True)
        self._executor = None
