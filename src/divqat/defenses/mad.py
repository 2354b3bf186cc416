"""MAD, prediction poisoning (Orekondy et al., ICLR 2020)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from divqat.checks import check_bool, check_choice, check_number
from divqat.defenses.base import DEFENSES, PENDING_MODEL, Defense, module_device, normalize_rows
from divqat.errors import ConfigError

# The reference's argmax-preserving vertices put this much extra mass on the victim's argmax.
_ARGMAX_UPWEIGHT = 1e-5
# The reference's cap on the vertices its greedy argmax-preserving search evaluates.
_MAX_VERTICES = 1024


def angular_deviation(targets: Tensor, y: Tensor, p_s: Tensor) -> Tensor:
    """MAD's objective ``|| G^T t / ||G^T t|| - G^T y / ||G^T y|| ||^2`` for candidate targets.

    For a last linear layer ``z = W h + b`` the rows of the Jacobian of ``-log softmax(z)`` w.r.t.
    ``(W, b)`` are ``G_k = (p_s - e_k) (x) [h, 1]``, so for any distribution ``t``
    ``G^T t = (p_s - t) (x) [h, 1]``: the feature factor is shared by every target and cancels in the
    normalized difference. The objective is therefore computed from the surrogate's posterior
    ``p_s`` alone, exactly, without materializing G (the whole point of doing it batched).

    Shapes: targets (N, C, K), y (N, K), p_s (N, K) -> (N, C). Values in [0, 4].
    """
    def unit(v: Tensor) -> Tensor:
        # A zero direction (p_s equal to the target) has no angle; it stays 0 instead of NaN.
        return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)

    d_y = unit(p_s - y)
    d_t = unit(p_s[:, None, :] - targets)
    return (d_t - d_y[:, None, :]).pow(2).sum(dim=-1)


@DEFENSES.register("mad")
class MAD(Defense):
    """MAD: perturb each posterior to maximally deviate the attacker's training gradient.

    Orekondy, Schiele, Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model Stealing
    Attacks" (ICLR 2020). With G the Jacobian of the log-likelihood of a surrogate of the attacker's
    model w.r.t. its last layer, per query::

        max_{y'}  || G^T y' / ||G^T y'|| - G^T y / ||G^T y|| ||^2
        s.t.      y' in the simplex,  ||y' - y||_1 <= eps

    solved as in the reference code (oracle "extreme", optim "linesearch", objmax=True): evaluate
    the objective at every one-hot target ``y* = e_k`` (the extreme points of the simplex), keep the
    best (lowest index on ties), then move ``y' = y + t (y* - y)`` with the largest ``t`` in [0, 1]
    such that ``||y' - y||_1 = t ||y* - y||_1 <= eps``.

    MAD-argmax (``argmax_preserving=True``): the targets are the reference's argmax-preserving
    vertices, uniform over a set of classes that contains the argmax m, with 1e-5 extra mass on m,
    found by the reference's greedy search (grow the set by the class that maximizes the objective,
    at most 1024 vertices). Both y and the target have argmax m, so y' keeps it.

    Arguments:
        surrogate (nn.Module): the defender's proxy of the attacker's model, images -> logits
            (N, K), whose final layer is an ``nn.Linear``. The reference uses a randomly
            initialized network of the victim's architecture. Required. Put in eval mode.
        eps (float): L1 budget in [0, 2]. (Default: 0.5.)
        argmax_preserving (bool): the MAD-argmax variant. (Default: False.)
        select (str): where a candidate target is scored. "vertex" (default, the reference): at
            the target itself. "feasible": at the point the budget reaches toward it,
            ``y + t (y* - y)``, i.e. the objective actually served; never worse per query than
            "vertex" over the same candidates. The difference matters most for MAD-argmax: its
            vertices near the surrogate's posterior have a large angle but a short lever. In one
            synthetic measurement (random 10-class surrogate, confident posteriors, eps = 0.5),
            MAD-argmax turned the gradient about 20 times less with "vertex" than with
            "feasible" (mean objective 0.01 vs 0.23; plain MAD 0.22 vs 0.25; random vertex
            noise 0.20).
        last_layer (str, optional): dotted module name of the final ``nn.Linear`` in
            ``surrogate.named_modules()`` ("fc", "classifier.2"). (Default: None, the last
            ``nn.Linear`` registered.) Checked at every call: its output must be the logits.

    Deviations from the reference code: G is taken w.r.t. the weight and the bias (the reference
    uses the weight only); the objective is identical whenever the features h are non-zero, and the
    bias keeps G non-zero when they are. G is never materialized (see ``angular_deviation``;
    ``jacobian()`` builds it for inspection). The greedy argmax search is used for every K (the
    reference enumerates all 2^(K-1) vertices for K <= 10) and also scores the one-hot e_m. Rows
    are processed as a batch.

    Shape:
        posteriors (N, K), images (N, C, H, W) -> (N, K).

    Examples::
        >>> defense = MAD(surrogate=random_resnet, eps=0.5)
        >>> defended = defense(posteriors, images=images)
    """

    name = "mad"
    not_fusable_because = "it runs a surrogate model and a per-query search over its gradients"
    needs_inputs = True
    model_param = "surrogate"
    model_help = "a randomly initialized model of the victim's architecture (--seed)"

    def __init__(self, surrogate: nn.Module | None = None, eps: float = 0.5,
                 argmax_preserving: bool = False, select: str = "vertex",
                 last_layer: str | None = None) -> None:
        self.eps = check_number(self.name, "eps", eps, low=0.0, high=2.0)
        self.argmax_preserving = check_bool(self.name, "argmax_preserving", argmax_preserving)
        self.select = check_choice(self.name, "select", select, ("vertex", "feasible"))
        if last_layer is not None and not isinstance(last_layer, str):
            raise ConfigError(f"{self.name}.last_layer must be a module name or null, got {last_layer!r}")
        if surrogate is PENDING_MODEL:  # parameters checked; the driver builds the surrogate
            self.surrogate, self.last_layer = surrogate, last_layer
            return
        if not isinstance(surrogate, nn.Module):
            raise ConfigError(
                f"{self.name}: needs surrogate, an nn.Module images -> logits ending in an "
                f"nn.Linear (e.g. a randomly initialized model of the victim's architecture); "
                f"got {surrogate!r}")
        layers = dict(surrogate.named_modules())
        if last_layer is None:
            linear_names = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
            if not linear_names:
                raise ConfigError(f"{self.name}: surrogate {type(surrogate).__name__} has no nn.Linear layer")
            last_layer = linear_names[-1]
        if not isinstance(layers.get(last_layer), nn.Linear):
            raise ConfigError(f"{self.name}: last_layer {last_layer!r} is not an nn.Linear of the "
                              f"surrogate; its nn.Linear layers: "
                              f"{[n for n, m in layers.items() if isinstance(m, nn.Linear)]}")
        self.surrogate = surrogate.eval()
        self.last_layer = last_layer
        self._linear: nn.Linear = layers[last_layer]

    def _answer(self, y: Tensor, posteriors: Tensor, logits: Tensor | None,
                images: Tensor | None) -> Tensor:
        out = super()._answer(y, posteriors, logits, images)
        if self.argmax_preserving:
            # Exact in float64; rounding to a float32 output could still tie the argmax with the
            # class just below it. Such rows get the undefended posterior rather than a new label.
            flipped = out.argmax(dim=1) != posteriors.argmax(dim=1)
            if flipped.any():
                fallback = normalize_rows(posteriors.detach()[flipped].to(torch.float64))
                out[flipped] = fallback.to(out.dtype)
        return out

    def surrogate_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The input ``h`` (N, H) of the surrogate's last layer and its logits ``z`` (N, K)."""
        captured: dict[str, Tensor] = {}

        def grab(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            captured["h"], captured["z"] = args[0], output

        device = module_device(self.surrogate)
        x = images if device is None else images.to(device)
        handle = self._linear.register_forward_hook(grab)
        try:
            with torch.no_grad():
                z = self.surrogate(x)
        finally:
            handle.remove()
        if "z" not in captured or captured["h"].ndim != 2 or not torch.equal(captured["z"], z):
            raise ValueError(f"{self.name}: layer {self.last_layer!r} is not the surrogate's final "
                             "layer on (N, H) features: its output is not the surrogate's logits")
        return captured["h"], z

    def jacobian(self, images: Tensor) -> Tensor:
        """G per image, (N, K, K*H + K): row k is the gradient of ``-log softmax(z)_k`` w.r.t.
        the last layer's weight (flattened, row-major) then bias, as ``torch.autograd`` orders
        them. For inspection and tests; ``forward`` never builds it."""
        h, z = self.surrogate_features(images)
        h, p = h.to(torch.float64), torch.softmax(z.to(torch.float64), dim=1)
        k = p.shape[1]
        a = p[:, None, :] - torch.eye(k, dtype=p.dtype, device=p.device)  # a[n, k] = p - e_k
        weight = (a[..., None] * h[:, None, None, :]).flatten(2)
        parts = [weight] if self._linear.bias is None else [weight, a]
        return torch.cat(parts, dim=2)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        if self.eps == 0:
            return y
        _, z = self.surrogate_features(images)
        if z.shape != y.shape:
            raise ValueError(f"{self.name}: surrogate gives {tuple(z.shape)} logits for "
                             f"{tuple(y.shape)} posteriors")
        p_s = torch.softmax(z.to(device=y.device, dtype=torch.float64), dim=1)
        search = self._argmax_target if self.argmax_preserving else self._extreme_target
        target = search(y, p_s)
        return self._toward(y, target[:, None, :])[:, 0]

    def _toward(self, y: Tensor, targets: Tensor) -> Tensor:
        """Line search: ``y + t (target - y)`` with the largest t in [0, 1] such that
        ``t * ||target - y||_1 <= eps``. targets (N, C, K) -> (N, C, K)."""
        step = targets - y[:, None, :]
        dist = step.abs().sum(dim=2, keepdim=True)
        t = torch.where(dist > 0, (self.eps / dist.clamp_min(1e-300)).clamp(max=1.0), 0.0)
        return y[:, None, :] + t * step

    def _score(self, targets: Tensor, y: Tensor, p_s: Tensor) -> Tensor:
        """Objective of each candidate target (N, C, K) -> (N, C), where ``select`` says."""
        points = targets if self.select == "vertex" else self._toward(y, targets)
        return angular_deviation(points, y, p_s)

    def _extreme_target(self, y: Tensor, p_s: Tensor) -> Tensor:
        vertices = torch.eye(y.shape[1], dtype=y.dtype, device=y.device).expand(y.shape[0], -1, -1)
        best = self._score(vertices, y, p_s).argmax(dim=1)
        return torch.zeros_like(y).scatter_(1, best[:, None], 1.0)

    def _argmax_target(self, y: Tensor, p_s: Tensor) -> Tensor:
        n, k = y.shape
        rows = torch.arange(n, device=y.device)
        top = torch.zeros_like(y).scatter_(1, y.argmax(dim=1, keepdim=True), 1.0)
        best, best_val = top, self._score(top[:, None, :], y, p_s)[:, 0]
        chosen = top.bool()
        grow = torch.eye(k, dtype=torch.bool, device=y.device)
        evaluated = 1
        # Every row grows its set by one class per step, so the loop length is shared.
        for size in range(1, k):
            if evaluated >= _MAX_VERTICES:
                break
            sets = chosen[:, None, :] | grow[None]  # candidate j: chosen set plus class j
            vertices = sets.to(y.dtype) + _ARGMAX_UPWEIGHT * top[:, None, :]
            vertices = vertices / vertices.sum(dim=2, keepdim=True)
            values = self._score(vertices, y, p_s).masked_fill(chosen, -math.inf)
            j = values.argmax(dim=1)
            value = values[rows, j]
            better = value > best_val
            best = torch.where(better[:, None], vertices[rows, j], best)
            best_val = torch.where(better, value, best_val)
            chosen[rows, j] = True
            evaluated += k - size
        return best
