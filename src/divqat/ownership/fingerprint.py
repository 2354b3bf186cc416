"""Fingerprints of a victim's classification boundary: IPGuard.

Cao, Jia, Gong, "IPGuard: Protecting Intellectual Property of Deep Neural Networks via
Fingerprinting the Classification Boundary", AsiaCCS 2021. The owner picks inputs that sit just
across the victim's boundary between two classes and records the victim's labels on them. A copy
of the victim (the file itself, or the file fine-tuned, pruned or requantized) keeps most of its
boundary and so most of the labels; a model trained independently, even on the same data, has
its boundaries elsewhere and does not.

Generation (``generate_fingerprint``). Each point starts from a real image of the victim's data,
labelled i by the victim; a target label j != i is drawn at random (the paper's "random" choice),
and the image is moved, by Adam on the input, until the paper's hinge loss is zero::

    L(x) = relu(g_i(x) - g_j(x) + k) + relu(max_{t != i, j} g_t(x) - g_i(x))

(g the victim's logits): j leads by at least the margin k, and i, the class the image came from,
is the runner-up. Points move independently and each stops at its first zero loss, so it sits at
a distance of about k (in logits: log p_j - log p_i = k) beyond the boundary, no further. Pixels
stay in [0, 1] and the loss is taken at the point rounded to 8 bits (a straight-through
estimate), so the point that is stored is the point that was optimized. The recorded labels come
from ``labels_of`` (at export: the lowered program itself, which may round differently from the
torch model used for gradients), and only points that reached zero loss within ``steps``, whose
recorded label is j and whose start image the labeller also gives i, are kept.

Why these defaults (measured by ``benchmarks/bench_fingerprint.py``: a ResNet-8 on 4,000
Fashion-MNIST images, its thief's copies and five independent models; docs/guides/fingerprints.md):

- ``points=100``: the test's power. A copy that keeps 60 % of the labels against a chance rate
  of 30 % has a p-value of 5e-10 on 100 points, 6e-4 on 30. 100 points of a 28x28 gray image are
  79 KiB, of a 32x32 RGB image 300 KiB.
- ``margin=0.5`` (logits; k = log p_j - log p_i): the paper's trade-off between robustness and
  uniqueness, measured. At k = 0.25 the fine-tuned and pruned copies keep 72-75 % of the labels,
  at 0.5 83-88 %, at 1 95-99 %; but the farther the points go, the more they look like class j
  to every model: at k = 3 an independent ResNet-8 agrees with 49 % of them and with only 28 %
  of their sources (p = 1e-5, close to a false claim), and on the tests' synthetic bars, where
  every model learns the same boundary, that already happens at k = 1. 0.5 is half of that.
- ``steps=100``, ``lr=0.01`` (Adam, in pixel units of [0, 1]): 75-100 % of the candidates reach
  zero loss within the bound; generation takes about 15 s of one CPU core for that ResNet-8.

Points are stored as uint8: they were optimized on the 8-bit grid, so nothing is lost, the file
is half the size of float16, and an 8-bit point reaches a suspect unchanged through any channel
that carries images (PNG over HTTP, a camera frame buffer) where a float16 point would be rounded
off the side of the boundary it was put on.

Matching (``match``). The suspect labels the points; k of n agree. What a suspect agrees with by
chance here is not 1/K: an unrelated model still sees a real image of class i moved a short way,
and it answers i more often than the j the victim chose. The chance rate is therefore measured on
the suspect itself: its agreement with the points' *source* labels i (the other side of the same
boundary), never below 1/K, and never below the agreement of independent reference models when
the owner recorded some (``calibrate``; ``divqat export --fingerprint-reference``). The source
floor is an assumption, measured rather than proven: at the default margin the five independent
Fashion-MNIST models agree with 2-17 % of the labels and 41-72 % of the sources, but points moved
far (k = 3), or a task whose boundary every model learns alike, break it (see the margin above):
references turn the assumption into a measurement. The one-sided binomial test of
``divqat.ownership.stats`` turns k of n against that rate into a p-value and a verdict (default
significance 1e-6). A file whose sha256 is one the fingerprint recorded is the victim itself:
``match_file`` says "identical file" without a query.

    >>> fp = generate_fingerprint(net, images)              # images: float (M, C, H, W) in [0, 1]
    >>> fp.save("victim.fingerprint.safetensors")
    >>> match(load_fingerprint("victim.fingerprint.safetensors"), lambda x: suspect(x).argmax(1))
    Verdict(evidence='fingerprint (ipguard, 100 points, no reference model)', agreed=100, ...)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import divqat
from divqat.checks import check_int, check_number
from divqat.errors import ArtifactError, ConfigError
from divqat.io import atomic_write
from divqat.ownership.stats import SIGNIFICANCE, Verdict, verdict

METHOD = "ipguard"
FORMAT, FORMAT_VERSION = "divqat-fingerprint", 1
#: A program's fingerprint is written beside it: ``victim.pte`` -> ``victim.fingerprint.safetensors``.
SUFFIX = ".fingerprint.safetensors"
POINTS, MARGIN, STEPS, LR = 100, 0.5, 100, 0.01
# Candidates are drawn in rounds of about 1.25x the points still missing, at most this many
# rounds: generation time stays bounded when few points come through (a victim whose labeller
# disagrees with its torch model near the boundary).
_ROUNDS = 4
_LEVELS = 255.0


class NoFingerprintPoints(ConfigError):
    """No candidate crossed the victim's boundary within the steps: there is no fingerprint to
    record (``divqat export`` then writes its program without one, and says so)."""


def fingerprint_path(program: str | Path) -> Path:
    """Where the fingerprint of a program file lives: beside it, ``NAME.fingerprint.safetensors``."""
    program = Path(program)
    return program.with_name(program.stem + SUFFIX)


@dataclass(frozen=True)
class Fingerprint:
    """A victim's IPGuard fingerprint.

    Attributes:
        points: uint8 (N, C, H, W), the inputs (``inputs()`` gives them as float in [0, 1]).
        labels: int64 (N,), the victim's labels on them.
        sources: int64 (N,), the victim's labels on the real images they started from (the
            runner-up side of each point's boundary; what ``match`` measures chance on).
        num_classes: K.
        program_sha256: hex digests of the files that are the victim itself (the ``.pte`` as
            written and, when sealed, its plain program); empty when not known.
        reference_agreement: the agreement of independent reference models with ``labels``,
            recorded by ``calibrate`` (empty: none measured).
        params: how it was made (method, margin, steps, lr, seed, data, seconds, versions).
    """

    points: Tensor
    labels: Tensor
    sources: Tensor
    num_classes: int
    program_sha256: tuple[str, ...] = ()
    reference_agreement: tuple[float, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.points.shape[0] if self.points.ndim == 4 else -1
        if self.points.dtype != torch.uint8 or n < 1:
            raise ArtifactError(f"fingerprint points must be uint8 (N, C, H, W) with N >= 1, got "
                                f"{self.points.dtype} {tuple(self.points.shape)}")
        for name in ("labels", "sources"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or tuple(t.shape) != (n,):
                raise ArtifactError(f"fingerprint {name} must be int64 ({n},), got {t.dtype} "
                                    f"{tuple(t.shape)}")
            if n and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
                raise ArtifactError(f"fingerprint {name} fall outside 0..{self.num_classes - 1}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.points.shape[1:])

    def __len__(self) -> int:
        return self.points.shape[0]

    def inputs(self) -> Tensor:
        """The points as a victim takes them: float32 (N, C, H, W) in [0, 1]."""
        return self.points.float() / _LEVELS

    def save(self, path: str | Path) -> Path:
        """Write it as safetensors (the tensors, and the rest as JSON metadata), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": METHOD,
                "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "program_sha256": list(self.program_sha256),
                "reference_agreement": list(self.reference_agreement), "params": self.params}
        tensors = {"points": self.points.contiguous(), "labels": self.labels.contiguous(),
                   "sources": self.sources.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"divqat": json.dumps(meta)}))
        return path


