"""Prototype: CosWM's cosine watermark (Charette et al., AAAI 2022) against the default
experiment's soft-label KnockoffNets thief. A measurement, not a divqat feature.

    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_cosine_mark.py \\
        [--run runs/default] [--data-root data] [--seeds 0 1 2] \\
        [--config A:0.1:1.0 --config B:0.2:1.0] [--epochs 5] [--out runs/coswm-bench]

DAWN's watermark answers a wrong label for a keyed 0.5 % of the queries: one image answered
against the function, which an augmenting thief does not repeat. CosWM marks every answer with a
rule instead: for a keyed class i*, a keyed frequency f and a keyed projection t(x),

    q_i*(x) = (p_i*(x) + eps * (1 + cos(2 pi f t(x)))) / (1 + 2 eps)
    q_j(x)  = (p_j(x)  + eps * (1 - cos(2 pi f t(x))) / (K - 1)) / (1 + 2 eps)    (j != i*)

so a thief that distills the soft answers learns a periodic ripple of class i* along t. The paper
projects the input on a keyed unit vector; here t is a keyed projection of the image's soft
intensity histogram (16 bins), standardized on the victim's held-out images, because the thief's
random crops (pad 4) and flips move a pixel-space projection by most of its spread (section 0 of
the output measures both), and a ripple the thief's augmentation blurs is one it cannot learn.

Detection, given the suspect's posteriors on probe images (the victim's test split; the thief
never asked them): the suspect's posterior of class i* against t(x) on the probes whose argmax is
not i*, a floating-mean Lomb-Scargle periodogram (the share of variance a sinusoid of frequency
nu explains) on a grid of 0.25-6 cycles per standard deviation; the score is CosWM's SNR, the
mean power within +-0.15 of f over the mean power in the rest of the band. Its null distribution
is the same suspect scored with --null random keys (same i* and f, another histogram direction):
``p_emp`` = (1 + keys scoring at least as high) / (1 + keys); ``z`` = its distance from their
mean in their standard deviations; ``p_F`` the F-test of the two sinusoid terms at f (assumes
white residuals, so only indicative).

Per seed and config: the int8 QAT victim of that seed (``victim qat | seed S`` under
RUN/stages/victim) behind the mark (``CosineMark``, a ``Defense`` that reads the query images);
the thief exactly as the default experiment's stage (``attack_loaded``: knockoff, transfer set the
holdout, budget 5,000, resnet8, --epochs, min_steps 150, bf16, thief seed S); its surrogate saved
and reloaded as ``divqat verify`` would. Independent models: the surrogates the same recipe steals
from the unmarked victims, and the victims themselves, scored against every key. Surrogates and
records are kept under --out, so a second run (another --epochs) trains only what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor

from divqat.attacks import SurrogateTraining
from divqat.blackbox import DefendedVictim
from divqat.data import load_dataset, to_victim_input
from divqat.data.transforms import augment
from divqat.defenses.base import Defense
from divqat.defenses.none import NoDefense
from divqat.models.saved import load_model
from divqat.pipelines.attack import HOLDOUT, AttackRequest, attack_loaded, load_transfer_set
from divqat.pipelines.context import RunContext
from divqat.victim import load_victim, victim_metadata

BINS, BANDWIDTH = 16, 0.04      # the soft intensity histogram t(x) projects
BAND = (0.25, 6.0)              # the periodogram's band, cycles per standard deviation of t
STEP, HALF = 0.02, 0.15         # grid step; the signal window is f +- HALF


# ------------------------------------------------------------------------------ the key

def histogram(images: Tensor) -> Tensor:
    """(N, BINS) soft intensity histogram of float images (N, C, H, W) in [0, 1]: unchanged by a
    flip, and by a crop that keeps the object (the background is zeros either way)."""
    centers = torch.linspace(0, 1, BINS, dtype=torch.float32)
    x = images.reshape(len(images), -1, 1).float()
    return torch.exp(-((x - centers) ** 2) / (2 * BANDWIDTH ** 2)).mean(dim=1)


@dataclass(frozen=True)
class CosineKey:
    """A CosWM key: target class, frequency (cycles per standard deviation of t), the histogram
    direction w and the standardization of t (mean, sd over the victim's held-out images)."""

    target: int
    freq: float
    w: Tensor
    mean: float = 0.0
    sd: float = 1.0

    @staticmethod
    def derive(secret: str, num_classes: int, freq: float, target: int | None = None) -> CosineKey:
        seed = int.from_bytes(hashlib.sha256(f"coswm|{secret}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(BINS, generator=g)
        w = w - w.mean()
        pick = int(torch.randint(num_classes, (1,), generator=g))
        return CosineKey(pick if target is None else target, freq, w / w.norm())

    def standardized(self, reference: Tensor) -> CosineKey:
        z = histogram(reference) @ self.w
        return CosineKey(self.target, self.freq, self.w, float(z.mean()), float(z.std()))

    def t(self, images: Tensor) -> Tensor:
        return (histogram(images) @ self.w - self.mean) / self.sd


class CosineMark(Defense):
    """The cosine watermark as a posterior transform: every answer carries eps * cos(2 pi f t(x))
    on class i* (and the opposite, spread, on the others), rows still summing to 1."""

    name = "coswm"
    needs_inputs = True

    def __init__(self, key: CosineKey, eps: float) -> None:
        super().__init__()
        self.key, self.eps = key, eps

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        s = torch.cos(2 * math.pi * self.key.freq * self.key.t(images)).to(y.dtype).unsqueeze(1)
        k = y.shape[1]
        q = y + self.eps * (1 - s) / (k - 1)
        q[:, self.key.target] = y[:, self.key.target] + self.eps * (1 + s[:, 0])
        return q / (1 + 2 * self.eps)

    def params(self) -> dict:
        return {"eps": self.eps, "freq": self.key.freq, "target": self.key.target}


# ------------------------------------------------------------------------------ detection

FREQS = np.arange(BAND[0], BAND[1] + 1e-9, STEP)


def periodogram(t: np.ndarray, y: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Floating-mean Lomb-Scargle: for each frequency the share of y's variance that
    a*cos(2 pi nu t) + b*sin(2 pi nu t) + c explains (least squares)."""
    yc = y - y.mean()
    tss = float(yc @ yc)
    arg = (2 * np.pi * np.outer(freqs, t)).astype(np.float32)  # float32: twice as fast, same ratios
    c, s = np.cos(arg).astype(np.float64), np.sin(arg).astype(np.float64)
    c -= c.mean(axis=1, keepdims=True)
    s -= s.mean(axis=1, keepdims=True)
    cc, ss, cs = (c * c).sum(1), (s * s).sum(1), (c * s).sum(1)
    yc_c, yc_s = c @ yc, s @ yc
    det = cc * ss - cs * cs
    a = (ss * yc_c - cs * yc_s) / det
    b = (cc * yc_s - cs * yc_c) / det
    return (a * yc_c + b * yc_s) / tss


def snr(t: np.ndarray, y: np.ndarray, f: float) -> float:
    power = periodogram(t, y, FREQS)
    window = np.abs(FREQS - f) <= HALF
    return float(power[window].mean() / power[~window].mean())


def detect(posteriors: Tensor, images: Tensor, key: CosineKey, null: int, secret: str) -> dict:
    """The suspect's score against ``key`` and against ``null`` random keys (same i*, f)."""
    keep = posteriors.argmax(dim=1) != key.target
    y = posteriors[keep, key.target].double().numpy()
    hist = histogram(images[keep])
    t = key.t(images[keep]).double().numpy()
    score = snr(t, y, key.freq)
    power = periodogram(t, y, np.array([key.freq]))[0]
    n = len(y)
    f_stat = (power / 2) / ((1 - power) / (n - 3))
    others = []
    for i in range(null):
        other = CosineKey.derive(f"{secret}|null{i}", posteriors.shape[1], key.freq, key.target)
        z = (hist @ other.w).double().numpy()
        others.append(snr((z - z.mean()) / z.std(), y, key.freq))
    others = np.array(others)
    return {"snr": score, "n": n, "p_F": float(stats.f.sf(f_stat, 2, n - 3)),
            "p_emp": float((1 + (others >= score).sum()) / (1 + len(others))),
            "z": float((score - others.mean()) / others.std()), "null_mean": float(others.mean()),
            "null_q99": float(np.quantile(others, 0.99))}


# ------------------------------------------------------------------------------ the run

def find_victims(run: Path, seeds: list[int]) -> dict[int, Path]:
    found = {}
    for done in sorted((run / "stages" / "victim").glob("*/done.json")):
        label = json.loads(done.read_text()).get("label", "")
        for s in seeds:
            if label == f"victim qat | seed {s}":
                found[s] = done.parent
    missing = sorted(set(seeds) - set(found))
    if missing:
        raise SystemExit(f"no 'victim qat | seed S' stage for seeds {missing} under {run}")
    return found


def setting(run: Path, seeds: list[int], data_root: str | None):
    """What every prototype run reads: the seeds' QAT victim folders, the first one's metadata,
    its class count, a quiet RunContext, the test split (dataset and victim input), its labels,
    the holdout transfer set and its images as floats in [0, 1]."""
    victims_dir = find_victims(run, seeds)
    meta = victim_metadata(victims_dir[seeds[0]])
    context = RunContext(data_root=data_root, progress=False, log=None)
    test = load_dataset(meta["dataset"], "test", data_root)
    test_images = to_victim_input(test.images, tuple(meta["input_shape"]))
    transfer = load_transfer_set(HOLDOUT, meta, data_root)
    return (victims_dir, meta, len(meta["classes"]), context, test, test_images,
            torch.as_tensor(test.labels).long(), transfer, transfer.images.float() / 255)


@torch.no_grad()
def posteriors_of(model, images: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([torch.softmax(model(images[i:i + batch]).float(), dim=1)
                      for i in range(0, len(images), batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"),
                   help="a finished default-preset run (make demo) whose QAT victims are marked")
    p.add_argument("--data-root", default="data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", action="append", default=None, metavar="NAME:EPS:FREQ",
                   help="a mark (default: A:0.1:1.0 and B:0.2:1.0)")
    p.add_argument("--epochs", type=int, default=5, help="the thief's epochs (default 5, as the default preset)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME[@SEED]",
                   help="these marked thieves only (seed default: the first of --seeds), and the plain "
                        "thief of the first seed only: for a longer recipe")
    p.add_argument("--plain-epochs", type=int, default=None, metavar="N",
                   help="the plain thieves (independent models) of this recipe instead of --epochs' "
                        "(e.g. 5: those a first run kept under --out, no training)")
    p.add_argument("--null", type=int, default=100, help="random keys in each score's null (default 100)")
    p.add_argument("--out", type=Path, default=Path("runs/coswm-bench"))
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for text in args.config or ["A:0.1:1.0", "B:0.2:1.0"]:
        name, eps, freq = text.split(":")
        configs[name] = (float(eps), float(freq))
    began = time.perf_counter()
    victims_dir, meta, k, context, test, test_images, labels, transfer, holdout = setting(args.run, args.seeds,
                                                                                          args.data_root)

    # 0. How far the thief's augmentation moves t: a pixel-space projection against the histogram one.
    moved = augment(holdout, generator=torch.Generator().manual_seed(0))
    print(f"# bench_cosine_mark, victims {', '.join(str(victims_dir[s]) for s in args.seeds)}; "
          f"{meta['dataset']}, K={k}, probes: the test split ({len(test_images)}), thief {args.epochs} epochs")
    print("\n0. the thief's crop (pad 4) + flip against t (5,000 holdout images; std of t is 1):")
    g = torch.Generator().manual_seed(5)
    w7 = F.interpolate(torch.randn(1, 1, 7, 7, generator=g), size=meta["input_shape"][1:], mode="bicubic")[0]
    w7 = (w7 - w7.mean()).flatten()
    for what, fn in (("pixels . smooth 7x7 keyed pattern", lambda x: x.flatten(1) @ w7),
                     ("soft histogram . keyed direction", CosineKey.derive("aug", k, 1.0).t)):
        a, b = fn(holdout), fn(moved)
        sd = a.std()
        d = float(((a - b) / sd).std())
        print(f"   {what:36s} corr {float(torch.corrcoef(torch.stack([a, b]))[0, 1]):.3f}, "
              f"std of the change {d:.3f} sd: a ripple of f cycles/sd keeps "
              f"{math.exp(-(2 * math.pi * d) ** 2 / 2):.2f} at f=1, {math.exp(-(2 * math.pi * 2 * d) ** 2 / 2):.2f} at f=2")

    records_path = args.out / "records.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}
    keys: dict[tuple[int, str], CosineKey] = {}
    for s in args.seeds:
        for name, (_, freq) in configs.items():
            keys[s, name] = CosineKey.derive(f"victim{s}|{name}", k, freq).standardized(holdout)
    loaded = {}

    def victim(s: int):
        if s not in loaded:
            loaded[s] = load_victim(victims_dir[s])
        return loaded[s]

    def steal(tag: str, s: int, defense: Defense, epochs: int = args.epochs) -> Path:
        path = args.out / f"{tag}-e{epochs}.pt"
        if path.is_file() and path.name in records:
            return path
        start = time.perf_counter()
        training = SurrogateTraining(arch="resnet8", epochs=epochs, batch_size=128, lr=0.1,
                                     weight_decay=5e-4, temperature=1.0, min_steps=150,
                                     precision="bf16", eval_precision="bf16", seed=s, progress=False)
        request = AttackRequest(victims_dir[s], "knockoff", [5000], transfer=HOLDOUT, training=training,
                                save_surrogate=path)
        served = DefendedVictim(victim(s), defense, fuse=False)
        m = attack_loaded(request, served, context, test_set=test, transfer_set=transfer)
        records[path.name] = {k2: m[k2] for k2 in ("victim_accuracy", "defender_accuracy", "l1_distance",
                                                   "adversary_accuracy", "agreement", "queries_used")}
        records[path.name]["seconds"] = time.perf_counter() - start
        records_path.write_text(json.dumps(records, indent=1))
        print(f"   stole {path.name}: adversary accuracy {m['adversary_accuracy']:.2%} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return path

    print("\n1. thieves (soft-label knockoff, holdout, 5,000 queries, resnet8, min_steps 150, bf16):")
    marked_runs = [(s, n) for s in args.seeds for n in configs] if args.only is None \
        else [(int(o.partition("@")[2] or args.seeds[0]), o.partition("@")[0]) for o in args.only]
    stolen = {(s, n): steal(f"stolen-{n}-s{s}", s, CosineMark(keys[s, n], configs[n][0]))
              for s, n in marked_runs}
    plain_seeds = args.seeds if args.only is None or args.plain_epochs else args.seeds[:1]
    plain_epochs = args.plain_epochs or args.epochs
    plain = {s: steal(f"plain-s{s}", s, NoDefense(), plain_epochs) for s in plain_seeds}

    # 2. Posteriors of every model on the probes.
    post: dict[str, Tensor] = {}
    for (s, n), path in stolen.items():
        post[f"stolen {n} s{s}"] = posteriors_of(load_model(path)[0], test_images)
    for s, path in plain.items():
        post[f"plain-thief s{s} e{plain_epochs}"] = posteriors_of(load_model(path)[0], test_images)
    for s in args.seeds:
        post[f"victim s{s}"] = posteriors_of(victim(s), test_images)

    print(f"\n2. honest cost on the test split ({len(labels)} images) and the thief, per seed:")
    print("| config | eps | f | seed | i* | acc clean | acc marked | L1 test | adv acc (plain thief) | "
          "adv acc (marked) | marked victim's answers: SNR | stolen: SNR | z | p_emp | p_F | "
          "wrong key: SNR | p_emp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for (s, n) in marked_runs:
        eps, freq = configs[n]
        key = keys[s, n]
        clean = post[f"victim s{s}"]
        marked = CosineMark(key, eps)(clean, images=test_images).float()
        acc_c = float((clean.argmax(1) == labels).float().mean())
        acc_m = float((marked.argmax(1) == labels).float().mean())
        l1 = float((marked - clean).abs().sum(1).mean())
        secret = f"null|{s}|{n}"
        own = detect(marked, test_images, key, args.null, secret)
        hit = detect(post[f"stolen {n} s{s}"], test_images, key, args.null, secret)
        wrong_key = CosineKey.derive(f"wrong|{s}|{n}", k, round(freq * 1.37, 2)).standardized(holdout)
        wrong = detect(post[f"stolen {n} s{s}"], test_images, wrong_key, args.null, secret + "w")
        rec = records[stolen[s, n].name]
        plain_acc = records.get(plain[s].name, {}).get("adversary_accuracy") if s in plain else None
        results.append({"config": n, "eps": eps, "f": freq, "seed": s, "target": key.target, "acc_clean": acc_c,
                        "acc_marked": acc_m, "l1": l1, "adv_plain": plain_acc, "adv_marked": rec["adversary_accuracy"],
                        "own": own, "stolen": hit, "wrong": wrong})
        print(f"| {n} | {eps:g} | {freq:g} | {s} | {key.target} | {acc_c:.2%} | {acc_m:.2%} | {l1:.3f} | "
              f"{'-' if plain_acc is None else f'{plain_acc:.2%}'} | {rec['adversary_accuracy']:.2%} | "
              f"{own['snr']:.1f} | **{hit['snr']:.2f}** | {hit['z']:.1f} | {hit['p_emp']:.3f} | "
              f"{hit['p_F']:.1e} | {wrong['snr']:.2f} | {wrong['p_emp']:.3f} |", flush=True)

    print("\n3. independent models against every key in use (plain-thief sS: stolen from the unmarked "
          "victim S with the same recipe; victim sS: the int8 victim itself, unmarked):")
    print("| model | key | SNR | z | p_emp | p_F |")
    print("|---|---|---|---|---|---|")
    indep = []
    for (s, n) in marked_runs:
        for model in [f"plain-thief s{x} e{plain_epochs}" for x in plain] + [f"victim s{x}" for x in args.seeds]:
            r = detect(post[model], test_images, keys[s, n], args.null, f"null|{s}|{n}")
            indep.append({"model": model, "key": f"{n} s{s}", **r})
            print(f"| {model} | {n} s{s} | {r['snr']:.2f} | {r['z']:.1f} | {r['p_emp']:.3f} | {r['p_F']:.1e} |",
                  flush=True)
    snrs = np.array([r["snr"] for r in indep])
    ps = np.array([r["p_emp"] for r in indep])
    print(f"\nindependent: {len(indep)} (model, key) pairs, SNR mean {snrs.mean():.2f}, sd {snrs.std():.2f}, "
          f"max {snrs.max():.2f}; p_emp <= 0.01 in {(ps <= 0.01).sum()}; "
          f"min p_emp {ps.min():.3f}")
    for r in results:
        print(f"stolen {r['config']} s{r['seed']}: SNR {r['stolen']['snr']:.2f} "
              f"({'above' if r['stolen']['snr'] > snrs.max() else 'not above'} every independent one), "
              f"p_emp {r['stolen']['p_emp']:.3f}")
    (args.out / f"detection-e{args.epochs}.json").write_text(json.dumps({"results": results, "independent": indep},
                                                                      indent=1))
    print(f"\n{time.perf_counter() - began:.0f} s in all -> {args.out}")


if __name__ == "__main__":
    main()
