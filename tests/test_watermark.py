"""DAWN's watermark at the black box: deterministic per key and image whatever path the image took,
a wrong label that becomes the answer's argmax, applied after every defense, no more than its
rate of answers changed, and a bounded log that saves and loads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binom
from torch import nn

from divqat.blackbox import BlackBox
from divqat.defenses import DEFENSES, create_defense
from divqat.detectors import Monitor
from divqat.detectors.base import Detector
from divqat.errors import ArtifactError, ConfigError
from divqat.ownership import KeyMarks, Watermark, load_marks, save_marks
from divqat.ownership.watermark import mark_rows, pixels_of

SHAPE = (1, 4, 4)
K = 5


class Victim(nn.Module):
    input_shape = SHAPE
    num_classes = K

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, K))

    def forward(self, x):
        return 3 * self.net(x)


def net(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, K)).eval()


def defense(name: str):
    params = {"mad": {"surrogate": net(1)}, "adaptive-misinformation": {"misinformation_model": net(2)},
              "random-noise": {"seed": 0}}.get(name, {})
    return create_defense(name, **params)


def uint8_images(n: int, seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def floats(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def test_the_same_image_gets_the_same_mark_whatever_path_it_took():
    wm = Watermark(K, b"k" * 32, rate=0.3)
    raw = uint8_images(200)
    reference = torch.randint(0, K, (200,), generator=torch.Generator().manual_seed(1))
    first = wm.choose(floats(raw), reference)
    assert first.marked.any() and not first.marked.all()
    # As uint8, as float32 off by float rounding, as float64, and through a PNG file (the service).
    png = []
    for image in raw:
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
        png.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())))))
    for again in (raw, floats(raw) + 1e-4, floats(raw).double(), floats(torch.stack(png)[:, None])):
        choice = wm.choose(again, reference)
        assert (choice.marked == first.marked).all() and (choice.labels == first.labels).all()
    # Asking twice: the same answers, so a repeat reveals nothing.
    answers = torch.softmax(torch.randn(200, K), dim=1)
    assert torch.equal(wm.apply(answers, floats(raw), reference), wm.apply(answers, floats(raw), reference))
    # The hash covers the shape: the same bytes as another shape are another image.
    other = wm.choose(floats(raw).reshape(200, 1, 2, 8), reference)
    assert (other.marked != first.marked).any()


def test_keys_mark_different_images():
    images = floats(uint8_images(2000, seed=3))
    reference = torch.zeros(2000, dtype=torch.long)
    a = Watermark(K, b"a" * 32, rate=0.1).choose(images, reference).marked
    b = Watermark(K, b"b" * 32, rate=0.1).choose(images, reference).marked
    assert 120 < a.sum() < 280 and 120 < b.sum() < 280
    # Independent keys: the overlap is about rate^2 (20 of 2000), far below either set.
    assert (a & b).sum() < 45
    # from_seed: the same seed and key give the same secret, another key another.
    same = Watermark.from_seed(K, 7, 0.1, key="t").choose(images, reference).marked
    assert (same == Watermark.from_seed(K, 7, 0.1, key="t").choose(images, reference).marked).all()
    assert (same != Watermark.from_seed(K, 7, 0.1, key="u").choose(images, reference).marked).any()


def test_the_mark_is_a_wrong_label_made_the_argmax_of_the_same_values():
    wm = Watermark(K, b"k" * 32, rate=0.5)
    images = floats(uint8_images(500, seed=4))
    answers = torch.softmax(3 * torch.randn(500, K, generator=torch.Generator().manual_seed(0)), dim=1)
    clean = answers.argmax(dim=1)
    out = wm.apply(answers, images, clean)
    choice = wm.choose(images, clean)
    marked = torch.from_numpy(choice.marked)
    labels = torch.from_numpy(choice.labels)
    assert (labels != clean).all()  # never the victim's own label, marked or would-be
    assert set(labels.tolist()) == set(range(K))  # every wrong label is used
    assert torch.equal(out.argmax(dim=1)[marked], labels[marked])
    assert torch.equal(out[~marked], answers[~marked])
    # A permutation of each row: the same values, still a distribution.
    assert torch.equal(out.sort(dim=1).values, answers.sort(dim=1).values)


def test_ties_at_the_top_are_broken_towards_the_mark_label():
    rows = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0],
                         [0.4, 0.4, 0.2, 0.0]])
    labels = torch.tensor([2, 3, 0, 1])
    out = mark_rows(rows, torch.arange(4), labels)
    assert torch.equal(out.argmax(dim=1), labels)
    for i in (0, 2, 3):  # a permutation was possible
        assert torch.equal(out[i].sort().values, rows[i].sort().values)
    assert out[1, 3] > 0.25 and out[1, 3] - 0.25 < 1e-7  # four ties at 0.25: raised by one ulp


@pytest.mark.parametrize("name", DEFENSES.names())
def test_marks_are_applied_after_every_defense(name):
    images = floats(uint8_images(300, seed=5))
    wm = Watermark(K, b"k" * 32, rate=0.2)
    plain = BlackBox(Victim().eval(), defense(name))
    marked_box = BlackBox(Victim().eval(), defense(name), watermark=wm)
    defended, answers = plain.query(images), marked_box.query(images)
    clean = Victim().eval()(images).argmax(dim=1)
    choice = wm.choose(images, clean)
    marked = torch.from_numpy(choice.marked)
    assert 30 < marked.sum() < 100
    assert torch.equal(answers[~marked], defended[~marked])  # the defense's answer, untouched
    assert torch.equal(answers.argmax(dim=1)[marked], torch.from_numpy(choice.labels)[marked])
    assert torch.equal(answers.sort(dim=1).values, defended.sort(dim=1).values)
    assert wm.log.marked == int(marked.sum()) and wm.log.answered == 300
    # Label-only and top-k answers carry the same mark.
    labels_box = BlackBox(Victim().eval(), defense(name), label_only=True,
                          watermark=Watermark(K, b"k" * 32, rate=0.2))
    assert torch.equal(labels_box.query_labels(images), answers.argmax(dim=1))


def test_top_k_answers_keep_k_entries_and_show_the_mark_first():
    images = floats(uint8_images(300, seed=6))
    wm = Watermark(K, b"k" * 32, rate=0.2)
    answers = BlackBox(Victim().eval(), create_defense("top-k", k=2), watermark=wm).query(images)
    assert ((answers > 0).sum(dim=1) <= 2).all()
    choice = wm.choose(images, Victim().eval()(images).argmax(dim=1))
    assert torch.equal(answers.argmax(dim=1)[torch.from_numpy(choice.marked)],
                       torch.from_numpy(choice.labels[choice.marked]))


def test_no_more_than_the_rate_of_answers_change():
    """4,000 random images at the default rate (0.5 %): the answers changed are within the
    binomial's central 1 - 2e-6 (so this test fails by chance once in 500,000 runs)."""
    n, rate = 4000, 0.005
    images = floats(uint8_images(n, seed=8, shape=(1, 8, 8)))
    victim = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
    box_args = dict(input_shape=(1, 8, 8), num_classes=K)
    plain = BlackBox(victim, **box_args).query(images)
    wm = Watermark(K, rate=rate)
    answers = BlackBox(victim, **box_args, watermark=wm).query(images)
    changed = int((answers != plain).any(dim=1).sum())
    low, high = binom.ppf(1e-6, n, rate), binom.isf(1e-6, n, rate)
    assert low <= changed <= high, (changed, low, high)
    assert changed == wm.log.marked  # every mark changes its answer: the label is always wrong