def load_fingerprint(path: str | Path) -> Fingerprint:
    """Read a fingerprint file; ``ArtifactError`` in one line for a missing, foreign or damaged one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no fingerprint at {path} (`divqat export` writes one beside the program)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = json.loads(header["divqat"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable fingerprint ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is a safetensors file but not a divqat fingerprint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has fingerprint format version {meta.get('format_version')}; "
                            f"this divqat reads version {FORMAT_VERSION}")
    missing = [k for k in ("points", "labels", "sources") if k not in tensors]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}")
    return Fingerprint(tensors["points"], tensors["labels"], tensors["sources"], int(meta["num_classes"]),
                       tuple(meta.get("program_sha256", ())),
                       tuple(float(a) for a in meta.get("reference_agreement", ())),
                       dict(meta.get("params", {})))


def load_fingerprints(spec: str | Path) -> list[tuple[Path, Fingerprint]]:
    """The fingerprints ``spec`` names, each with its path: one fingerprint file, or every
    ``*.fingerprint.safetensors`` of a folder (sorted by name). ``ArtifactError`` in one line for
    a missing path or a folder without one."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIX))
        if not files:
            raise ArtifactError(f"no fingerprint in {path} (no *{SUFFIX}; `divqat export` writes "
                                "one beside each program)")
        return [(f, load_fingerprint(f)) for f in files]
    return [(path, load_fingerprint(path))]


