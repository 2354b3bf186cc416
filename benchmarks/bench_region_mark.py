"""Prototype: a region watermark (a keyed region of input space answered with a keyed relabelling)
against the default experiment's KnockoffNets thief, soft-label and label-only. A measurement, not
a divqat feature.

    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_region_mark.py \\
        [--run runs/default] [--data-root data] [--seeds 0 1 2] [--rates 0.02 0.05] \\
        [--plain-dir runs/coswm-bench] [--epochs 5] [--null 200] [--out runs/region-bench] \\
        [--design classwise --references 3 4 --owner-thieves runs/conferrable --independent S.pt ...]

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

``--design classwise`` (the second prototype, measured 2026-12-07) answers that design's two
false claims: t is standardized within each class of the victim's label (R takes about r of every
class, and stops tracking the class), the seeds' keys get distinct shifts (0, 1, 2, ...: two keys
never relabel a class alike), and the chance rate of the binomial test is the highest of the
suspect's class-matched rate outside R (its rate of answering pi(c) on the victim's class-c
images outside R, averaged over the probes' classes) and the agreement inside R of the owner's
references: the run's QAT victims and fp32 teachers of --references, and with --owner-thieves the
thieves the owner ran against its own unmarked victim (bench_conferrable.py's). --independent
adds never-marked surrogates to the false-claim tests.
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
from bench_fingerprint_thieves import by_seed
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
    victim's held-out images; per class of the victim's label with ``--design classwise``), the
    threshold q (t > q on a share ``rate`` of them) and the shift k of the relabelling
    pi(y) = (y + 1 + k) mod K."""

    w: Tensor
    mean: Tensor
    sd: Tensor
    q: float
    shift: int
    num_classes: int
    rate: float

    @staticmethod
    def derive(secret: str, num_classes: int, rate: float, reference: Tensor,
               labels: Tensor | None = None, shift: int | None = None) -> RegionKey:
        """``reference``: the held-out images (N, C, H, W), or their histograms (N, BINS);
        ``labels``: the victim's labels of them, to standardize t per class (``classwise``);
        ``shift``: the relabelling's, instead of a keyed one."""
        seed = int.from_bytes(hashlib.sha256(f"region|{secret}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(BINS, generator=g)
        w = w - w.mean()
        w = w / w.norm()
        drawn = int(torch.randint(num_classes - 1, (1,), generator=g))
        h = reference if reference.ndim == 2 else histogram(reference)
        z = h @ w
        if labels is None:
            mean, sd = z.mean().reshape(1), z.std().reshape(1)
        else:
            mean = torch.stack([z[labels == c].mean() for c in range(num_classes)])
            sd = torch.stack([z[labels == c].std() for c in range(num_classes)])
        key = RegionKey(w, mean, sd, 0.0, drawn if shift is None else shift % (num_classes - 1),
                        num_classes, rate)
        q = float(torch.quantile(key.t(h, labels), 1 - rate))
        return RegionKey(w, mean, sd, q, key.shift, num_classes, rate)

    def t(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """t of images (N, C, H, W), or of their histograms (N, BINS); ``labels`` (the victim's)
        when the key is classwise."""
        z = (images if images.ndim == 2 else histogram(images)) @ self.w
        if len(self.mean) == 1:
            return (z - self.mean[0]) / self.sd[0]
        return (z - self.mean[labels]) / self.sd[labels]

    def inside(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.t(images, labels) > self.q

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
        inside = self.key.inside(images, y.argmax(dim=1).cpu()).to(y.device)
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
           null: list[tuple[RegionKey, Tensor]], references: list[Tensor] = ()) -> dict:
    """Agreement of a suspect's labels ``pred`` with pi(victim's label) inside R and outside; and
    the same agreement for ``null`` random keys (key, its test images inside R) of the same rate:
    ``p_emp`` = (1 + keys agreeing at least as much) / (1 + keys), ``z`` in their sd.

    The chance rate of the binomial test: the suspect's own rate outside R (``global``), or with
    ``references`` (labels of never-marked models on the probes: ``classwise``) the highest of
    the suspect's class-matched rate outside R (its rate of answering pi(c) for the victim's
    class c outside R, averaged over the probes' classes) and every reference's agreement inside
    R: a confusion that every model makes inside R is then never counted as a mark."""
    hit = pred == key.pi(victim_pred)
    others = torch.tensor([float((pred[m] == k2.pi(victim_pred[m])).float().mean()) for k2, m in null])
    agree = float(hit[inside].float().mean())
    extra = {"null_mean": float(others.mean()), "null_max": float(others.max()),
             "z": (agree - float(others.mean())) / max(float(others.std()), 1e-3),
             "p_emp": float((1 + (others >= agree).sum()) / (1 + len(others)))}
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    k_in, k_out = int(hit[inside].sum()), int(hit[~inside].sum())
    chance = (k_out + 1) / (n_out + 2)
    if references:
        rate = torch.zeros(key.num_classes)
        for c in range(key.num_classes):
            out_c = ~inside & (victim_pred == c)
            rate[c] = (hit[out_c].sum() + 1) / (out_c.sum() + 2)
        matched = float(rate[victim_pred[inside]].mean())
        floor = max(float((r[inside] == key.pi(victim_pred[inside])).float().mean()) for r in references)
        extra.update(matched=matched, reference_max=floor)
        chance = max(matched, floor)
    p = float(stats.binomtest(k_in, n_in, min(chance, 1.0), alternative="greater").pvalue) if n_in else 1.0
    return {"n_in": n_in, "hits": k_in, "agree": k_in / max(n_in, 1),
            "chance": chance if references else k_out / max(n_out, 1), "out_rate": k_out / max(n_out, 1), "p": p, "verified": p <= SIGNIFICANCE, **extra}


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
    p.add_argument("--design", choices=["global", "classwise"], default="global",
                   help="global: t standardized over all held-out images, a keyed shift, the suspect's "
                        "rate outside R as chance (the first prototype); classwise: t standardized per "
                        "class of the victim's label (R takes a share r of every class), the seeds' keys "
                        "given distinct shifts, chance floored by --references")
    p.add_argument("--references", type=int, nargs="*", default=[3, 4],
                   help="classwise: the run's QAT victims and fp32 teachers of these seeds are the owner's "
                        "never-marked references (their agreement inside R floors the chance rate)")
    p.add_argument("--owner-thieves", type=Path, default=None, metavar="DIR",
                   help="classwise: DIR/owner-*-sS.pt, thieves the owner ran against its own UNMARKED victim "
                        "of seed S (bench_conferrable.py's), are references of seed S's keys too: a thief's "
                        "confusions are not a full model's")
    p.add_argument("--independent", type=Path, nargs="*", default=[],
                   help="more never-marked surrogates (.pt) scored against every key")
    p.add_argument("--null", type=int, default=200, help="random keys per rate in the empirical null (default 200)")
    p.add_argument("--out", type=Path, default=Path("runs/region-bench"))
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    victims_dir, meta, k, context, test, test_images, labels, transfer, holdout = setting(args.run, args.seeds,
                                                                                          args.data_root)
    loaded = {}

    def victim(s: int):
        if s not in loaded:
            loaded[s] = load_victim(victims_dir[s])
        return loaded[s]

    classwise = args.design == "classwise"
    # The victims' own labels: of the held-out images (a classwise key's per-class standardization)
    # and of the test split (the probes' classes).
    held = {s: posteriors_of(victim(s), holdout).argmax(1) for s in args.seeds} if classwise else {}
    tested = {s: posteriors_of(victim(s), test_images).argmax(1) for s in args.seeds}
    keys = {(r, s): RegionKey.derive(f"victim{s}|{r:g}", k, r, holdout, held.get(s),
                                     shift=args.seeds.index(s) if classwise else None)
            for r in args.rates for s in args.seeds}
    print(f"# bench_region_mark ({args.design}), victims {', '.join(str(victims_dir[s]) for s in args.seeds)}; "
          f"{meta['dataset']}, K={k}, probes: the test split ({len(test_images)}), thief {args.epochs} epochs")

    # 0. How often the thief's crop + flip moves an image across R's border.
    moved = augment(holdout, generator=torch.Generator().manual_seed(0))
    print("\n0. the thief's crop (pad 4) + flip against R (5,000 holdout images):")
    for (r, s), key in keys.items():
        a, b = key.inside(holdout, held.get(s)), key.inside(moved, held.get(s))
        per_class = torch.bincount(tested[s][key.inside(test_images, tested[s] if classwise else None)], minlength=k)
        print(f"   rate {r:g} s{s}: shift {key.shift}, in R {int(a.sum())}, of those still in R after "
              f"augmentation {float((a & b).sum() / a.sum()):.1%}, outside R moved in {int((~a & b).sum())}; "
              f"test images in R {int(per_class.sum())}, per victim class {per_class.tolist()}")

    records_path = args.out / "records.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}

    def steal(r: float, s: int, mode: str) -> Path:
        design = "classwise-" if classwise else ""
        path = args.out / f"stolen-{design}r{r:g}-s{s}-{mode}-e{args.epochs}.pt"
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
        pred[f"victim s{s}"] = tested[s]
    for path in args.independent:
        pred[f"never-marked {path.parent.name if path.stem == 'surrogate' else path.stem}"] = posteriors_of(load_model(path)[0], test_images).argmax(1)
    # The owner's references (classwise): never-marked models it trained itself, on the same data.
    refs: list[Tensor] = []
    if classwise:
        qat_all, fp32_all = by_seed(args.run)
        refs = [posteriors_of(load_victim(folder, compile=False), test_images).argmax(1)
                for r in args.references for folder in (qat_all[r], fp32_all[r])]
    owner_refs: dict[int, list[Tensor]] = {}
    if classwise and args.owner_thieves is not None:
        for s in args.seeds:
            owner_refs[s] = [posteriors_of(load_model(path)[0], test_images).argmax(1)
                             for path in sorted(args.owner_thieves.glob(f"owner-*-s{s}.pt"))]
    if classwise:
        print(f"   references: {len(refs)} never-marked models (QAT victims and fp32 teachers of seeds "
              f"{args.references}), and per seed {[len(v) for v in owner_refs.values()]} of the owner's own thieves")

    test_hist, holdout_hist = histogram(test_images), histogram(holdout)
    nulls = {}
    for r in args.rates:
        for s in args.seeds:
            nulls[r, s] = []
            for i in range(args.null):
                k2 = RegionKey.derive(f"null{i}|{r:g}", k, r, holdout_hist, held.get(s))
                nulls[r, s].append((k2, k2.inside(test_hist, tested[s] if classwise else None)))

    print("\n2. per rate, seed and thief: honest cost, the thief, verification on the test split")
    print("| rate | seed | thief | acc clean | acc marked | cost | r x acc | adv acc | probes in R | "
          "stolen: agree pi(y) | chance | p | verified | independents: agree (max) | "
          "chance (max) | min p | any verified | stolen: z, p_emp (random keys) | independents: max z, min p_emp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results, indep_all = [], []
    for (r, s, mode) in runs:
        key = keys[r, s]
        yv = pred[f"victim s{s}"]
        inside = key.inside(test_images, yv if classwise else None)
        marked = torch.where(inside, key.pi(yv), yv)
        acc_c = float((yv == labels).float().mean())
        acc_m = float((marked == labels).float().mean())
        key_refs = refs + owner_refs.get(s, [])
        hit = verify(pred[f"stolen r{r:g} s{s} {mode}"], yv, inside, key, nulls[r, s], key_refs)
        others = [m for m in pred if (m.startswith(("plain-thief", "victim", "never-marked"))
                                       or (m.startswith(f"stolen r{r:g}") and f" s{s} " not in m))]
        indep = {m: verify(pred[m], yv, inside, key, nulls[r, s], key_refs) for m in others}
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
