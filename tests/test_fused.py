"""The fused served path: a formula defense compiled into an int8 victim's program answers what the
same defense run eagerly after the victim answers, with each victim's own weights, and anything that
cannot be fused is served the eager way."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CLASSES, make_bars
from torch import Tensor

from divqat import load_victim
from divqat.blackbox import BlackBox, DefendedVictim
from divqat.defenses import Defense, create_defense
from divqat.models import VictimNet
from divqat.quant import convert_to_int8, prepare_qat
from divqat.victim import Victim

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def int8_victim(tiny_victims):
    return load_victim(tiny_victims["qat"])


@pytest.fixture(scope="module")
def queries():
    """Tiny-bars images as the victim takes them: float32 in [0, 1]."""
    images, _ = make_bars(300, seed=2)
    return torch.from_numpy(images).float() / 255


def untrained_int8_victim(tmp_path) -> Victim:
    """A second int8 victim of the same architecture with other (random) weights."""
    torch.manual_seed(7)
    example = torch.rand(4, *SHAPE)
    qat = prepare_qat(VictimNet("resnet8", 1, len(TINY_CLASSES), (0.3,), (0.3,)), example)
    with torch.no_grad():
        for _ in range(3):
            qat(torch.rand(32, *SHAPE))
    meta = {"mode": "qat", "input_shape": list(SHAPE), "classes": list(TINY_CLASSES), "arch": "resnet8"}
    return Victim(convert_to_int8(qat, example).module(), meta, tmp_path)


@pytest.mark.parametrize(("name", "params"), [
    ("none", {}), ("top-k", {"k": 1}), ("top-k", {"k": 2}), ("rounding", {"decimals": 1}),
    ("reverse-sigmoid", {"beta": 0.7}), ("dcp", {"beta": 0.9, "tau": 0.99}),
])
def test_fused_defense_answers_what_the_eager_one_answers(int8_victim, queries, name, params):
    defense = create_defense(name, **params)
    fused, eager = DefendedVictim(int8_victim, defense), DefendedVictim(int8_victim, defense, fuse=False)
    x = queries[:16]  # one bucket: one compilation per defense
    a, b = fused(x), eager(x)
    assert fused.fused and a.fused and not eager.fused and not b.fused
    assert a.defense_seconds == 0 and a.victim_seconds > 0
    assert torch.equal(a.logits, b.logits)
    assert torch.allclose(a.clean, b.clean, atol=1e-6, rtol=0)
    assert torch.allclose(a.defended, b.defended, atol=1e-6, rtol=0)
    assert torch.equal(a.defended.argmax(1), b.defended.argmax(1))
    assert torch.allclose(a.defended.sum(1), torch.ones(len(x)), atol=1e-6) and (a.defended >= 0).all()
    if name != "none":  # the defense really ran in the program: its answer is not the clean one
        assert (a.defended - a.clean).abs().amax() > 1e-3


def test_large_and_odd_sized_queries_are_chunked_padded_and_reassembled(int8_victim, queries):
    defense = create_defense("dcp", beta=0.9, tau=0.99)
    fused, eager = DefendedVictim(int8_victim, defense), DefendedVictim(int8_victim, defense, fuse=False)
    for n in (300, 5):  # 256 + 44 (padded to 64), and 5 (padded to 16)
        a, b = fused(queries[:n]), eager(queries[:n])
        assert a.fused and a.defended.shape == a.clean.shape == a.logits.shape == (n, len(TINY_CLASSES))
        assert torch.equal(a.logits, b.logits)
        assert torch.allclose(a.defended, b.defended, atol=1e-6, rtol=0)


def test_each_fused_victim_answers_with_its_own_weights(int8_victim, queries, tmp_path):
    """Two int8 victims of one architecture behind one defense: each fused program must keep its
    own (frozen) weights."""
    other = untrained_int8_victim(tmp_path)
    defense = create_defense("top-k", k=2)
    x = queries[:16]
    first, second = DefendedVictim(int8_victim, defense)(x), DefendedVictim(other, defense)(x)
    assert first.fused and second.fused
    assert torch.equal(first.logits, int8_victim(x))
    assert torch.equal(second.logits, other(x))
    assert not torch.allclose(first.logits, second.logits, atol=1e-3)


@torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True)
def test_every_fused_program_stays_compiled(int8_victim, queries):
    """Each fused program compiles on its own: programs that shared one dynamo cache would pass
    its recompile limit (8; 2 here, made an error) after a few defenses and from then on serve
    unfused, more slowly, without a word."""
    expected = {n: int8_victim(queries[:n]) for n in (16, 40)}
    for defense in (create_defense("top-k", k=2), create_defense("rounding", decimals=1)):
        served = DefendedVictim(int8_victim, defense)
        for n in (16, 40):  # two bucket sizes, two compilations of each program
            batch = served(queries[:n])
            assert batch.fused and torch.equal(batch.logits, expected[n]), (defense, n)


def test_what_cannot_be_fused_is_served_eagerly(tiny_victims, int8_victim, queries):
    x = queries[:16]
    noise = DefendedVictim(int8_victim, create_defense("random-noise", eps=0.5, seed=0))
    noise(x)
    assert not noise.fused  # random state: not a formula of the posteriors alone
    fp32 = DefendedVictim(load_victim(tiny_victims["fp32"]), create_defense("dcp", beta=0.5))
    assert not fp32(x).fused  # an eager fp32 victim has no compiled program to fuse into

    def plain(images: Tensor) -> Tensor:
        return images.flatten(1)[:, :len(TINY_CLASSES)]

    served = DefendedVictim(plain, create_defense("dcp", beta=0.5), input_shape=SHAPE,
                            num_classes=len(TINY_CLASSES))
    assert not served(x).fused


class _NaNRows(Defense):
    """A broken fusable defense: NaN scores for every row."""

    name = "nan-rows"
    fusable = True

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        return y * float("nan")


def test_a_fused_defense_that_produces_nan_is_refused_and_not_counted(int8_victim, queries):
    box = BlackBox(DefendedVictim(int8_victim, _NaNRows()), budget=100)
    with pytest.raises(RuntimeError, match="non-finite"):
        box.query(queries[:16])
    assert box.queries_used == 0


def test_a_defense_that_cannot_go_inside_a_device_program_says_why():
    from divqat.defenses import DEFENSES
    from divqat.defenses.base import Defense
    from divqat.errors import ConfigError
    from divqat.pipelines.export import device_defense

    unfusable = [n for n in DEFENSES.names() if not DEFENSES.get(n).fusable]
    assert {"mad", "random-noise", "adaptive-misinformation"} <= set(unfusable)
    for name in unfusable:
        reason = DEFENSES.get(name).not_fusable_because
        assert reason != Defense.not_fusable_because  # each says its own why
        with pytest.raises(ConfigError, match=f"defense '{name}' cannot go inside a device program: "):
            device_defense(name)