class Recorder(Detector):
    """A detector that keeps the answers it was shown and never tests."""

    name = "recorder"
    threshold = None

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def _observe(self, images, labels, answers):
        self.seen.append(answers.clone())
        return []

    def _reset(self):
        self.seen = []

    def _state(self):
        return {}

    def _load_state(self, state):
        pass


def test_detectors_see_the_defended_answers_before_the_marks():
    images = floats(uint8_images(200, seed=9))
    recorder = Recorder()
    wm = Watermark(K, b"k" * 32, rate=0.3)
    box = BlackBox(Victim().eval(), create_defense("rounding"), monitor=Monitor(recorder), watermark=wm)
    answers = box.query(images)
    defended = BlackBox(Victim().eval(), create_defense("rounding")).query(images)
    assert torch.equal(recorder.seen[0], defended) and not torch.equal(answers, defended)
    assert box.queries_used == 200 and "watermark" not in dir(box)


def same_marks(a: KeyMarks, b: KeyMarks) -> bool:
    return a.header() == b.header() and all(
        np.array_equal(getattr(a, f"{kind}_{part}"), getattr(b, f"{kind}_{part}"))
        for kind in ("mark", "control") for part in ("images", "labels", "times"))


def test_the_log_is_bounded_deduplicated_and_saved(tmp_path):
    wm = Watermark(K, b"k" * 32, rate=0.4, key="thief", max_marks=10)
    raw = uint8_images(200, seed=10)
    answers = torch.softmax(torch.randn(200, K), dim=1)
    wm.apply(answers, floats(raw))
    wm.apply(answers, floats(raw))  # the same images again: counted, not kept twice
    log = wm.log
    assert log.answered == 400 and log.marked > 20 and len(log) == 10 and log.controls == 10
    marks = log.marks()
    assert marks.key == "thief" and marks.input_shape == SHAPE and marks.marks == 10
    choice = wm.choose(floats(raw), answers.argmax(dim=1))
    first = np.flatnonzero(choice.marked)[:10]
    assert np.array_equal(marks.mark_images, raw.numpy()[first])  # the first ones, as uint8
    assert np.array_equal(marks.mark_labels, choice.labels[first])
    assert np.isfinite(marks.mark_times).all()
    controls = np.flatnonzero(choice.control)[:10]
    assert np.array_equal(marks.control_labels, choice.labels[controls])
    path = save_marks(marks, tmp_path / "marks.npz")
    [loaded] = load_marks(tmp_path)
    assert same_marks(loaded, marks) and loaded.source == str(path)
    assert "secret" not in str(np.load(path)["header"])
    with pytest.raises(ArtifactError):
        KeyMarks("x", SHAPE, K, 0.1, marks.mark_images, marks.mark_labels[:3], marks.mark_times,
                 marks.control_images, marks.control_labels, marks.control_times)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="rate"):
        Watermark(K, rate=0.0)
    with pytest.raises(ConfigError, match="rate"):
        Watermark(K, rate=0.6)
    with pytest.raises(ConfigError, match="num_classes"):
        Watermark(1)
    with pytest.raises(ConfigError, match="16 bytes"):
        Watermark(K, b"short")
    with pytest.raises(ConfigError, match="classes"):
        BlackBox(Victim().eval(), watermark=Watermark(K + 1))
    assert "secret" not in repr(Watermark(K, b"k" * 32)) and "kkkk" not in repr(Watermark(K, b"k" * 32))
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(Watermark(K))


def test_pixels_are_the_uint8_the_image_came_from():
    raw = uint8_images(50, seed=11)
    assert np.array_equal(pixels_of(floats(raw)), raw.numpy())
    assert np.array_equal(pixels_of(raw), raw.numpy())
