"""The device program against the torch int8 victim: parity, speed, size and accuracy, in one run.

    python benchmarks/bench_edge.py --teacher runs/fp32 --edge-qat runs/edge-qat \\
        [--edge-divqat runs/edge-divqat] [--x86-qat runs/qat] [--programs runs/programs] \\
        [--threads 1] [--rounds 7] [--iters 20]

Needs divqat[edge]. Exports (into ``--programs``, reusing a program already there) the edge QAT
victim as ``qat.pte``, the same with DCP (beta 0.5) fused inside as ``qat-dcp.pte``, the fp32
teacher as ``fp32.pte`` and, with ``--edge-divqat``, ``divqat.pte``; then on the victim's whole
test split:

- parity: argmax agreement of each int8 ``.pte`` with its torch int8 victim (the converted
  program run by torch: the reference), the largest posterior and logit differences; for the fused
  DCP program, the largest difference of its answers from DCP applied in-process to the plain
  program's posteriors (same clean input), and from DCP applied to the torch victim's posteriors on
  the rows where the two clean posteriors match to 1e-6, 1e-7 and exactly (DCP's gate,
  nu = 1000, multiplies a difference near tau by up to 250);
- speed at batch 1, 32 and 256 (``--threads``, default 1): each program's ``forward`` through the
  ExecuTorch runtime, the torch int8 programs compiled at that exact batch size (the x86 victim
  with inductor freezing, its oneDNN int8 kernels; the edge victim without, see
  ``quant.compile_int8``), and the fp32 ``.pte``. Timed in rounds: each round runs a warm block of
  ``--iters`` calls of every candidate back to back, in an order rotated per round; the figure is
  the median over ``--rounds`` of the block means, and every ratio is taken within this run;
- file sizes (the sealed size too: the seal adds a fixed 51 bytes);
- accuracy: int8 test accuracy and KL(fp32 || int8) of the edge QAT and DivQAT victims (from their
  training metrics) and of their programs, measured here.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from divqat.blackbox import DefendedVictim
from divqat.data import load_dataset, to_float
from divqat.defenses import create_defense
from divqat.pipelines.export import export_victim
from divqat.pipelines.train import teacher_distances
from divqat.quant import compile_int8
from divqat.sealed import seal
from divqat.victim import load_victim

DCP = {"beta": 0.5}


def _program(victim_dir: Path, out: Path, defense: str | None = None) -> tuple[Path, float | None]:
    """Export unless a program newer than the victim is already there; (path, export seconds)."""
    if out.exists() and out.stat().st_mtime > (victim_dir / "victim.json").stat().st_mtime:
        return out, None
    # No fingerprint: export_seconds stays the lowering's, comparable with earlier runs.
    info = export_victim(victim_dir, out, defense=defense, defense_params=DCP if defense else None,
                         fingerprint=False)
    return out, info["seconds"]


def _batched(fn, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


def _raw_torch(victim_dir: Path, batch: int):
    """The torch int8 program compiled for exactly ``batch`` rows (no bucket padding)."""
    victim = load_victim(victim_dir, compile=False)
    run = compile_int8(victim._module, victim._freezing)
    x = torch.rand(batch, *victim.input_shape)
    with torch.no_grad():
        run(x)  # compiles
    return lambda: run(x)


def _raw_pte(path: Path, batch: int):
    victim = load_victim(path)
    x = torch.rand(batch, *victim.input_shape)
    victim._forward.execute([x])
    # Through the victim, which owns the program: a method outliving its program crashes.
    return lambda: victim._forward.execute([x])


def _time(candidates: dict, rounds: int, iters: int) -> dict[str, float]:
    """Median over rounds of the mean ms per call of a warm block, order rotated per round."""
    names = list(candidates)
    per: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            call = candidates[n]
            call()
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(iters):
                    call()
            per[n].append((time.perf_counter() - start) / iters * 1000)
    return {n: statistics.median(v) for n, v in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--edge-qat", type=Path, required=True)
    p.add_argument("--edge-divqat", type=Path)
    p.add_argument("--x86-qat", type=Path, help="an x86 int8 victim: the torch fast path to compare")
    p.add_argument("--programs", type=Path, default=Path("runs/programs"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--data-root")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    faulthandler.enable()  # the runtime is C++: a crash should say where
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: dict = {"threads": args.threads, "machine": platform.processor() or platform.machine()}

    # ---- programs
    args.programs.mkdir(parents=True, exist_ok=True)
    qat_pte, s1 = _program(args.edge_qat, args.programs / "qat.pte")
    dcp_pte, s2 = _program(args.edge_qat, args.programs / "qat-dcp.pte", "dcp")
    fp32_pte, s3 = _program(args.teacher, args.programs / "fp32.pte")
    pairs = [("qat", args.edge_qat, qat_pte)]
    if args.edge_divqat:
        div_pte, _ = _program(args.edge_divqat, args.programs / "divqat.pte")
        pairs.append(("divqat", args.edge_divqat, div_pte))
    out["export_seconds"] = {"qat": s1, "qat-dcp": s2, "fp32": s3}

    # ---- parity and accuracy on the whole test split
    meta = load_victim(args.edge_qat, compile=False).metadata
    test = load_dataset(meta["dataset"], "test", args.data_root)
    x, labels = to_float(test.images), torch.as_tensor(test.labels)
    teacher = _batched(load_victim(args.teacher), x)
    out["teacher_accuracy"] = float((teacher.argmax(1) == labels).float().mean())
    out["parity"], out["accuracy"] = {}, {}
    programs = {}
    for name, vdir, pte in pairs:
        torch_logits = _batched(load_victim(vdir), x)
        program = load_victim(pte)
        programs[name] = program
        pte_logits = _batched(program, x)
        tp, pp = torch.softmax(torch_logits, 1), torch.softmax(pte_logits, 1)
        out["parity"][name] = {
            "argmax_agreement": float((tp.argmax(1) == pp.argmax(1)).float().mean()),
            "max_posterior_difference": float((tp - pp).abs().max()),
            "max_logit_difference": float((torch_logits - pte_logits).abs().max())}
        trained = json.loads((vdir / "metrics.json").read_text())
        out["accuracy"][name] = {
            "torch_int8_accuracy": trained["int8_test_accuracy"], "torch_kl_to_teacher": trained["kl_to_teacher"],
            "pte_accuracy": float((pp.argmax(1) == labels).float().mean()),
            "pte_kl_to_teacher": teacher_distances(teacher, pte_logits)["kl_to_teacher"]}
        if name == "qat":
            qat_torch_post, qat_pte_post = tp, pp
    fused = load_victim(dcp_pte).program_outputs(x)
    dcp = create_defense("dcp", **DCP)
    on_program = _batched(lambda b: DefendedVictim(programs["qat"], dcp)(b).defended, x)
    on_torch = dcp(qat_torch_post)
    gap = (qat_torch_post - qat_pte_post).abs().amax(1)
    out["parity"]["qat-dcp"] = {
        "max_difference_vs_dcp_on_program_posteriors": float((fused - on_program).abs().max()),
        # Per tolerance on the clean posteriors: (rows within it, largest defended difference).
        "vs_dcp_on_torch_where_clean_match": {
            str(tol): (int((gap <= tol).sum()), float((fused - on_torch)[gap <= tol].abs().max())
                       if (gap <= tol).any() else None) for tol in (1e-6, 1e-7, 0.0)},
        "argmax_agreement_with_in_process_dcp": float((fused.argmax(1) == on_torch.argmax(1)).float().mean())}

    # ---- speed
    out["latency_ms"] = {}
    for batch in (1, 32, 256):
        candidates = {"pte int8": _raw_pte(qat_pte, batch), "pte int8 + dcp": _raw_pte(dcp_pte, batch),
                      "pte fp32": _raw_pte(fp32_pte, batch),
                      "torch int8 edge (compiled)": _raw_torch(args.edge_qat, batch)}
        if args.x86_qat:
            candidates["torch int8 x86 (compiled, frozen)"] = _raw_torch(args.x86_qat, batch)
        out["latency_ms"][batch] = _time(candidates, args.rounds, args.iters)

    # ---- sizes
    sizes = {"pte int8": qat_pte.stat().st_size, "pte int8 + dcp": dcp_pte.stat().st_size,
             "pte fp32": fp32_pte.stat().st_size,
             "pte int8 sealed": len(seal(qat_pte.read_bytes(), bytes(32))),
             "torch int8 edge victim.pt2": (args.edge_qat / "victim.pt2").stat().st_size,
             "torch fp32 victim.pt2": (args.teacher / "victim.pt2").stat().st_size}
    if args.x86_qat:
        sizes["torch int8 x86 victim.pt2"] = (args.x86_qat / "victim.pt2").stat().st_size
    out["bytes"] = sizes
    out["seconds"] = time.perf_counter() - start
    _print(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


def _print(out: dict) -> None:
    print(f"threads {out['threads']}, fp32 teacher accuracy {out['teacher_accuracy']:.2%}, "
          f"{out['seconds']:.0f} s in all")
    print("\nparity on the test split (program vs torch int8 victim)")
    print("| victim | argmax agreement | largest posterior diff | largest logit diff |\n|---|---|---|---|")
    for name in ("qat", "divqat"):
        if name in out["parity"]:
            r = out["parity"][name]
            print(f"| {name} | {r['argmax_agreement']:.2%} | {r['max_posterior_difference']:.2e} | "
                  f"{r['max_logit_difference']:.3f} |")
    r = out["parity"]["qat-dcp"]
    print(f"fused DCP: vs DCP on the program's own posteriors {r['max_difference_vs_dcp_on_program_posteriors']:.2e}; "
          f"argmax agreement with DCP on the torch victim {r['argmax_agreement_with_in_process_dcp']:.2%}; "
          "vs DCP on the torch victim's posteriors where the clean ones match to "
          + ", ".join(f"{tol}: {'n/a' if w is None else f'{w:.2e}'} ({n} rows)"
                      for tol, (n, w) in r["vs_dcp_on_torch_where_clean_match"].items()))
    print("\nlatency, ms per call (median of rounds)")
    names = list(out["latency_ms"][1])
    print("| batch | " + " | ".join(names) + " | dcp / plain pte | pte int8 / torch int8 edge | pte int8 / pte fp32 |")
    print("|---" * (len(names) + 4) + "|")
    for batch, t in out["latency_ms"].items():
        cells = " | ".join(f"{t[n]:.3f}" for n in names)
        print(f"| {batch} | {cells} | {t['pte int8 + dcp'] / t['pte int8']:.3f}x | "
              f"{t['pte int8'] / t['torch int8 edge (compiled)']:.2f}x | {t['pte int8'] / t['pte fp32']:.2f}x |")
    print("\nfile sizes, KiB")
    print(" | ".join(f"{k} {v / 1024:.1f}" for k, v in out["bytes"].items()))
    print("\naccuracy on the test split (KL to the fp32 teacher)")
    print("| victim | torch int8 acc | torch KL | .pte acc | .pte KL |\n|---|---|---|---|---|")
    for name, r in out["accuracy"].items():
        print(f"| edge {name} | {r['torch_int8_accuracy']:.2%} | {r['torch_kl_to_teacher']:.4f} | "
              f"{r['pte_accuracy']:.2%} | {r['pte_kl_to_teacher']:.4f} |")


if __name__ == "__main__":
    main()
