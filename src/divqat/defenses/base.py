"""The output-perturbation defense contract, its registry, and the helpers the defenses share.

A defense maps the victim's posteriors ``y`` (N, K) to defended posteriors ``y'`` (N, K) that an
attacker receives. Every defense returns valid distributions (non-negative, rows summing to 1) with
no NaN or inf for any valid input, including one-hot rows, exact zeros and ties.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from divqat.errors import ConfigError
from divqat.registry import Registry, params_repr, recorded_params

DEFENSES: Registry[type[Defense]] = Registry("defense")

# Values that can be written to a metrics file as they are; anything else (a model) is recorded
# by its type name.


class Defense(abc.ABC):
    """Base of every defense: ``defense(posteriors, *, logits=None, images=None) -> posteriors``.

    Subclasses implement ``forward(y, logits, images)`` on float64 rows that are validated and
    renormalized here; what ``forward`` returns is passed through ``N`` (clip at 0, divide by the
    row sum; a row left all zero becomes a one-hot on its argmax) and checked to be finite, so a
    formula written ``y' = N(...)`` returns just the inside. They declare what else they need:

    - ``needs_logits``: the victim's logits (N, K) must be passed.
    - ``needs_inputs``: the query images (N, C, H, W) must be passed (defenses that run a model).
    - ``fusable``: ``forward`` is a formula of ``y`` alone, so the whole served path (softmax,
      defense, ``N``) can run inside a compiled victim's program (``epilogue``).

    The output has the input's dtype and device. ``params()`` returns the constructor arguments
    (for metrics); ``name`` is the registry name.
    """

    name: ClassVar[str] = ""
    needs_logits: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    # A model-backed defense names the constructor argument that takes its model and says how
    # divqat builds it for a saved victim (``divqat defenses`` shows it); the driver that builds
    # defenses (``divqat.pipelines.defense_models``) reads these, never the defense's name.
    model_param: ClassVar[str | None] = None
    model_help: ClassVar[str] = ""
    # The model is trained (minutes, once per victim, kept with it) rather than just initialized.
    trains_model: ClassVar[bool] = False
    # ``forward`` is a deterministic tensor formula of ``y`` alone (no logits, images, model or
    # random state), so ``epilogue`` can be compiled into an int8 victim's program.
    fusable: ClassVar[bool] = False
    # Why it cannot: one clause, shown when someone asks to put it inside a device program.
    not_fusable_because: ClassVar[str] = "it is not a deterministic formula of the posteriors alone"

    def __init__(self) -> None:  # noqa: B027  (not abstract: parameterless defenses keep it)
        """A defense without parameters (so ``params()`` is empty, not object's *args)."""

    def __call__(self, posteriors: Tensor, *, logits: Tensor | None = None,
                 images: Tensor | None = None) -> Tensor:
        y = self._checked(posteriors, logits, images)
        return self._answer(y, posteriors, logits, images)

    def serve(self, posteriors: Tensor, logits: Tensor, images: Tensor) -> Tensor:
        """The black box's path: ``posteriors`` is the softmax the black box just computed from
        the victim's own ``logits`` (N, K) for ``images``, so it is valid by construction and the
        input validation of ``__call__`` is skipped. At batch 256 the defended query must cost at
        most 5 % more than the victim alone (DCP's latency claim), and on tensors this small each
        torch op costs microseconds; the output is still checked."""
        y = posteriors.to(torch.float64)
        return self._answer(y / y.sum(dim=1, keepdim=True), posteriors, logits, images)

    def epilogue(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The served path as one traceable function, for ``fusable`` defenses: the victim's
        logits (N, K) -> (clean posteriors, defended posteriors, both float32 (N, K), the number
        of rows whose defended scores were not finite as a 0-dim int64).

        The same computation as ``serve`` (softmax, float64 rows, ``forward``, ``N``) without
        data-dependent branches, so ``torch.compile`` can run it in the victim's int8 program as
        one fused kernel after its last layer. Measured on the int8 resnet8 (bench_defenses.py):
        the same formulas run eagerly after the victim cost 2-3x their standalone time, because
        the victim's run has evicted the caches their ~15 small tensor ops need, which alone put
        them over DCP's 5 % latency budget.
        """
        clean = torch.softmax(logits.float(), dim=1)
        y = clean.to(torch.float64)
        out = normalize_rows(self.forward(y / y.sum(dim=1, keepdim=True), None, None))
        # A NaN or +inf score leaves its whole row non-finite after N(.).
        return clean, out.to(clean.dtype), (~torch.isfinite(out)).any(dim=1).sum()

    def _answer(self, y: Tensor, posteriors: Tensor, logits: Tensor | None,
                images: Tensor | None) -> Tensor:
        """``forward`` on the float64 rows ``y``, checked and renormalized, in the input's dtype."""
        with torch.no_grad():
            raw = self.forward(y, logits, images)
        out = raw.clamp_min(0.0)
        total = out.sum(dim=1, keepdim=True)
        # One pass over the row sums checks everything: a row with a NaN or inf entry has a
        # non-finite sum (aminmax propagates NaN, which fails both comparisons), and a row that
        # clipping left all zero sums to 0.
        low, high = (float(v) for v in torch.aminmax(total)) if len(total) else (1.0, 1.0)
        if not (low > 0 and high < math.inf):
            if not (torch.isfinite(total).all()):
                # A bug in a defense, never the caller's fault: refuse to answer rather than hand NaN on.
                raise RuntimeError(f"defense {self.name!r} produced non-finite posteriors")
            return normalize_rows(raw).to(posteriors.dtype)
        return (out / total).to(posteriors.dtype)

    @abc.abstractmethod
    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        """Defend float64 posteriors ``y`` (N, K), rows already non-negative and summing to 1;
        return (N, K) scores that the caller clips at 0 and renormalizes."""

    def params(self) -> dict[str, Any]:
        """The constructor arguments as recorded values (models by their type name)."""
        return recorded_params(self)

    def __repr__(self) -> str:
        return params_repr(self)

    def _checked(self, posteriors: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        """Validate the inputs; return the posteriors as float64 rows that sum to exactly 1."""
        if not isinstance(posteriors, Tensor) or not posteriors.is_floating_point():
            raise ValueError(f"{self.name}: posteriors must be a floating-point tensor, got "
                             f"{type(posteriors).__name__} {getattr(posteriors, 'dtype', '')}")
        if posteriors.ndim != 2 or posteriors.shape[1] < 1:
            raise ValueError(f"{self.name}: posteriors must have shape (N, K), got {tuple(posteriors.shape)}")
        n = posteriors.shape[0]
        if self.needs_logits and (logits is None or logits.shape != posteriors.shape):
            raise ValueError(f"{self.name}: needs the victim's logits of shape {tuple(posteriors.shape)}")
        if self.needs_inputs and (images is None or images.ndim != 4 or images.shape[0] != n):
            raise ValueError(f"{self.name}: needs the query images (N, C, H, W) with N = {n}")
        y = posteriors.detach().to(torch.float64)
        # Posteriors come from a softmax in the input dtype: accept its rounding, refuse anything else.
        tol = max(1e-3, 10 * torch.finfo(posteriors.dtype).eps)
        if n and (not torch.isfinite(y).all() or y.min() < -tol
                  or (y.sum(dim=1) - 1).abs().max() > tol):
            raise ValueError(f"{self.name}: posteriors must be finite, non-negative rows summing to 1")
        return normalize_rows(y.clamp_min(0.0))


def normalize_rows(v: Tensor, fallback: Tensor | None = None) -> Tensor:
    """``N``: clip at 0 and divide each row by its sum.

    A row that is all zero after clipping has no direction left; it becomes ``fallback`` (a valid
    distribution of the same shape) or, without one, a one-hot on its own argmax before clipping
    (lowest index on ties).
    """
    clipped = v.clamp_min(0.0)
    total = clipped.sum(dim=1, keepdim=True)
    dead = total <= 0
    # Eagerly the rare dead row is worth a check; compiled (Defense.epilogue), the branch-free
    # form fuses.
    if torch.compiler.is_compiling() or dead.any():
        if fallback is None:
            fallback = one_hot_argmax(v)
        clipped = torch.where(dead, fallback.to(clipped.dtype), clipped)
        total = clipped.sum(dim=1, keepdim=True)
    return clipped / total


def one_hot_argmax(y: Tensor) -> Tensor:
    """One-hot rows on ``argmax y``; ``torch.argmax`` returns the first maximum, so ties go to
    the lowest class index."""
    out = torch.zeros_like(y)
    return out.scatter_(1, y.argmax(dim=1, keepdim=True), 1.0)


def uncertainty_gate(y: Tensor, tau: float, nu: float) -> Tensor:
    """The soft detector of DCP and adaptive misinformation, shape (N, 1):
    ``a = 1 / (1 + exp(nu * (max_k y_k - tau)))``, about 1 where the victim is unsure (max < tau)
    and about 0 where it is confident. Written as ``sigmoid(-nu * (max - tau))`` so a large
    ``nu`` never overflows ``exp``."""
    top = y.amax(dim=1, keepdim=True)
    return torch.sigmoid((top - tau) * -nu)


def module_device(module: Any) -> torch.device | None:
    """The device of a module's first parameter or buffer (None for a plain callable)."""
    if isinstance(module, torch.nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return None


# ---------------------------------------------------------------- registry front end

class _PendingModel:
    """Stands for the model of a model-backed defense before a driver builds it: the defense
    checks its other parameters and skips the checks of the model (``check_defense``)."""

    def __call__(self, images: Tensor) -> Tensor:
        raise RuntimeError("a defense built for parameter checking only was asked to answer")

    def __repr__(self) -> str:
        return "<model built by divqat>"


PENDING_MODEL = _PendingModel()


def check_defense(name: str, params: dict[str, Any]) -> type[Defense]:
    """Build the defense ``name`` once with ``params`` (a model-backed defense with
    ``PENDING_MODEL`` for its model) so that an unknown name, an unknown parameter or a bad value
    is a ``ConfigError`` before any model is trained. Returns the defense's class."""
    try:
        cls = DEFENSES.get(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    if cls.model_param is not None and cls.model_param in params:
        raise ConfigError(f"defense {name!r}: {cls.model_param} is built from the victim by divqat, "
                          "not given as a parameter")
    model = {cls.model_param: PENDING_MODEL} if cls.model_param is not None else {}
    DEFENSES.create(name, **model, **params)
    return cls


def create_defense(name: str, **params: Any) -> Defense:
    """Build a registered defense by its CLI name: ``create_defense("dcp", beta=0.5)``."""
    return DEFENSES.create(name, **params)


def describe_defenses() -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, one-line summary, {param: default})`` for every registered defense, by name."""
    return DEFENSES.describe()
