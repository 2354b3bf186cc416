"""Prototype: a region watermark (a keyed region of input space answered with a keyed relabelling)
against the default experiment's KnockoffNets thief, soft-label and label-only. A measurement, not
a divqat feature.

    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_region_mark.py \\
        [--run runs/default] [--data-root data] [--seeds 0 1 2] [--rates 0.02 0.05] \\
        [--plain-dir runs/coswm-bench] [--epochs 5] [--null 200] [--out runs/region-bench]

DAWN's watermark answers a wrong label for a keyed 0.5 % of the queries, one image at a time,
which an augmenting thief does not repeat; CosWM's cosine ripple on every soft answer is blurred
away too (bench_cosine_mark.py). This mark asks the thief to learn a RULE instead: a keyed feature
t(x) that the thief's augmentation (random crop, pad 4, and flip) barely moves -- a keyed
projection of the 16-bin soft intensity histogram, standardized on the victim's held-out images --
and a region R = {x : t(x) > q}, q the quantile that puts a share r (--rates) of the held-out
images in R. Inside R the box answers pi(y), y the victim's argmax and pi(y) = (y + 1 + k) mod K a
keyed derangement (soft answers: the posteriors of y and pi(y) swapped, so pi(y) is the argmax);
outside R the answer is unchanged.

Per rate and seed: the int8 QAT victim of that seed (``victim qat | seed S`` under
RUN/stages/victim) behind the mark (``RegionMark``, a ``Defense`` that reads the query images); the
thief exactly as the default experiment's stage (``attack_loaded``: knockoff, transfer set the
holdout, budget 5,000, resnet8, --epochs, min_steps 150, bf16, thief seed S), soft-label and
label-only; its surrogate saved and reloaded as ``divqat verify`` would.

Measured: the honest cost (the victim's test accuracy with and without the mark; about r times
the accuracy), the thief's adversary accuracy, and verification on the victim's TEST split (the
thief never asked those): among the test images inside R (the probes), the share the suspect
answers with pi(y_victim), against the suspect's own chance rate, the share of the test images
OUTSIDE R it answers with pi(y_victim); p is a one-sided binomial test of the in-region hits
against that chance rate (Laplace-smoothed, (hits + 1) / (n + 2), so a suspect that never answers
pi(y) outside R is not given a zero null), verified when p <= 1e-6 (divqat's default
significance). That null ignores that R is atypical and class-skewed (the histogram tracks the
class), so the same agreement is also scored against --null random keys of the same rate (another
histogram direction and shift): ``z`` (in their sd) and ``p_emp``. Independent models: the surrogates the same soft recipe stole from the UNMARKED
victims (--plain-dir, as bench_cosine_mark.py keeps them: plain-sS-eE.pt), the unmarked victims,
and the surrogates stolen from the other seeds' marked victims (other keys), all scored against
every key in use. Surrogates and records are kept under --out, so a rerun trains only what is
missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# The intensity histogram t(x) projects, the victims' lookup and the posteriors: the cosine mark's.
from bench_cosine_mark import BINS, histogram, posteriors_of, setting
from scipy import stats
from torch import Tensor

from divqat.attacks import SurrogateTraining
from divqat.blackbox import DefendedVictim
from divqat.data.transforms import augment
from divqat.defenses.base import Defense
from divqat.models.saved import load_model
from divqat.pipelines.attack import HOLDOUT, AttackRequest, attack_loaded
from divqat.victim import load_victim

SIGNIFICANCE = 1e-6             # divqat verify's default



@dataclass(frozen=True)
class RegionKey:
    """A region key: the histogram direction w, the standardization of t (mean, sd over the
    victim's held-out images), the threshold q (t > q on a share ``rate`` of them) and the shift k
    of the relabelling pi(y) = (y + 1 + k) mod K."""

    w: Tensor
    mean: float
    sd: float
    q: float
    shift: int
    num_classes: int
    rate: float

    @staticmethod
    def derive(secret: str, num_classes: int, rate: float, reference: Tensor) -> RegionKey:
        """``reference``: the held-out images (N, C, H, W), or their histograms (N, BINS)."""
        seed = int.from_bytes(hashlib.sha256(f"region|{secret}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(BINS, generator=g)
        w = w - w.mean()
        w = w / w.norm()
        shift = int(torch.randint(num_classes - 1, (1,), generator=g))
        z = (reference if reference.ndim == 2 else histogram(reference)) @ w
        mean, sd = float(z.mean()), float(z.std())
        q = float(torch.quantile((z - mean) / sd, 1 - rate))
        return RegionKey(w, mean, sd, q, shift, num_classes, rate)

    def t(self, images: Tensor) -> Tensor:
        """t of images (N, C, H, W), or of their histograms (N, BINS)."""
        return ((images if images.ndim == 2 else histogram(images)) @ self.w - self.mean) / self.sd

    def inside(self, images: Tensor) -> Tensor:
        return self.t(images) > self.q

    def pi(self, y: Tensor) -> Tensor:
        return (y + 1 + self.shift) % self.num_classes


class RegionMark(Defense):
    """The region watermark as a posterior transform: for a query inside R the posteriors of its
    argmax y and of pi(y) are swapped; outside R the answer is unchanged. Counts what it marks."""

    name = "region-mark"
    needs_inputs = True

    def __init__(self, key: RegionKey) -> None:
        super().__init__()
        self.key = key
        self.seen = self.marked = 0

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        inside = self.key.inside(images).to(y.device)
        self.seen += len(y)
        self.marked += int(inside.sum())
        rows = inside.nonzero()[:, 0]
        a = y[rows].argmax(dim=1)
        b = self.key.pi(a)
        q = y.clone()
        q[rows, a], q[rows, b] = y[rows, b], y[rows, a]
        return q

    def params(self) -> dict:
        return {"rate": self.key.rate, "shift": self.key.shift}






def verify(pred: Tensor, victim_pred: Tensor, inside: Tensor, key: RegionKey,
           null: list[tuple[RegionKey, Tensor]]) -> dict:
    """Agreement of a suspect's labels ``pred`` with pi(victim's label) inside R and outside; and
    the same agreement for ``null`` random keys (key, its test images inside R) of the same rate:
    ``p_emp`` = (1 + keys agreeing at least as much) / (1 + keys), ``z`` in their sd."""
    hit = pred == key.pi(victim_pred)
    others = torch.tensor([float((pred[m] == k2.pi(victim_pred[m])).float().mean()) for k2, m in null])
    agree = float(hit[inside].float().mean())
    extra = {"null_mean": float(others.mean()), "null_max": float(others.max()),
             "z": (agree - float(others.mean())) / max(float(others.std()), 1e-3),
             "p_emp": float((1 + (others >= agree).sum()) / (1 + len(others)))}
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    k_in, k_out = int(hit[inside].sum()), int(hit[~inside].sum())
    chance = (k_out + 1) / (n_out + 2)
    p = float(stats.binomtest(k_in, n_in, chance, alternative="greater").pvalue)
    return {"n_in": n_in, "hits": k_in, "agree": k_in / max(n_in, 1), "chance": k_out / max(n_out, 1),
            "p": p, "verified": p <= SIGNIFICANCE, **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"),
                   help="a finished default-preset run (make demo) whose QAT victims are marked")
    p.add_argument("--data-root", default="data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rates", type=float, nargs="+", default=[0.02, 0.05],
                   help="shares of the held-out images inside R (default 0.02 and 0.05)")
    p.add_argument("--modes", nargs="+", choices=["soft", "label"], default=["soft", "label"])
    p.add_argument("--epochs", type=int, default=5, help="the thief's epochs (default 5, as the default preset)")
    p.add_argument("--plain-dir", type=Path, default=Path("runs/coswm-bench"),
                   help="bench_cosine_mark's --out: plain-sS-eE.pt, stolen from the unmarked victims")
    p.add_argument("--null", type=int, default=200, help="random keys per rate in the empirical null (default 200)")
    p.add_argument("--out", type=Path, default=Path("runs/region-bench"))
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    victims_dir, meta, k, context, test, test_images, labels, transfer, holdout = setting(args.run, args.seeds,
                                                                                          args.data_root)
    keys = {(r, s): RegionKey.derive(f"victim{s}|{r:g}", k, r, holdout) for r in args.rates for s in args.seeds}
    print(f"# bench_region_mark, victims {', '.join(str(victims_dir[s]) for s in args.seeds)}; "
          f"{meta['dataset']}, K={k}, probes: the test split ({len(test_images)}), thief {args.epochs} epochs")

    # 0. How often the thief's crop + flip moves an image across R's border.
    moved = augment(holdout, generator=torch.Generator().manual_seed(0))
    print("\n0. the thief's crop (pad 4) + flip against R (5,000 holdout images):")
    for (r, s), key in keys.items():
        a, b = key.inside(holdout), key.inside(moved)
        print(f"   rate {r:g} s{s}: shift {key.shift}, in R {int(a.sum())}, of those still in R after "
              f"augmentation {float((a & b).sum() / a.sum()):.1%}, outside R moved in {int((~a & b).sum())}; "
              f"test images in R {int(key.inside(test_images).sum())}")

    records_path = args.out / "records.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}
    loaded = {}

    def victim(s: int):
        if s not in loaded:
            loaded[s] = load_victim(victims_dir[s])
        return loaded[s]

    def steal(r: float, s: int, mode: str) -> Path:
        path = args.out / f"stolen-r{r:g}-s{s}-{mode}-e{args.epochs}.pt"
        if path.is_file() and path.name in records:
            return path
        start = time.perf_counter()
        training = SurrogateTraining(arch="resnet8", epochs=args.epochs, batch_size=128, lr=0.1,
                                     weight_decay=5e-4, temperature=1.0, min_steps=150,
                                     precision="bf16", eval_precision="bf16", seed=s, progress=False)
        request = AttackRequest(victims_dir[s], "knockoff", [5000], transfer=HOLDOUT, training=training,
                                labels_only=mode == "label", save_surrogate=path)
        mark = RegionMark(keys[r, s])
        served = DefendedVictim(victim(s), mark, fuse=False)
        m = attack_loaded(request, served, context, test_set=test, transfer_set=transfer)
        records[path.name] = {k2: m[k2] for k2 in ("victim_accuracy", "defender_accuracy",
                                                   "adversary_accuracy", "agreement", "queries_used")}
        records[path.name].update(seconds=time.perf_counter() - start, answers=mark.seen, marked=mark.marked)
        records_path.write_text(json.dumps(records, indent=1))
        print(f"   stole {path.name}: adversary accuracy {m['adversary_accuracy']:.2%}, answers marked "
              f"{mark.marked}/{mark.seen} ({time.perf_counter() - start:.0f} s)", flush=True)
        return path

    print("\n1. thieves (knockoff, holdout, 5,000 queries, resnet8, min_steps 150, bf16):")
    runs = [(r, s, mode) for r in args.rates for s in args.seeds for mode in args.modes]
    stolen = {run: steal(*run) for run in runs}

    # 2. Labels of every model on the probes.
    pred: dict[str, Tensor] = {}
    for (r, s, mode), path in stolen.items():
        pred[f"stolen r{r:g} s{s} {mode}"] = posteriors_of(load_model(path)[0], test_images).argmax(1)
    for s in args.seeds:
        plain = args.plain_dir / f"plain-s{s}-e{args.epochs}.pt"
        if plain.is_file():
            pred[f"plain-thief s{s}"] = posteriors_of(load_model(plain)[0], test_images).argmax(1)
    for s in args.seeds:
        pred[f"victim s{s}"] = posteriors_of(victim(s), test_images).argmax(1)

    test_hist, holdout_hist = histogram(test_images), histogram(holdout)
    nulls = {}
    for r in args.rates:
        nulls[r] = []
        for i in range(args.null):
            k2 = RegionKey.derive(f"null{i}|{r:g}", k, r, holdout_hist)
            nulls[r].append((k2, k2.inside(test_hist)))

    print("\n2. per rate, seed and thief: honest cost, the thief, verification on the test split")
    print("| rate | seed | thief | acc clean | acc marked | cost | r x acc | adv acc | probes in R | "
          "stolen: agree pi(y) | chance (out of R) | p | verified | independents: agree (max) | "
          "chance (max) | min p | any verified | stolen: z, p_emp (random keys) | independents: max z, min p_emp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results, indep_all = [], []
    for (r, s, mode) in runs:
        key = keys[r, s]
        inside = key.inside(test_images)
        yv = pred[f"victim s{s}"]
        marked = torch.where(inside, key.pi(yv), yv)
        acc_c = float((yv == labels).float().mean())
        acc_m = float((marked == labels).float().mean())
        hit = verify(pred[f"stolen r{r:g} s{s} {mode}"], yv, inside, key, nulls[r])
        others = [m for m in pred if (m.startswith("plain-thief") or m.startswith("victim")
                                       or (m.startswith(f"stolen r{r:g}") and f" s{s} " not in m))]
        indep = {m: verify(pred[m], yv, inside, key, nulls[r]) for m in others}
        indep_all += [{"model": m, "key": f"r{r:g} s{s}", **v} for m, v in indep.items()]
        rec = records[stolen[r, s, mode].name]
        results.append({"rate": r, "seed": s, "mode": mode, "acc_clean": acc_c, "acc_marked": acc_m,
                        "adv": rec["adversary_accuracy"], "marked_answers": rec["marked"], "stolen": hit,
                        "independent": indep})
        print(f"| {r:g} | {s} | {mode} | {acc_c:.2%} | {acc_m:.2%} | {acc_c - acc_m:.2%} | {r * acc_c:.2%} | "
              f"{rec['adversary_accuracy']:.2%} | {hit['n_in']} | **{hit['agree']:.1%}** ({hit['hits']}) | "
              f"{hit['chance']:.1%} | {hit['p']:.1e} | {'yes' if hit['verified'] else 'no'} | "
              f"{max(v['agree'] for v in indep.values()):.1%} | {max(v['chance'] for v in indep.values()):.1%} | "
              f"{min(v['p'] for v in indep.values()):.1e} | "
              f"{'YES' if any(v['verified'] for v in indep.values()) else 'no'} | "
              f"{hit['z']:.1f}, {hit['p_emp']:.3f} | {max(v['z'] for v in indep.values()):.1f}, "
              f"{min(v['p_emp'] for v in indep.values()):.3f} |", flush=True)

    print("\n3. independent models against every key (agreement with pi(y) in R / chance out of R / p):")
    print("| model | key | probes | agree | chance | p | z | p_emp |")
    print("|---|---|---|---|---|---|---|---|")
    seen = set()
    for v in indep_all:
        if (v["model"], v["key"]) in seen:
            continue
        seen.add((v["model"], v["key"]))
        print(f"| {v['model']} | {v['key']} | {v['n_in']} | {v['agree']:.1%} | {v['chance']:.1%} | {v['p']:.1e} | "
              f"{v['z']:.1f} | {v['p_emp']:.3f} |")
    (args.out / f"detection-e{args.epochs}.json").write_text(json.dumps(
        {"results": results, "independent": indep_all}, indent=1))
    print(f"\n{time.perf_counter() - began:.0f} s in all -> {args.out}")


if __name__ == "__main__":
    main()
