"""PreciseBN: BatchNorm statistics recomputed at the trained weights where the running average lags."""

import numpy as np
import pytest
import torch
from torch import nn

from divqat.errors import ConfigError
from divqat.models import create_model
from divqat.train import CrossEntropy, FitConfig, fit
from divqat.train.trainer import precise_bn, wants_precise_bn


def _net(momentum: float | None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_statistics_are_the_average_over_the_images():
    torch.manual_seed(0)
    net = _net(0.01).eval()
    images = (torch.rand(256, 1, 8, 8) * 255).to(torch.uint8)
    used = precise_bn(net, images, batch_size=64, limit=256)
    assert used == 256
    with torch.no_grad():
        pre = net[0](images.float() / 255)  # the BatchNorm's inputs
    per_batch = pre.split(64)
    # Cumulative average of per-batch means and (unbiased) variances, as BatchNorm accumulates them.
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in per_batch]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in per_batch]).mean(0)
    bn = net[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert bn.momentum == 0.01 and not net.training  # restored


def test_auto_applies_only_to_slow_running_averages():
    assert wants_precise_bn(_net(0.01), "auto")
    assert not wants_precise_bn(_net(0.1), "auto")      # the built-in ResNets: numbers unchanged
    assert not wants_precise_bn(_net(None), "auto")     # already a cumulative average
    assert wants_precise_bn(_net(0.1), "on") and not wants_precise_bn(_net(0.01), "off")
    assert not wants_precise_bn(create_model("resnet8", 1, 10), "auto")
    with pytest.raises(ConfigError):
        FitConfig(precise_bn="sometimes")


def test_fit_leaves_evaluation_statistics_of_the_final_weights():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (192, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 192)
    cfg = FitConfig(epochs=2, batch_size=32, lr=0.05, progress=False, log_epochs=False, augment=False)
    torch.manual_seed(0)
    net = _net(0.01)
    fit(net, images, labels, CrossEntropy(), cfg)
    expected = _net(0.01)
    expected.load_state_dict(net.state_dict())
    precise_bn(expected, images, batch_size=32, generator=torch.Generator().manual_seed(cfg.seed + 1))
    assert torch.allclose(net[1].running_mean, expected[1].running_mean, atol=1e-5)
    torch.manual_seed(0)
    untouched = _net(0.01)  # the same initial weights, trained the same way, statistics left as trained
    fit(untouched, images, labels, CrossEntropy(), FitConfig(**{**cfg.__dict__, "precise_bn": "off"}))
    assert torch.allclose(untouched[0].weight, net[0].weight)
    assert not torch.allclose(untouched[1].running_mean, expected[1].running_mean, atol=1e-3)
