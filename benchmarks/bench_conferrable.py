"""Prototype: a fingerprint made of conferrable adversarial examples (after Lukas, Zhang and
Kerschbaum, ICLR 2021), against the API thieves of bench_fingerprint_thieves.py. A measurement,
not a divqat feature.

    nice -n 19 env OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_conferrable.py \\
        [--run runs/default] [--data-root data] [--seeds 0 1 2] [--references 3 4] \\
        [--eps 0.1] [--thieves runs/fingerprint-thieves] [--out runs/conferrable]

IPGuard's points sit just across the victim's own boundary, where a surrogate trained on the
victim's answers has no reason to put its boundary: they catch copies of the file and miss the
API thief (bench_fingerprint_thieves.py). A conferrable example is one whose (wrong) label the
victim passes on to the models derived from it and not to models trained independently on the
same data. The owner makes them with models of both kinds that it trains itself:

- surrogates: thieves the owner runs against its own victim (KnockoffNets, 5,000 of its own
  training images, 5 epochs as the default preset's thief; soft-label seed 100+S, label-only
  seed 200+S, soft-label resnet20 seed 300+S), standing in for the thieves it cannot see;
- references: fp32 teachers of the run trained on the same images with other seeds
  (``--references``), standing in for the independent models a false claim would come from.

From a test image x0 of victim label y and a target t != y drawn at random, Adam moves x within
an L-inf ball of radius ``--eps`` (on the 8-bit grid) to minimize

    CE(victim(x), t) + mean_S CE(S(x), t) - mean_R log(1 - p_R(t | x))

(the victim and its surrogates say t; the references do not), and a point is kept when the
int8 victim and every surrogate answer t and no reference does. The fingerprint is then the
points with the victim's labels t and sources y, matched by divqat's ``match`` unchanged (the
suspect's agreement with t, against its own agreement with y, one-sided binomial, verified at
1e-6).

Scored: the thieves of bench_fingerprint_thieves.py (``--thieves``: stolen from V_S by another
seed, recipe and, for two of them, another transfer set than the owner's; their 30-epoch ones
through ``--extra``), and the models never stolen from V_S that the generation never saw: the
QAT victims and fp32 teachers of the other seeds of ``--seeds`` and every thief stolen from them.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_fingerprint_thieves import RECIPES, by_seed, extra_surrogates, score, summarize
from torch import Tensor

from divqat.attacks import SurrogateTraining
from divqat.blackbox import DefendedVictim
from divqat.data import load_dataset
from divqat.defenses.none import NoDefense
from divqat.models.saved import load_model
from divqat.ownership.fingerprint import Fingerprint
from divqat.pipelines.attack import AttackRequest, attack_loaded, load_transfer_set
from divqat.pipelines.context import RunContext
from divqat.pipelines.export import fingerprint_images
from divqat.quant import quiet_torchao, straight_through
from divqat.victim import PROGRAM, load_victim, victim_metadata

LEVELS = 255.0
# The owner's own thieves: (name, label-only, arch, seed offset).
OWNER_THIEVES = [("soft", False, "resnet8", 100), ("label", True, "resnet8", 200), ("soft-r20", False, "resnet20", 300)]


def differentiable(folder: Path) -> torch.nn.Module:
    """A victim or teacher folder's program, through which the input's gradient flows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = straight_through(torch.export.load(folder / PROGRAM).module())
    return net


def on_grid(x: Tensor) -> Tensor:
    return x + ((x * LEVELS).round() / LEVELS - x).detach()


