"""The ``calibrate`` kind (``detectors:``): one extraction detector calibrated on one victim (a
threshold for the target false-alarm rate on honest streams of training images), and its
false-alarm rate on honest clients it never saw. Every attack stage on that victim then runs
watched by the calibrated detectors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.experiment.results import CalibrationRow, victim_columns, victim_info
from divqat.experiment.sizes import Sizes
from divqat.experiment.stages.base import StageKind, register_kind

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask


@register_kind
class Calibrate(StageKind):
    name = "calibrate"
    order = 40
    per_victim = True
    table = "calibrations"

    def plan(self, scope: PlanScope) -> list[Stage]:
        stages = []
        for det in scope.config.detectors:
            spec = {"name": det.name, "params": det.params, "target_far": det.target_far,
                    "streams": det.streams, "benign_streams": det.benign_streams,
                    "length": scope.config.stream_length(), "seed": scope.seed}
            stages.append(self.stage(spec, f"calibrate {det.name} | {scope.who} | seed {scope.seed}",
                                     (scope.victim.key,), scope.seed))
        return stages

    def provide(self, source: Stage, folder: str, folders: dict[str, str],
                context: dict[str, Any]) -> None:
        folders[f"calibration:{source.spec['name']}"] = folder
        context.setdefault("detectors", {})[source.spec["name"]] = source.spec["params"]

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        s = task.spec
        return work.calibrate(folder, task.folders["victim"], name=s["name"], params=s["params"],
                              target_far=s["target_far"], streams=s["streams"], length=s["length"],
                              benign_streams=s["benign_streams"], seed=s["seed"])

    def summary(self, result: dict[str, Any]) -> str:
        r = result
        return (f"{r['detector']} threshold {r['threshold']:.6g}; false alarms {r['false_alarms']}/"
                f"{r['benign_streams']} honest streams of {r['benign_length']}")

    def rows(self, stage: Stage, ctx: RowsContext) -> list[CalibrationRow]:
        r = ctx.result(stage.key)
        return [{**victim_columns(victim_info(ctx.by_key[stage.inputs[0]], ctx)),
                 "detector": r["detector"], "threshold": r["threshold"],
                 "target_far": r["target_far"], "false_alarm_rate": r["false_alarm_rate"],
                 "false_alarms": r["false_alarms"], "benign_streams": r["benign_streams"],
                 "benign_length": r["benign_length"], "stage": stage.key[:16]}]

    def estimate(self, spec: dict[str, Any], sizes: Sizes) -> tuple[str, float]:
        return f"calibrate {spec['name']}", float((spec["streams"] + spec["benign_streams"]) * spec["length"])

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return f"calibrate {label.split(' ')[1]}"