def _on_grid(x: Tensor) -> Tensor:
    """x rounded to the 8-bit grid, with the identity's gradient."""
    return x + ((x * _LEVELS).round() / _LEVELS - x).detach()


def hinge_loss(logits: Tensor, source: Tensor, target: Tensor, margin: float) -> Tensor:
    """IPGuard's loss per row: relu(g_i - g_j + k) + relu(max_{t != i, j} g_t - g_i); (N, K) -> (N,).
    Zero exactly when j leads i by at least k and i is the runner-up."""
    g_i = logits.gather(1, source[:, None])[:, 0]
    g_j = logits.gather(1, target[:, None])[:, 0]
    loss = F.relu(g_i - g_j + margin)
    if logits.shape[1] > 2:
        others = logits.scatter(1, source[:, None], -math.inf).scatter(1, target[:, None], -math.inf)
        loss = loss + F.relu(others.max(1).values - g_i)
    return loss


def _cross(net: nn.Module, start: Tensor, source: Tensor, target: Tensor, margin: float,
           steps: int, lr: float) -> tuple[Tensor, Tensor]:
    """The points from ``start`` (float, on the 8-bit grid) moved until each one's hinge loss is
    zero at its rounded value, or ``steps`` run out: (the points on the grid, which reached zero)."""
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    done = torch.zeros(len(x), dtype=torch.bool)
    # steps + 1 evaluations: the point after the last step is checked too.
    for step in range(steps + 1):
        with torch.enable_grad():
            loss = hinge_loss(net(_on_grid(x)), source, target, margin)
        done = done | (loss.detach() <= 0)
        if bool(done.all()) or step == steps:
            break
        keep = x.detach().clone()
        # The gradient of the input only: the victim's own parameters get none (and no .grad).
        (x.grad,) = torch.autograd.grad(loss.sum(), x)
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
            # A point that has crossed stays where it first did: no further from the boundary.
            x[done] = keep[done]
    return ((x.detach() * _LEVELS).round() / _LEVELS).clamp_(0.0, 1.0), done


def _as_labels(answers: Tensor, n: int, num_classes: int) -> Tensor:
    """A labeller's answer as int64 labels (N,): labels as they are, scores (N, K) by argmax."""
    answers = torch.as_tensor(answers).detach().cpu()
    if answers.ndim == 2 and answers.shape == (n, num_classes):
        return answers.argmax(1)
    if answers.ndim == 1 and answers.shape[0] == n and not answers.is_floating_point():
        return answers.long()
    raise ConfigError(f"a suspect must answer {n} labels (N,) or scores ({n}, {num_classes}) for "
                      f"{n} fingerprint points, got {answers.dtype} {tuple(answers.shape)}")


