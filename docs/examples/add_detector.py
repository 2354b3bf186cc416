"""Add a detector: alarm when a client's answers are unsure on average.

One file, one class on ``divqat.detectors.Detector``, registered by name. The detector sees each
batch of a client's queries and the answers it got, tests at fixed stream positions (so the
verdicts do not depend on how the stream is cut into requests), and keeps its whole memory of the
stream in ``_state`` so that the service can save and restore it per API key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from divqat.checks import check_int, check_number
from divqat.detectors import DETECTORS, Detector


@DETECTORS.register("unsure")
class Unsure(Detector):
    """Unsure answers: the mean top probability of a client's last ``window`` answers.

    Natural in-distribution images mostly get confident answers; noise, synthesized images and
    foreign transfer sets get unsure ones. Every ``check_every`` queries, once ``window`` answers
    exist, the score is their mean top probability, and a score below ``threshold`` raises the
    alarm (``divqat calibrate`` sets it for a target false-alarm rate).

    Arguments:
        threshold (float, optional): alarm below this score. (Default: None, no alarm.)
        window (int): answers in the mean. (Default: 128.)
        check_every (int): queries between tests. (Default: 32.)
    """

    name = "unsure"
    alarm_when = "below"
    calibrated = True

    def __init__(self, threshold: float | None = None, window: int = 128, check_every: int = 32) -> None:
        super().__init__()
        self.threshold = check_number(self.name, "threshold", threshold, optional=True)
        self.window = check_int(self.name, "window", window, low=1)
        self.check_every = check_int(self.name, "check_every", check_every, low=1)
        self._reset()

    def _observe(self, images: Tensor, labels: Tensor, answers: Tensor) -> list[tuple[int, float]]:
        top = answers.amax(dim=1).double() if answers.ndim == 2 else torch.ones(len(labels), dtype=torch.float64)
        tests = []
        for i, p in enumerate(top):
            self._recent = torch.cat([self._recent, p.view(1)])[-self.window:]
            position = self.queries + i + 1
            if position % self.check_every == 0 and len(self._recent) == self.window:
                tests.append((position, float(self._recent.mean())))
        return tests

    def _reset(self) -> None:
        self._recent = torch.empty(0, dtype=torch.float64)

    def _state(self) -> dict[str, Any]:
        return {"recent": self._recent.clone()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._recent = state["recent"].clone()


def demo() -> Unsure:
    """An honest stream of confident answers stays silent; a stream of unsure ones raises the
    alarm; a detector restored from the saved state gives the same verdicts."""
    from divqat.detectors import create_detector

    images = torch.rand(256, 1, 8, 8)
    confident = torch.full((256, 4), 0.02).index_fill_(1, torch.tensor([0]), 0.94)
    unsure = torch.full((256, 4), 0.25)

    detector = create_detector("unsure", threshold=0.6, window=64, check_every=32)
    assert not detector.observe(images, confident).flagged
    saved = detector.state_dict()
    verdict = detector.observe(images, unsure)
    assert verdict.flagged and verdict.first_alarm > 256

    restored = create_detector("unsure", threshold=0.6, window=64, check_every=32)
    restored.load_state_dict(saved)
    assert restored.observe(images, unsure) == verdict
    return detector


if __name__ == "__main__":
    print(demo().verdict())
