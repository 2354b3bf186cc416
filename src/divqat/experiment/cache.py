"""The stage cache: every stage of an experiment lives in ``OUT/stages/<kind>/<key>/``.

A stage's key is the sha256 of canonical JSON of its own settings and the keys of the stages it
reads, so a key changes exactly when something the stage depends on changes (one alpha more:
one victim key more, and the keys of its defenses and attacks; the others stay).

``done.json`` is written last and atomically (temp file + rename): a stage folder without it is
an interrupted stage, deleted and recomputed. ``done.json`` also holds a random token; a stage
records its inputs' tokens, so a stage whose input was recomputed since (its folder deleted by
hand, say) is stale and is recomputed too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from divqat.io import write_json

DONE = "done.json"
KEY_CHARS = 16  # of the sha256 hex digest, in folder names


def stage_key(kind: str, spec: dict[str, Any], inputs: list[str] | tuple[str, ...] = ()) -> str:
    """sha256 (hex) of canonical JSON of a stage's kind, its settings and its inputs' keys."""
    text = json.dumps({"kind": kind, "spec": spec, "inputs": list(inputs)}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


class StageCache:
    """Folders of finished and unfinished stages under ``root/stages``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "stages"

    def folder(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:KEY_CHARS]

    def records(self) -> list[dict[str, Any]]:
        """Every finished stage's record in the folder, whatever config it belonged to."""
        out = []
        for path in sorted(self.root.glob(f"*/*/{DONE}")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and "kind" in record and "seconds" in record:
                out.append(record)
        return out

    def load(self, kind: str, key: str, input_tokens: dict[str, str]) -> dict[str, Any] | None:
        """The ``done.json`` record of a finished stage, or None when the stage has to run:
        never run, interrupted, or run on inputs that were recomputed since."""
        path = self.folder(kind, key) / DONE
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        if record.get("inputs") != input_tokens:
            return None
        return record

    def start(self, kind: str, key: str) -> Path:
        """An empty folder for a stage about to run (what an interrupted run left is deleted)."""
        folder = self.folder(kind, key)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    def finish(self, kind: str, key: str, *, label: str, spec: dict[str, Any],
               input_tokens: dict[str, str], result: dict[str, Any], seconds: float,
               **extra: Any) -> dict[str, Any]:
        """Write ``done.json`` (last, atomically) and return the record. ``extra`` is kept in it
        as is (where the stage ran, where its time went)."""
        record = {"kind": kind, "key": key, "label": label, "spec": spec, "inputs": input_tokens,
                  "token": uuid.uuid4().hex, "seconds": seconds,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra, "result": result}
        write_json(self.folder(kind, key) / DONE, record)
        return record


__all__ = ["DONE", "StageCache", "stage_key"]