def _argmax_of(net: nn.Module) -> Callable[[Tensor], Tensor]:
    @torch.no_grad()
    def labels(x: Tensor) -> Tensor:
        return net(x).argmax(1)

    return labels


def generate_fingerprint(net: nn.Module, images: Tensor, *, points: int = POINTS,
                         margin: float = MARGIN, steps: int = STEPS, lr: float = LR, seed: int = 0,
                         labels_of: Callable[[Tensor], Tensor] | None = None,
                         program_sha256: Iterable[str] = (),
                         log: Callable[[str], None] | None = None) -> Fingerprint:
    """An IPGuard fingerprint of the victim ``net`` (see the module docstring for the method).

    Arguments:
        net: the victim as a differentiable module, images float in [0, 1] -> logits (N, K),
            normalization inside (an int8 program through ``divqat.quant.straight_through``).
        images: real images of the victim's data, float (M, C, H, W) in [0, 1] (they are
            rounded to 8 bits first); M >= ``points``, better 1.5x: some candidates do not
            cross within ``steps``.
        points: how many points to keep. (Default: 100.)
        margin: k, the lead of the chosen label over the runner-up, in logits. (Default: 1.0.)
        steps, lr: Adam's bound on iterations and its step size in pixel units. (Default: 100,
            0.01.)
        seed: draws the candidate images and the target labels. (Default: 0.)
        labels_of: what records the victim's labels (images -> labels (N,) or scores (N, K));
            the lowered program at export. (Default: None, ``net``'s argmax.)
        program_sha256: digests of the files that are this victim (for ``match_file``).
        log: a line per round (candidates, points kept).

    Returns a ``Fingerprint`` of at most ``points`` points; fewer, with ``params["points"]``
    saying so, when the candidates ran out (``NoFingerprintPoints``, a ``ConfigError``, when
    none came through).
    """
    points = check_int("fingerprint", "points", points, low=1)
    margin = check_number("fingerprint", "margin", margin, low=0.0)
    steps = check_int("fingerprint", "steps", steps, low=1)
    lr = check_number("fingerprint", "lr", lr, low=0.0, low_open=True)
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ConfigError("fingerprint images must be a float tensor (M, C, H, W) in [0, 1]")
    say = log or (lambda _m: None)
    label = labels_of or _argmax_of(net)
    began, began_cpu = time.perf_counter(), time.process_time()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    grid = (images.detach().float().cpu().clamp(0, 1) * _LEVELS).round() / _LEVELS
    with torch.no_grad():
        num_classes = int(net(grid[:1]).shape[1])
    if num_classes < 2:
        raise ConfigError(f"a fingerprint needs a classifier of >= 2 classes, got {num_classes}")
    kept: list[tuple[Tensor, Tensor, Tensor]] = []
    have = tried = rounds = 0
    while have < points and tried < len(order) and rounds < _ROUNDS:
        rounds += 1
        take = order[tried:tried + max(8, math.ceil(1.25 * (points - have)))]
        tried += len(take)
        start = grid[take]
        with torch.no_grad():
            source = net(start).argmax(1)
        # j uniform over the K - 1 labels other than i.
        target = (source + torch.randint(1, num_classes, (len(take),), generator=gen)) % num_classes
        moved, crossed = _cross(net, start, source, target, margin, steps, lr)
        ok = (crossed & (_as_labels(label(moved), len(take), num_classes) == target)
              & (_as_labels(label(start), len(take), num_classes) == source))
        ok_idx = ok.nonzero()[:, 0][:points - have]
        kept.append((moved[ok_idx], target[ok_idx], source[ok_idx]))
        have += len(ok_idx)
        say(f"fingerprint round {rounds}: {int(ok.sum())} of {len(take)} candidates crossed; "
            f"{have} of {points} points")
    if have == 0:
        raise NoFingerprintPoints(f"no fingerprint point crossed the victim's boundary in {steps} "
                                  f"steps from {tried} images; raise steps or lr")
    pts = torch.cat([k[0] for k in kept])
    params = {"method": METHOD, "points": have, "requested": points, "margin": margin,
              "steps": steps, "lr": lr, "seed": seed, "candidates": tried,
              "seconds": round(time.perf_counter() - began, 3),
              # This process's CPU time: the cost on a machine shared with other work.
              "cpu_seconds": round(time.process_time() - began_cpu, 3),
              "versions": {"divqat": divqat.__version__, "torch": torch.__version__}}
    return Fingerprint((pts * _LEVELS).round().to(torch.uint8), torch.cat([k[1] for k in kept]),
                       torch.cat([k[2] for k in kept]), num_classes, tuple(program_sha256), (), params)


