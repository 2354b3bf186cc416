import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divqat.errors import ConfigError
from divqat.train.losses import DIVERGENCES, CrossEntropy, DivQATLoss, DivQATSettings, divergence


class FixedTeacher(nn.Module):
    """A teacher that answers fixed logits, whatever the images."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 5, generator=g) * 3
    student = torch.randn(8, 5, generator=g)
    labels = teacher.argmax(dim=1)
    return teacher, student, labels


def test_alpha_zero_is_exactly_cross_entropy(batch):
    teacher, student, labels = batch
    loss, logs = DivQATLoss(FixedTeacher(teacher), DivQATSettings(alpha=0.0))(student, labels, None, 0.5)
    assert torch.equal(loss, F.cross_entropy(student, labels))
    assert logs["div"] > 0  # still logged


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_term_is_subtracted(batch, kind):
    teacher, student, labels = batch
    s = DivQATSettings(alpha=0.7, divergence=kind)
    loss, logs = DivQATLoss(FixedTeacher(teacher), s)(student, labels, None, 1.0)
    div = divergence(teacher, student, kind, labels).mean()
    assert div > 0
    assert torch.allclose(loss, F.cross_entropy(student, labels) - 0.7 * div)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_step_moves_student_away_from_teacher(batch, kind):
    teacher, student, labels = batch
    student = student.clone().requires_grad_(True)
    before = divergence(teacher, student, kind, labels).mean().item()
    # Only the divergence part of the DivQAT loss: one gradient step on -alpha * D.
    loss = -1.0 * divergence(teacher, student, kind, labels).mean()
    loss.backward()
    with torch.no_grad():
        after = divergence(teacher, student - 0.5 * student.grad, kind, labels).mean().item()
    assert after > before


def test_divergences_are_zero_for_identical_posteriors_and_js_is_bounded(batch):
    teacher, student, labels = batch
    for kind in DIVERGENCES:
        assert divergence(teacher, teacher, kind, labels).abs().max() < 1e-6
    far = torch.full_like(teacher, -50.0)
    far[:, 0] = 50.0
    near = -far
    assert divergence(far, near, "js", labels).max() <= math.log(2) + 1e-6


def test_kl_direction_matches_definition(batch):
    teacher, student, _ = batch
    p, q = F.softmax(teacher, 1), F.softmax(student, 1)
    expected = (p * (p.log() - q.log())).sum(1)
    assert torch.allclose(divergence(teacher, student, "kl"), expected, atol=1e-5)
    reverse = (q * (q.log() - p.log())).sum(1)
    assert torch.allclose(divergence(teacher, student, "reverse-kl"), reverse, atol=1e-4)


def test_tail_kl_ignores_the_true_class(batch):
    teacher, student, labels = batch
    moved = student.clone()
    moved[torch.arange(len(labels)), labels] += 5.0  # only the true-class logit changes
    assert torch.allclose(divergence(teacher, student, "tail-kl", labels),
                          divergence(teacher, moved, "tail-kl", labels), atol=1e-5)
    with pytest.raises(ConfigError):
        divergence(teacher, student, "tail-kl", None)


def test_log_clamp_bounds_the_kl(batch):
    teacher, _, labels = batch
    student = torch.full_like(teacher, -1e4)
    student[:, 0] = 1e4  # p_q is one-hot: unclamped KL would be infinite
    kl = divergence(teacher, student, "kl", log_clamp=math.log(1e-6))
    assert torch.isfinite(kl).all() and kl.max() <= -math.log(1e-6) + 1e-4


def test_cap_stops_the_push_once_reached(batch):
    teacher, student, labels = batch
    student = student.clone().requires_grad_(True)
    per_sample = divergence(teacher, student, "kl", labels).detach()
    cap = float(per_sample.median())
    loss, _ = DivQATLoss(FixedTeacher(teacher), DivQATSettings(alpha=1.0, cap=cap))(student, labels, None, 1.0)
    ce_grad = torch.autograd.grad(F.cross_entropy(student, labels), student)[0]
    grad = torch.autograd.grad(loss, student)[0]
    above = per_sample > cap
    assert above.any() and (~above).any()
    assert torch.allclose(grad[above], ce_grad[above])  # only CE acts there
    assert not torch.allclose(grad[~above], ce_grad[~above])


def test_ramp_and_validation():
    s = DivQATSettings(alpha=2.0, ramp=0.5)
    assert s.alpha_at(0.0) == 0.0 and s.alpha_at(0.25) == 1.0 and s.alpha_at(0.9) == 2.0
    assert DivQATSettings(alpha=2.0).alpha_at(0.0) == 2.0
    for bad in [dict(alpha=-1), dict(alpha=float("nan")), dict(divergence="l2"), dict(cap=0),
                dict(ramp=1.5), dict(temperature=0), dict(log_clamp=1.0)]:
        with pytest.raises(ConfigError):
            DivQATSettings(**bad)


def test_cross_entropy_objective(batch):
    _, student, labels = batch
    loss, logs = CrossEntropy()(student, labels, None, 0.0)
    assert torch.equal(loss, F.cross_entropy(student, labels)) and "loss" in logs