def conferrable(victim, surrogates, references, start: Tensor, source: Tensor, target: Tensor,
                eps: float, steps: int, lr: float) -> Tensor:
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            z = on_grid(x)
            loss = F.cross_entropy(victim(z), target, reduction="none")
            loss = loss + sum(F.cross_entropy(s(z), target, reduction="none") for s in surrogates) / len(surrogates)
            p_ref = [torch.softmax(r(z).float(), 1).gather(1, target[:, None])[:, 0] for r in references]
            loss = loss - sum(torch.log1p(-p.clamp(max=1 - 1e-6)) for p in p_ref) / len(references)
        (x.grad,) = torch.autograd.grad(loss.sum(), x)
        opt.step()
        with torch.no_grad():
            x.copy_(torch.minimum(torch.maximum(x, start - eps), start + eps).clamp(0, 1))
    return ((x.detach() * LEVELS).round() / LEVELS).clamp(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"))
    p.add_argument("--data-root", default="data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--references", type=int, nargs="+", default=[3, 4],
                   help="the run's fp32 teachers of these seeds guide the generation (and are never scored)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1], help="L-inf radii of the points (default 0.1)")
    p.add_argument("--points", type=int, default=100)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--thieves", type=Path, default=Path("runs/fingerprint-thieves"),
                   help="bench_fingerprint_thieves.py's --out (its 5-epoch surrogates)")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=SEED:PATH")
    p.add_argument("--out", type=Path, default=Path("runs/conferrable"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    quiet_torchao()
    qat, fp32 = by_seed(args.run)
    meta = victim_metadata(qat[args.seeds[0]])
    context = RunContext(data_root=args.data_root, progress=False, log=None)
    test = load_dataset(meta["dataset"], "test", args.data_root)
    own = load_transfer_set(f"{meta['dataset']}:train", meta, args.data_root, limit=5000)
    records_path = args.out / "owner.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}
    print(f"divqat conferrable fingerprint prototype, {time.strftime('%Y-%m-%d %H:%M %Z')}, run {args.run}, "
          f"threads {torch.get_num_threads()}", flush=True)

    print("1. the owner's own thieves (knockoff on 5,000 of its training images, 5 epochs, bf16):", flush=True)
    owner: dict[int, list[Path]] = {}
    for s in args.seeds:
        served = DefendedVictim(load_victim(qat[s]), NoDefense(), fuse=False)
        owner[s] = []
        for name, labels_only, arch, offset in OWNER_THIEVES:
            path = args.out / f"owner-{name}-s{s}.pt"
            owner[s].append(path)
            if path.is_file() and path.name in records:
                continue
            began = time.perf_counter()
            training = SurrogateTraining(arch=arch, epochs=5, batch_size=128, lr=0.1, weight_decay=5e-4,
                                         temperature=1.0, min_steps=150, precision="bf16", eval_precision="bf16",
                                         seed=offset + s, progress=False)
            request = AttackRequest(qat[s], "knockoff", [5000], transfer=f"{meta['dataset']}:train",
                                    training=training, labels_only=labels_only, save_surrogate=path)
            m = attack_loaded(request, served, context, test_set=test, transfer_set=own)
            records[path.name] = {"adversary_accuracy": m["adversary_accuracy"], "agreement": m["agreement"],
                                  "seconds": round(time.perf_counter() - began, 1)}
            records_path.write_text(json.dumps(records, indent=1))
            print(f"   {path.name}: adversary accuracy {m['adversary_accuracy']:.2%} "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)

    stolen = {(s, name): args.thieves / f"{name}-s{s}-e5.pt" for s in args.seeds for name, _, _ in RECIPES}
    stolen.update(extra_surrogates(args.extra))

    references = [differentiable(fp32[r]) for r in args.references]
    print(f"\n2. conferrable points (references: fp32 teachers of seeds {args.references}) and matches:", flush=True)
    rows = []
    for s in args.seeds:
        victim_net = differentiable(qat[s])
        victim = load_victim(qat[s], compile=False)
        surrogates = [load_model(path)[0] for path in owner[s]]
        for net in surrogates:
            net.requires_grad_(False)
        starts = fingerprint_images(meta, args.data_root, args.points, seed=s)
        with torch.no_grad():
            source = victim(starts).argmax(1)
        gen = torch.Generator().manual_seed(s)
        target = (source + torch.randint(1, len(meta["classes"]), (len(starts),), generator=gen)) % len(meta["classes"])
        others = [o for o in args.seeds if o != s]
        suspects = [("stolen", name, path) for (t, name), path in stolen.items() if t == s]
        suspects += [("independent", f"qat victim s{o}", qat[o]) for o in others]
        suspects += [("independent", f"fp32 teacher s{o}", fp32[o]) for o in others]
        suspects += [("independent", f"{name} of s{t}", path) for (t, name), path in stolen.items() if t in others]
        for eps in args.eps:
            began = time.perf_counter()
            moved = conferrable(victim_net, surrogates, references, starts, source, target, eps, args.steps, args.lr)
            with torch.no_grad():
                ok = victim(moved).argmax(1) == target
                for net in surrogates:
                    ok &= net(moved).argmax(1) == target
                for r in args.references:
                    ok &= load_victim(fp32[r], compile=False)(moved).argmax(1) != target
            idx = ok.nonzero()[:, 0][:args.points]
            fp = Fingerprint((moved[idx] * LEVELS).round().to(torch.uint8), target[idx], source[idx],
                             len(meta["classes"]), params={"method": "conferrable", "eps": eps})
            print(f"   seed {s}, eps {eps}: {len(idx)} of {len(starts)} candidates kept "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
            rows += score(fp, suspects, seed=s, eps=eps)
    (args.out / "matches.json").write_text(json.dumps(rows, indent=1))
    summarize(rows, "eps", args.eps)


if __name__ == "__main__":
    main()