def _answers(fingerprint: Fingerprint, labels_of: Callable[[Tensor], Tensor]) -> Tensor:
    return _as_labels(labels_of(fingerprint.inputs()), len(fingerprint), fingerprint.num_classes)


def chance_rate(fingerprint: Fingerprint, answers: Tensor) -> float:
    """The agreement a suspect that answered ``answers`` on the points is granted by chance: its
    agreement with the points' source labels, at least 1/K, at least every recorded reference
    model's agreement (see the module docstring)."""
    from_sources = int((answers == fingerprint.sources).sum()) / len(fingerprint)
    return max(from_sources, 1.0 / fingerprint.num_classes, *fingerprint.reference_agreement)


def match(fingerprint: Fingerprint, labels_of: Callable[[Tensor], Tensor], *,
          significance: float = SIGNIFICANCE) -> Verdict:
    """Does the suspect ``labels_of`` carry the fingerprint? One call of ``labels_of`` on the
    N points (float32 (N, C, H, W) in [0, 1]; it answers labels (N,) or scores (N, K)); the
    agreement with the recorded labels tested against ``chance_rate`` at ``significance``
    (default 1e-6)."""
    answers = _answers(fingerprint, labels_of)
    agreed = int((answers == fingerprint.labels).sum())
    refs = len(fingerprint.reference_agreement)
    calibrated = f"{refs} reference model{'s' * (refs != 1)}" if refs else "no reference model"
    return verdict(f"fingerprint ({METHOD}, {len(fingerprint)} points, {calibrated})", agreed,
                   len(fingerprint), chance_rate(fingerprint, answers), significance)


def file_sha256(path_or_bytes: str | Path | bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return hashlib.sha256(data).hexdigest()


def match_file(fingerprint: Fingerprint, path_or_bytes: str | Path | bytes, *,
               significance: float = SIGNIFICANCE) -> Verdict:
    """The exact copy: the suspect file's sha256 is one the fingerprint recorded. Verified as
    "identical file" with the chance of a sha256 collision (2^-256) as its p-value; otherwise
    not verified (p = 1), and the boundary test (``match``) decides."""
    same = bool(fingerprint.program_sha256) and file_sha256(path_or_bytes) in fingerprint.program_sha256
    p = 2.0 ** -256 if same else 1.0
    return Verdict("identical file" if same else "file differs (sha256)", int(same), 1, 2.0 ** -256,
                   p, float(significance), same)


def calibrate(fingerprint: Fingerprint, references: Iterable[Callable[[Tensor], Tensor]]) -> Fingerprint:
    """The fingerprint with the agreement of independent reference models recorded (models the
    owner knows were not taken from the victim: other seeds, other architectures, same data).
    ``match`` then never grants a suspect a chance rate below the highest of them."""
    agreements = tuple(int((_answers(fingerprint, ref) == fingerprint.labels).sum()) / len(fingerprint)
                       for ref in references)
    return replace(fingerprint, reference_agreement=fingerprint.reference_agreement + agreements)


__all__ = ["FORMAT", "FORMAT_VERSION", "LR", "MARGIN", "METHOD", "POINTS", "STEPS", "SUFFIX",
           "Fingerprint", "NoFingerprintPoints", "calibrate", "chance_rate", "file_sha256",
           "fingerprint_path", "generate_fingerprint", "hinge_loss", "load_fingerprint", "load_fingerprints", "match",
           "match_file"]
