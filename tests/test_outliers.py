"""Outlier synthesis and sources (divqat.train.outliers) and the out-of-distribution DivQAT
objective (divqat.train.ood): shapes, ranges, determinism, no labels, and the limits at which the
objective is exactly QAT's CE or the paper's DivQAT loss."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_bars
from torch import nn

from divqat.errors import ConfigError, DatasetError
from divqat.train import outliers as O
from divqat.train.losses import DIVERGENCES, DivQATLoss, DivQATSettings, divergence
from divqat.train.ood import OODDivQATLoss, divqat_objective
from divqat.train.trainer import FitConfig, fit


def batch(n: int = 6, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- synthesis

@pytest.mark.parametrize("kind", [*O.KINDS, "all"])
@pytest.mark.parametrize("shape", [(6, 1, 16, 16), (5, 3, 18, 13), (1, 1, 8, 8)])
def test_synthesis_shapes_range_and_determinism(kind, shape):
    x = torch.rand(*shape, generator=gen(1))
    kinds = O.KINDS if kind == "all" else (kind,)
    out = O.synthesize(x, gen(7), kinds)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, O.synthesize(x, gen(7), kinds))  # same seed, same outliers
    assert not torch.equal(out, x)
    if shape[0] > 1:
        assert not torch.equal(out, O.synthesize(x, gen(8), kinds))


def test_synthesizers_take_no_labels():
    for fn in (O.synthesize, *O.SYNTHESIZERS.values(), O.SynthesizedOutliers.__call__,
               O.DatasetOutliers.__call__, OODDivQATLoss.extra_inputs):
        params = set(inspect.signature(fn).parameters)
        assert not params & {"labels", "targets", "y"}, fn


def test_mix_pairs_every_image_with_another_one():
    # One-hot "images": a blend shows which two images went into it.
    n = 7
    x = torch.eye(n).view(n, 1, 1, n).expand(n, 1, 4, n).contiguous()
    out = O.mix(x, gen(3))
    for i in range(n):
        row = out[i, 0, 0]
        used = set(torch.nonzero(row).flatten().tolist())
        assert i in used and len(used) == 2
        assert 0.35 <= row[i] <= 0.65
    partners = [next(iter(set(torch.nonzero(out[i, 0, 0]).flatten().tolist()) - {i})) for i in range(n)]
    assert sorted(partners) == list(range(n))  # a permutation: each image lends itself once


def test_patch_shuffle_keeps_the_patches_and_the_border():
    x = torch.arange(2 * 18 * 17, dtype=torch.float32).view(2, 1, 18, 17) / (2 * 18 * 17)
    out = O.patch_shuffle(x, gen(0), grid=4)
    # 18x17 with a 4x4 grid: patches of 4x4, a border of 2 rows and 1 column stays.
    assert torch.equal(out[:, :, 16:], x[:, :, 16:]) and torch.equal(out[:, :, :, 16:], x[:, :, :, 16:])
    for i in range(2):
        assert torch.equal(out[i].flatten().sort().values, x[i].flatten().sort().values)
    assert not torch.equal(out, x)
    with pytest.raises(ConfigError, match="at least 4x4"):
        O.patch_shuffle(torch.rand(1, 1, 3, 3), gen(0))


def test_corrupt_is_noise_inversion_or_mosaic():
    x = batch(64)
    out = O.corrupt(x, gen(0))
    inverted = torch.isclose(out, 1 - x).flatten(1).all(1)
    mosaic = torch.tensor([len(torch.unique(o)) <= 16 for o in out])
    assert inverted.any() and mosaic.any() and (~inverted & ~mosaic).any()


def test_dataset_outliers_draw_from_the_set_with_the_batch_size():
    pool = torch.full((5, 1, 8, 8), 200, dtype=torch.uint8)
    source = O.DatasetOutliers(pool, "pool:train", pad=0, hflip=False)
    out = source(batch(3, size=8), gen(0))
    assert out.shape == (3, 1, 8, 8) and torch.allclose(out, torch.full_like(out, 200 / 255))
    with pytest.raises(ConfigError, match="uint8"):
        O.DatasetOutliers(torch.zeros(2, 1, 4, 4), "x")


def test_parse_and_load_outlier_sources():
    assert O.parse_outliers(" synth ") == "synth"
    assert O.parse_outliers("synth:corrupt+mix") == "synth:corrupt+mix"
    assert O.parse_outliers("fmnist[5-9]") == "fashion-mnist[5-9]:train"
    assert O.parse_outliers("mnist:test") == "mnist:test"
    for bad in ("synth:blur", "synth:mix+mix", "synth:", "mnist:val", ":train"):
        with pytest.raises(ConfigError, match="bad outlier source"):
            O.parse_outliers(bad)
    with pytest.raises(DatasetError, match="unknown dataset"):
        O.parse_outliers("imagenet")
    source = O.load_outliers("synth:mix", (1, 16, 16), training_set="x:train")
    assert source.name == "synth:mix of x:train" and source.kinds == ("mix",)
    named = O.load_outliers(f"{TINY}[0,2]", (3, 20, 20))  # adapted to the victim's input
    assert named.name == f"{TINY}[0,2]:train" and named.images.shape[1:] == (3, 20, 20)
    assert not hasattr(named, "labels")
    assert named(batch(4, 3, 20), gen(0)).shape == (4, 3, 20, 20)


# ---------------------------------------------------------------- the objective

class Teacher(nn.Module):
    """A fixed linear teacher on flattened images."""

    def __init__(self, k: int = 4, size: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(size * size, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, size * size, generator=gen(5)) * 0.3)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def rows():
    images = batch(12)  # 8 training images, then 4 outliers
    logits = torch.randn(12, 4, generator=gen(2))
    labels = torch.randint(0, 4, (8,), generator=gen(3))
    return images, logits, labels


def test_settings_defaults_are_the_papers_and_validation():
    s = DivQATSettings(alpha=2.0, cap=0.15)
    assert s.divergence_on == "in" and s.distill == 0
    assert "divergence_on" not in s.as_dict()  # recorded and keyed as before the variant existed
    o = DivQATSettings(alpha=2.0, divergence_on="out", outliers="fmnist:train", distill=0.5)
    assert o.outliers == "fashion-mnist:train"
    assert DivQATSettings(**o.as_dict()) == o
    with pytest.raises(ConfigError, match=r"divqat\.divergence_on must be one of in, out, both"):
        DivQATSettings(divergence_on="outside")
    with pytest.raises(ConfigError, match="distill"):
        DivQATSettings(alpha=1.0, distill=0.5)  # the divergence on the training images
    with pytest.raises(ConfigError, match="distill"):
        DivQATSettings(divergence_on="out", distill=-1.0)


def test_alpha_zero_without_distillation_is_exactly_cross_entropy(rows):
    images, logits, labels = rows
    loss_fn = OODDivQATLoss(Teacher(), DivQATSettings(alpha=0.0, divergence_on="out"), O.SynthesizedOutliers())
    assert loss_fn.extra_inputs(images[:8], gen(0)) is None  # no outliers: the batch QAT sees
    loss, _ = loss_fn(logits[:8], labels, images[:8], 0.5)
    assert torch.equal(loss, F.cross_entropy(logits[:8], labels))
    both = OODDivQATLoss(Teacher(), DivQATSettings(alpha=0.0, divergence_on="both"), O.SynthesizedOutliers())
    assert torch.equal(both(logits, labels, images, 0.5)[0], F.cross_entropy(logits[:8], labels))


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("cap", [None, 0.1])
def test_divergence_on_the_training_images_is_exactly_the_papers_divqat(rows, kind, cap):
    images, logits, labels = rows
    settings = DivQATSettings(alpha=1.5, divergence=kind, cap=cap, ramp=0.5, divergence_on="in")
    teacher = Teacher()
    paper = DivQATLoss(teacher, settings)(logits[:8], labels, images[:8], 0.3)[0]
    ood = OODDivQATLoss(teacher, settings)(logits[:8], labels, images[:8], 0.3)[0]
    assert torch.equal(paper, ood)
    assert type(divqat_objective(teacher, settings)) is DivQATLoss


def test_out_pushes_only_on_the_outliers_and_never_reads_their_labels(rows):
    images, logits, labels = rows
    teacher = Teacher()
    s = DivQATSettings(alpha=2.0, cap=0.5, divergence_on="out")
    loss_fn = divqat_objective(teacher, s, O.SynthesizedOutliers())
    assert isinstance(loss_fn, OODDivQATLoss)
    loss, logs = loss_fn(logits, labels, images, 1.0)
    t = teacher(images).detach()
    div_out = divergence(t[8:], logits[8:], "kl").clamp(max=0.5).mean()
    assert torch.allclose(loss, F.cross_entropy(logits[:8], labels) - 2.0 * div_out)
    assert {"ce", "div", "div_out"} <= set(logs)
    # Other labels change the CE term only: the outliers' part does not depend on them.
    other = (labels + 1) % 4
    loss2, _ = loss_fn(logits, other, images, 1.0)
    assert torch.allclose(loss2 - F.cross_entropy(logits[:8], other), loss - F.cross_entropy(logits[:8], labels))


def test_both_is_the_papers_term_plus_the_outliers_term_and_distill_pulls(rows):
    images, logits, labels = rows
    teacher = Teacher()
    t = teacher(images).detach()
    both = OODDivQATLoss(teacher, DivQATSettings(alpha=1.0, divergence_on="both"), O.SynthesizedOutliers())
    expected = (F.cross_entropy(logits[:8], labels) - divergence(t[:8], logits[:8], "kl").mean()
                - divergence(t[8:], logits[8:], "kl").mean())
    assert torch.allclose(both(logits, labels, images, 1.0)[0], expected)
    pull = OODDivQATLoss(teacher, DivQATSettings(alpha=0.0, divergence_on="out", distill=0.5, temperature=2.0))
    expected = F.cross_entropy(logits[:8], labels) + 0.5 * 4 * divergence(t[:8], logits[:8], "kl",
                                                                        temperature=2.0).mean()
    assert torch.allclose(pull(logits[:8], labels, images[:8], 1.0)[0], expected)


@pytest.mark.parametrize("placement", ["out", "both"])
def test_gradients_flow_to_the_outliers_logits_and_push_them_away(rows, placement):
    images, logits, labels = rows
    teacher = Teacher()
    z = logits.clone().requires_grad_(True)
    s = DivQATSettings(alpha=1.0, divergence="tail-kl", divergence_on=placement)
    loss, _ = OODDivQATLoss(teacher, s, O.SynthesizedOutliers())(z, labels, images, 1.0)
    loss.backward()
    assert z.grad[8:].abs().sum() > 0 and z.grad[:8].abs().sum() > 0
    t = teacher(images).detach()
    before = divergence(t[8:], z[8:].detach(), "tail-kl", t[8:].argmax(1)).mean()
    after = divergence(t[8:], (z - 0.5 * z.grad)[8:].detach(), "tail-kl", t[8:].argmax(1)).mean()
    assert after > before


def test_outlier_source_is_required_when_used():
    with pytest.raises(ConfigError, match="outlier source"):
        OODDivQATLoss(Teacher(), DivQATSettings(alpha=1.0, divergence_on="out"))


# ---------------------------------------------------------------- in the training loop

class Recorder:
    """Wraps an objective; keeps what fit showed it."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def extra_inputs(self, images, generator):
        return self.inner.extra_inputs(images, generator)

    def __call__(self, logits, labels, images, progress):
        self.calls.append((logits.shape[0], labels.shape[0], images.detach().clone()))
        return self.inner(logits, labels, images, progress)


