"""Does a victim's fingerprint of the file (IPGuard) also catch the copies an API thief trains on
its answers, and still spare the models that were never stolen from it? A measurement.

    nice -n 19 env OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_fingerprint_thieves.py \\
        [--run runs/default] [--data-root data] [--seeds 0 1 2] [--margins 0.5 2] [--points 100] \\
        [--epochs 5] [--extra NAME=SEED:PATH ...] [--out runs/fingerprint-thieves]

``benchmarks/bench_fingerprint.py`` measures the fingerprint against copies of the *file*
(fine-tuned, pruned, requantized). A thief behind the API never holds the file: its surrogate is
trained from scratch on the victim's answers, so it shares the victim's boundary only as far as
the answers taught it. Here, per seed S of a finished default-preset run (``make demo``):

- the fingerprint of ``victim qat | seed S`` as ``divqat export`` makes it (IPGuard points from
  the test split, the gradient through the int8 program's rounding, the labels from the int8
  victim), at each ``--margins`` (0.5 is divqat's default);
- the stolen copies: KnockoffNets as the default preset's thief stage (resnet8, 5,000 queries,
  ``--epochs``, min_steps 150, bf16, thief seed S) behind no defense, soft-label and label-only,
  from the holdout (in distribution) and from fashion-mnist[5-9] (same domain, other classes),
  and soft-label from animal-mnist; plus any ``--extra`` surrogate (e.g. the 30-epoch thieves
  of the ownership guide: ``e30-soft=0:/path/surrogate.pt``);
- the models never stolen from V_S: every other seed's QAT victim and fp32 teacher in the run
  (their own teachers, trained on the same images) and every thief stolen from another seed's
  victim here.

Each model is matched as ``divqat verify --fingerprint`` does (``match``: agreement with the
points' labels against the suspect's own agreement with their sources, one-sided binomial,
verified at 1e-6). Surrogates are kept under --out, so a rerun trains only what is missing.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from divqat.attacks import SurrogateTraining
from divqat.blackbox import DefendedVictim
from divqat.data import load_dataset
from divqat.defenses.none import NoDefense
from divqat.models.saved import load_model
from divqat.ownership.fingerprint import generate_fingerprint, match
from divqat.pipelines.attack import HOLDOUT, AttackRequest, attack_loaded, load_transfer_set
from divqat.pipelines.context import RunContext
from divqat.pipelines.export import fingerprint_images
from divqat.quant import quiet_torchao, straight_through
from divqat.victim import PROGRAM, load_victim, victim_metadata

# (name, transfer set, label-only): the default preset's three regimes.
RECIPES = [("soft-holdout", HOLDOUT, False), ("label-holdout", HOLDOUT, True),
           ("soft-fm59", "fashion-mnist[5-9]:train", False), ("label-fm59", "fashion-mnist[5-9]:train", True),
           ("soft-animal", "animal-mnist", False)]


def stages(run: Path, kind: str) -> dict[str, Path]:
    """label -> folder of the run's finished stages of one kind."""
    return {json.loads(d.read_text())["label"]: d.parent for d in sorted((run / "stages" / kind).glob("*/done.json"))}


