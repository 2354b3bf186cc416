"""benchmarks/bench_sybil.py's bookkeeping: where each view raised the alarm, in the thief's
queries of all keys, and every key within its budget (a toy detector, a toy victim)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from divqat.blackbox import DefendedVictim
from divqat.defenses import create_defense
from divqat.detectors import Detector

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sybil.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sybil", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Bright(Detector):
    """Raises the alarm once it has seen ``window`` bright images (mean pixel > 0.5): a stand-in
    for a detector that needs a window of the thief's queries, tested at every query."""

    name = "bright"

    def __init__(self, window: int = 30) -> None:
        super().__init__()
        self.threshold, self.seen = window - 0.5, 0

    def _observe(self, images, labels, answers):
        out = []
        for i, bright in enumerate(images.mean(dim=(1, 2, 3)) > 0.5):
            self.seen += int(bright)
            out.append((self.queries + i + 1, float(self.seen)))
        return out

    def _reset(self):
        self.seen = 0

    def _state(self):
        return {"seen": self.seen}

    def _load_state(self, state):
        self.seen = state["seen"]


def test_the_sybil_sweep_counts_alarms_in_the_thiefs_queries_and_keeps_each_key_in_budget():
    bench = _bench()
    served = DefendedVictim(lambda x: torch.zeros(len(x), 3), create_defense("none"),
                            input_shape=(1, 4, 4), num_classes=3)
    thief = torch.full((100, 1, 4, 4), 255, dtype=torch.uint8)
    one = bench.watch_population(Bright, thief, served, keys=1, budget=100, batch=10, name="t")
    assert one["first_key_alarm"] == 30 and one["union_first_alarm"] == 30
    # Two keys of 50: requests of 10 alternate; key 1's 30th query is the thief's 50th.
    two = bench.watch_population(Bright, thief, served, keys=2, budget=100, batch=10, name="t")
    assert two["used"] == [50, 50] and two["per_key_budget"] == 50
    assert two["first_key_alarm"] == 50 and two["keys_alarmed_alone"] == 2
    assert two["union_first_alarm"] == 30 and two["keys_flagged"] == 2
    # Four keys of 25: no key sees 30 bright images; the union does, at the thief's 30th query.
    four = bench.watch_population(Bright, thief, served, keys=4, budget=100, batch=10, name="t")
    assert all(u <= 25 for u in four["used"]) and sum(four["used"]) == 100
    assert four["first_key_alarm"] is None and four["keys_alarmed_alone"] == 0
    assert four["union_first_alarm"] == 30 and four["keys_flagged"] == 4
    # Honest (dark) images: nothing flagged by either view.
    honest = bench.watch_population(Bright, torch.zeros_like(thief), served, keys=4, budget=100,
                                    batch=10, name="h")
    assert honest["union_first_alarm"] is None and honest["keys_flagged"] == 0