def _fit_once(labels: np.ndarray, images: np.ndarray, settings: DivQATSettings):
    torch.manual_seed(0)
    student = Teacher()
    teacher = Teacher()
    rec = Recorder(OODDivQATLoss(teacher, settings, O.SynthesizedOutliers()))
    fit(student, images, labels, rec, FitConfig(epochs=1, batch_size=16, lr=0.01, schedule="constant",
                                                progress=False, log_epochs=False, channels_last=False))
    return rec.calls, student


def test_fit_appends_outliers_and_they_do_not_depend_on_the_labels():
    images, labels = make_bars(48, seed=0)
    s = DivQATSettings(alpha=1.0, cap=0.3, divergence_on="out")
    calls, _ = _fit_once(labels, images, s)
    assert [(n, m) for n, m, _ in calls] == [(32, 16)] * 3  # 16 training images + 16 outliers
    shuffled = np.random.default_rng(0).permutation(labels)
    calls2, _ = _fit_once(shuffled, images, s)
    for (_, _, a), (_, _, b) in zip(calls, calls2, strict=True):
        assert torch.equal(a, b)  # same images, same outliers, whatever the labels
    qat_like, student = _fit_once(labels, images, DivQATSettings(alpha=0.0, divergence_on="out"))
    assert [(n, m) for n, m, _ in qat_like] == [(16, 16)] * 3  # alpha 0: no outliers, QAT's batches


def test_ood_options_belong_to_divqat_and_bad_ones_are_one_line(tmp_path, capsys):
    from divqat.cli import main
    from divqat.pipelines.train import TrainRequest

    with pytest.raises(ConfigError, match="only apply to --mode divqat"):
        TrainRequest(dataset=TINY, mode="qat", teacher="x", divqat=DivQATSettings(divergence_on="out"))
    code = main(["train", "--dataset", TINY, "--mode", "divqat", "--teacher", str(tmp_path), "--epochs", "1",
                 "--divergence-on", "out", "--outliers", "synth:blur", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "bad outlier source 'synth:blur'" in err and err.count("\n") == 1