def by_seed(run: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """The run's QAT victims and fp32 teachers, by seed."""
    def seeds(kind: str, prefix: str) -> dict[int, Path]:
        return {int(k.rsplit(" ", 1)[1]): v for k, v in stages(run, kind).items() if k.startswith(prefix)}

    return seeds("victim", "victim qat | seed "), seeds("fp32", "fp32 teacher | seed ")


def extra_surrogates(specs: list[str]) -> dict[tuple[int, str], Path]:
    """``--extra NAME=SEED:PATH`` as {(seed, name): path}."""
    out = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        seed, _, path = rest.partition(":")
        out[int(seed), name] = Path(path)
    return out


def labeller(path: Path):
    """A suspect's labeller: a saved surrogate (.pt) or a victim folder."""
    if path.suffix == ".pt":
        net = load_model(path)[0]
        return lambda x: net(x)
    return load_victim(path, compile=False)


def score(fp, suspects: list[tuple[str, str, Path]], **tag) -> list[dict]:
    """Every suspect (kind, name, path) matched against ``fp`` as ``divqat verify`` matches it;
    a row each, printed, with ``tag`` in it."""
    rows = []
    for kind, name, path in suspects:
        v = match(fp, labeller(path))
        rows.append({**tag, "kind": kind, "suspect": name, "agreed": v.agreed, "points": v.probes,
                     "chance": v.chance, "p": v.p_value, "verified": v.verified})
        print(f"     {kind:11s} {name:26s} {v.agreed:3d}/{v.probes} (chance {v.chance:.2f}) "
              f"p {v.p_value:.1e} {'VERIFIED' if v.verified else 'no'}", flush=True)
    return rows


def summarize(rows: list[dict], axis: str, values: list[float]) -> None:
    print(f"\n3. summary (per {axis} and kind: verified / tested, agreement range):")
    for value in values:
        for kind in ("stolen", "independent"):
            sel = [r for r in rows if r[axis] == value and r["kind"] == kind]
            if sel:
                agree = [r["agreed"] / r["points"] for r in sel]
                print(f"   {axis} {value}, {kind:11s}: {sum(r['verified'] for r in sel)}/{len(sel)} verified, "
                      f"agreement {min(agree):.0%}-{max(agree):.0%}, smallest p {min(r['p'] for r in sel):.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"))
    p.add_argument("--data-root", default="data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the victims fingerprinted and stolen")
    p.add_argument("--margins", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--points", type=int, default=100)
    p.add_argument("--epochs", type=int, default=5, help="the thieves' epochs (default 5, as the default preset)")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=SEED:PATH",
                   help="more surrogates stolen from seed SEED's QAT victim")
    p.add_argument("--out", type=Path, default=Path("runs/fingerprint-thieves"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    quiet_torchao()
    qat, fp32 = by_seed(args.run)
    missing = sorted(set(args.seeds) - set(qat))
    if missing:
        raise SystemExit(f"no 'victim qat | seed S' stage for seeds {missing} under {args.run}")
    meta = victim_metadata(qat[args.seeds[0]])
    context = RunContext(data_root=args.data_root, progress=False, log=None)
    test = load_dataset(meta["dataset"], "test", args.data_root)
    transfers = {}
    records_path = args.out / "thieves.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}

    print(f"divqat fingerprint vs API thieves, {time.strftime('%Y-%m-%d %H:%M %Z')}, run {args.run}, "
          f"threads {torch.get_num_threads()}", flush=True)
    print("1. thieves (knockoff, no defense, 5,000 queries, resnet8, min_steps 150, bf16):", flush=True)
    stolen: dict[tuple[int, str], Path] = {}
    for s in args.seeds:
        victim = load_victim(qat[s])
        served = DefendedVictim(victim, NoDefense(), fuse=False)
        for name, transfer, labels_only in RECIPES:
            path = args.out / f"{name}-s{s}-e{args.epochs}.pt"
            stolen[s, name] = path
            if path.is_file() and path.name in records:
                continue
            if transfer not in transfers:
                transfers[transfer] = load_transfer_set(transfer, meta, args.data_root)
            began = time.perf_counter()
            training = SurrogateTraining(arch="resnet8", epochs=args.epochs, batch_size=128, lr=0.1,
                                         weight_decay=5e-4, temperature=1.0, min_steps=150, precision="bf16",
                                         eval_precision="bf16", seed=s, progress=False)
            request = AttackRequest(qat[s], "knockoff", [5000], transfer=transfer, training=training,
                                    labels_only=labels_only, save_surrogate=path)
            m = attack_loaded(request, served, context, test_set=test, transfer_set=transfers[transfer])
            records[path.name] = {k: m[k] for k in ("adversary_accuracy", "agreement")}
            records[path.name]["seconds"] = round(time.perf_counter() - began, 1)
            records_path.write_text(json.dumps(records, indent=1))
            print(f"   {path.name}: adversary accuracy {m['adversary_accuracy']:.2%}, agreement "
                  f"{m['agreement']:.2%} ({time.perf_counter() - began:.0f} s)", flush=True)
    stolen.update(extra_surrogates(args.extra))

    print("\n2. fingerprints and matches (verified at p <= 1e-6):", flush=True)
    rows = []
    for s in args.seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = straight_through(torch.export.load(qat[s] / PROGRAM).module())
        victim = load_victim(qat[s], compile=False)
        starts = fingerprint_images(meta, args.data_root, args.points, seed=s)
        suspects = [("stolen", name, path) for (t, name), path in stolen.items() if t == s]
        suspects += [("independent", f"qat victim s{o}", qat[o]) for o in sorted(qat) if o != s]
        suspects += [("independent", f"fp32 teacher s{o}", fp32[o]) for o in sorted(fp32) if o != s]
        suspects += [("independent", f"{name} of s{t}", path) for (t, name), path in stolen.items() if t != s]
        for margin in args.margins:
            began = time.perf_counter()
            fp = generate_fingerprint(net, starts, points=args.points, margin=margin, labels_of=victim, seed=s)
            print(f"   seed {s}, margin {margin}: {len(fp)} points in {time.perf_counter() - began:.0f} s", flush=True)
            rows += score(fp, suspects, seed=s, margin=margin)
    (args.out / "matches.json").write_text(json.dumps(rows, indent=1))
    summarize(rows, "margin", args.margins)


if __name__ == "__main__":
    main()
