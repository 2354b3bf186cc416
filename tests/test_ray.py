"""`divqat run --executor ray`: the same numbers as the serial executor, the smoke preset on a
local two-node Ray cluster (both nodes run stages), and a run under Ray killed with SIGTERM and
resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from divqat.experiment import load_preset, load_results, run_experiment
from divqat.experiment.cache import DONE
from divqat.experiment.executors import RayExecutor

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

SMALL_STORE = 80 * 1024 * 1024  # bytes of object store per node: stages pass only small records


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "stages").glob(f"*/*/{DONE}"))]


# Fields that measure time, not results: left out when two runs' results are compared.
TIMING_FIELDS = {"seconds", "phases", "worker", "finished", "train_seconds", "attack_seconds",
                 "ms_per_query_clean", "ms_per_query_defended", "latency_ratio", "stage_times"}
SAME_NUMBERS_CONFIG = {
    "name": "same-numbers", "seeds": [0],
    # A registered dataset the Ray workers load too (the test-only one lives in this process).
    "victim": {"dataset": "mnist[0-4]", "arch": "resnet8", "limit": 200, "holdout": 100},
    "fp32": {"epochs": 1}, "qat": {"epochs": 1}, "divqat": {"alphas": [2.0], "epochs": 1},
    "defenses": ["none", {"name": "dcp", "params": {"beta": 0.5}}],
    "attacks": [{"name": "knockoff", "transfer": "holdout", "labels_only": [False, True],
                 "budgets": [50], "surrogate": {"epochs": 1}}],
}


def _differences(a, b, path="") -> list[str]:
    """Where two results documents differ, timings aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) if k not in TIMING_FIELDS
                for d in (_differences(a[k], b[k], f"{path}.{k}") if k in a and k in b
                          else [f"{path}.{k}: only in one"])]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_serial_and_ray_give_the_same_numbers_and_share_their_stages(tmp_path):
    # First in this file: it starts its own local Ray instance before the two-node cluster's.
    """The same config and seed under the serial executor (this process) and under Ray (two
    one-CPU workers): every result field identical but the timings; and a folder the serial
    executor finished is resumed under Ray with every stage reused."""
    from divqat.experiment import parse_config

    config = parse_config(SAME_NUMBERS_CONFIG)
    serial = run_experiment(config, tmp_path / "serial", progress=False, say=lambda _: None)
    ray_run = run_experiment(config, tmp_path / "ray", progress=False, say=lambda _: None,
                             executor=RayExecutor())
    assert _differences(load_results(tmp_path / "serial"), load_results(tmp_path / "ray")) == []
    assert serial["attacks"] and len(serial["attacks"]) == len(ray_run["attacks"])
    assert {r["worker"]["executor"] for r in ray_run["stage_times"]} == {"ray"}
    assert serial["numerics"]["threads"] == 1 and len(serial["numerics"]["distinct"]) == 1

    lines: list[str] = []
    resumed = run_experiment(config, tmp_path / "serial", progress=False, say=lines.append,
                             executor=RayExecutor())
    total = resumed["stages"]["total"]
    assert resumed["stages"] == {"total": total, "ran": 0, "cached": total, "skipped": 0, "failed": 0}
    assert not any("recomputing" in line for line in lines)


@pytest.fixture(scope="module")
def smoke_on_two_nodes(tmp_path_factory):
    """The smoke preset run on a two-node cluster (one CPU each), which is stopped afterwards."""
    out = tmp_path_factory.mktemp("ray") / "smoke"
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": SMALL_STORE, "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        cluster.wait_for_nodes()
        lines: list[str] = []
        start = time.perf_counter()
        results = run_experiment(load_preset("smoke"), out, progress=False, say=lines.append,
                                 executor=RayExecutor(cpus_per_stage=1))
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"out": out, "results": results, "lines": lines, "seconds": seconds}


def test_smoke_preset_runs_on_two_ray_nodes(smoke_on_two_nodes):
    results, out = smoke_on_two_nodes["results"], smoke_on_two_nodes["out"]
    n = len(_records(out))
    assert results["stages"] == {"total": n, "ran": n, "cached": 0, "skipped": 0, "failed": 0}
    workers = [r["worker"] for r in _records(out)]
    assert {w["executor"] for w in workers} == {"ray"}
    assert all(w["threads"] == 1 for w in workers)  # torch's threads match the stage's CPU share
    assert len({w["node"] for w in workers}) == 2, "both nodes ran stages"
    assert len({w["pid"] for w in workers}) == 2  # one stage worker per CPU, reused across stages
    # What the serial runner promises: the progress lines, the results files, the timing stage.
    lines = smoke_on_two_nodes["lines"]
    assert any("... running (worker" in line for line in lines)
    assert any(line.startswith("    progress:") and "running" in line and "left" in line
               for line in lines)
    from divqat.experiment import load_preset, plan_stages

    planned = sum(len(s.spec["budgets"]) for s in plan_stages(load_preset("smoke")) if s.kind == "attack")
    assert len(results["attacks"]) == planned and results["timings"]
    assert all(r["timing"] == "side by side" for r in results["attacks"])
    assert (out / "report.md").is_file() and load_results(out)["attacks"] == results["attacks"]


def test_a_run_under_ray_killed_with_sigterm_resumes(smoke_on_two_nodes, tmp_path):
    """Its attack stages undone, the smoke run is run again under Ray (a local instance) and
    stopped with SIGTERM after its first finished stages; the next run runs only the rest."""
    out = tmp_path / "smoke"
    shutil.copytree(smoke_on_two_nodes["out"], out)
    attacks = sorted((out / "stages" / "attack").iterdir())
    for folder in attacks:
        (folder / DONE).unlink()
    command = [sys.executable, "-m", "divqat.cli", "run", "--preset", "smoke", "--executor", "ray",
               "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    done = 0
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:  # stop once two attacks finished while others run
            done += "attack" in line and "... done in" in line
            if done >= 2 and time.monotonic() < deadline:
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "run the same command again to resume" in stderr
    finished = [f for f in attacks if (f / DONE).exists()]
    assert 2 <= len(finished) < len(attacks)

    lines: list[str] = []
    results = run_experiment(load_preset("smoke"), out, progress=False, say=lines.append,
                             executor=RayExecutor(cpus_per_stage=1))
    total = results["stages"]["total"]
    assert results["stages"] == {"total": total, "ran": len(attacks) - len(finished),
                                 "cached": total - len(attacks) + len(finished), "skipped": 0,
                                 "failed": 0}
    assert all((f / DONE).exists() for f in attacks)
    assert len(results["attacks"]) == len(smoke_on_two_nodes["results"]["attacks"])

