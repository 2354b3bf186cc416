"""A detector on duty: what the black box and the service do with its verdicts."""

from __future__ import annotations

from torch import Tensor

from divqat.checks import check_choice
from divqat.detectors.base import Detector, Verdict

ON_ALARM = ("flag", "block", "labels-only")


class Monitor:
    """One client's detector and the policy once it raised the alarm.

    Arguments:
        detector (Detector): watches every answered query (its state is the client's).
        on_alarm (str): ``flag``: keep answering, record the alarm; ``block``: refuse every
            later query; ``labels-only``: answer later queries with labels only. The batch
            whose answers raised the alarm has been answered already (the detectors read the
            answers). (Default: flag.)

    Example::
        >>> monitor = Monitor(create_detector("prada"), on_alarm="block")
        >>> box = BlackBox(victim, defense, budget=10_000, monitor=monitor)
        >>> monitor.verdict.first_alarm       # queries until the alarm, or None
    """

    def __init__(self, detector: Detector, on_alarm: str = "flag") -> None:
        if not isinstance(detector, Detector):
            raise TypeError(f"a Monitor takes a divqat Detector, got {type(detector).__name__}")
        self.detector = detector
        self.on_alarm = check_choice("monitor", "on_alarm", on_alarm, ON_ALARM)

    def observe(self, images: Tensor, answers: Tensor) -> Verdict:
        return self.detector.observe(images, answers)

    @property
    def verdict(self) -> Verdict:
        return self.detector.verdict()

    @property
    def flagged(self) -> bool:
        return self.detector.verdict().flagged

    @property
    def blocks(self) -> bool:
        """Later queries are refused."""
        return self.on_alarm == "block" and self.flagged

    @property
    def labels_only(self) -> bool:
        """Later queries get labels only."""
        return self.on_alarm == "labels-only" and self.flagged

    def __repr__(self) -> str:
        return f"Monitor({self.detector!r}, on_alarm={self.on_alarm!r})"
