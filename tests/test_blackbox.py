"""The black box: every image counted, the budget enforced before the victim sees a query, label-only
means labels only, nothing of the victim reachable or writable through the object."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn

from divqat.blackbox import BlackBox, BudgetExceeded, DefendedBatch, DefendedVictim, QueryError
from divqat.defenses import AdaptiveMisinformation, Defense, TopK, create_defense
from divqat.errors import ConfigError, DivqatError

SHAPE = (1, 4, 4)
K = 5
PUBLIC = {"query", "query_labels", "queries_used", "budget", "queries_left", "input_shape",
          "num_classes", "label_only", "timings"}


class Victim(nn.Module):
    """A tiny victim that records what it is shown."""

    input_shape = SHAPE
    num_classes = K

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, K))
        self.seen = 0
        self.grad_enabled: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen += x.shape[0]
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.net(x)


class Reversed(Defense):
    """Test defense that moves the argmax: reverses the class order."""

    name = "reversed"

    def forward(self, y, logits, images):
        return y.flip(1)


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def victim() -> Victim:
    return Victim().eval()


def test_query_counts_every_image(victim):
    box = BlackBox(victim, None, budget=100)
    out = box.query(images(3))
    assert out.shape == (3, K) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad
    assert torch.allclose(out.sum(dim=1), torch.ones(3), atol=1e-6)
    box.query(images(4))
    labels = box.query_labels(images(2))
    assert labels.dtype == torch.int64 and labels.shape == (2,)
    assert box.queries_used == 9 == victim.seen
    assert box.queries_left == 91 and box.budget == 100
    assert [n for n, _ in box.timings] == [3, 4, 2]
    assert all(seconds >= 0 for _, seconds in box.timings)
    assert victim.grad_enabled == [False, False, False]


def test_query_past_the_budget_is_refused_before_the_victim_sees_it(victim):
    box = BlackBox(victim, budget=10)
    box.query(images(6))
    with pytest.raises(BudgetExceeded, match="6 of 10 used"):
        box.query(images(5))
    with pytest.raises(BudgetExceeded):
        box.query_labels(images(5))
    assert box.queries_used == 6 == victim.seen and box.queries_left == 4
    assert len(box.timings) == 1
    box.query(images(4))  # exactly up to the budget is fine
    assert box.queries_used == 10 and box.queries_left == 0
    with pytest.raises(BudgetExceeded):
        box.query(images(1))
    assert victim.seen == 10
    assert issubclass(BudgetExceeded, DivqatError)


def test_zero_budget_and_unlimited_budget(victim):
    with pytest.raises(BudgetExceeded):
        BlackBox(victim, budget=0).query(images(1))
    box = BlackBox(victim)
    box.query(images(7))
    assert box.budget is None and box.queries_left is None and box.queries_used == 7


def test_empty_query_costs_nothing(victim):
    box = BlackBox(victim, budget=0)
    assert box.query(images(0)).shape == (0, K)
    assert box.queries_used == 0 and victim.seen == 0 and box.timings == []


def test_label_only_gives_only_labels(victim):
    box = BlackBox(victim, label_only=True, budget=10)
    assert box.label_only
    with pytest.raises(QueryError, match="label-only"):
        box.query(images(2))
    assert box.queries_used == 0 and victim.seen == 0
    labels = box.query_labels(images(3))
    assert labels.dtype == torch.int64 and labels.shape == (3,)
    assert box.queries_used == 3


def test_labels_are_the_argmax_of_the_defended_posteriors(victim):
    x = images(8)
    with torch.no_grad():
        clean = torch.softmax(victim(x), dim=1)
    reverse = Reversed()
    assert reverse.params() == {} and repr(reverse) == "Reversed()"
    box = BlackBox(victim, reverse, label_only=True)
    assert torch.equal(box.query_labels(x), clean.flip(1).argmax(dim=1))
    assert torch.equal(BlackBox(victim, TopK(k=1)).query(x).argmax(dim=1), clean.argmax(dim=1))


def test_the_defense_is_applied_and_gets_the_images(victim):
    x = images(4)
    with torch.no_grad():
        clean = torch.softmax(victim(x), dim=1)
    dcp = create_defense("dcp", beta=1.0)
    assert torch.allclose(BlackBox(victim, dcp).query(x), dcp(clean), atol=1e-7)
    seen_by_model = []

    def misinformation(batch: Tensor) -> Tensor:
        seen_by_model.append(batch)
        return torch.zeros(batch.shape[0], K)

    out = BlackBox(victim, AdaptiveMisinformation(misinformation, tau=1.0)).query(x)
    assert torch.equal(seen_by_model[0], x)
    assert torch.allclose(out, torch.full((4, K), 1 / K), atol=1e-6)  # all unsure: y_mis is uniform


def test_attributes_are_read_only(victim):
    box = BlackBox(victim, budget=10)
    box.query(images(2))
    for name, value in (("queries_used", 0), ("budget", 10**9), ("queries_left", 10**9),
                        ("label_only", False), ("input_shape", (1, 1, 1)), ("num_classes", 2),
                        ("timings", []), ("query", None), ("victim", victim),
                        ("_BlackBox__budget", 10**9)):
        with pytest.raises(AttributeError):
            setattr(box, name, value)
    with pytest.raises(AttributeError):
        del box.budget
    box.timings.clear()  # a copy: clearing it changes nothing
    assert box.queries_used == 2 and box.budget == 10 and len(box.timings) == 1
    with pytest.raises(TypeError):
        copy.copy(box)
    with pytest.raises(TypeError):
        copy.deepcopy(box)
    with pytest.raises(TypeError):
        pickle.dumps(box)


def test_public_surface_hides_the_victim_and_the_defense(victim):
    defense = create_defense("dcp")
    box = BlackBox(victim, defense, budget=10)
    assert {name for name in dir(box) if not name.startswith("_")} == PUBLIC
    assert not hasattr(box, "__dict__")
    for name in dir(box):
        if name.startswith("__") and name.endswith("__"):
            continue
        value = getattr(box, name)
        assert value is not victim and value is not defense, name
        assert not isinstance(value, nn.Module | Defense | DefendedVictim), name
    assert "Victim" not in repr(box) and "DCP" not in repr(box)


def one_pixel(value: float) -> Tensor:
    """Valid images but for one pixel of the second image."""
    x = torch.rand(2, *SHAPE)
    x[1, 0, 2, 3] = value
    return x


@pytest.mark.parametrize(("bad", "words"), [
    (torch.rand(2, 3, 4, 4), "shape"),
    (torch.rand(2, 1, 4, 5), "shape"),
    (torch.rand(1, 4, 4), "shape"),
    ((torch.rand(2, *SHAPE) * 255).to(torch.uint8), "float32"),
    (torch.rand(2, *SHAPE, dtype=torch.float64), "float32"),
    (torch.rand(2, *SHAPE) * 2, "[0, 1]"),
    (torch.rand(2, *SHAPE) - 0.5, "[0, 1]"),
    (torch.full((2, *SHAPE), float("nan")), "[0, 1]"),
    (one_pixel(float("nan")), "[0, 1]"),
    (one_pixel(float("inf")), "[0, 1]"),
    (one_pixel(float("-inf")), "[0, 1]"),
    (torch.rand(2, *SHAPE).numpy(), "torch.Tensor"),
])
def test_bad_images_are_refused_and_not_counted(victim, bad, words):
    box = BlackBox(victim, budget=10)
    for ask in (box.query, box.query_labels):
        with pytest.raises(QueryError) as info:
            ask(bad)
        assert words in str(info.value)
    assert box.queries_used == 0 and victim.seen == 0 and box.timings == []


def test_plain_callable_victim_needs_shapes():
    net = Victim()

    def plain(x: Tensor) -> Tensor:
        return net(x)

    box = BlackBox(plain, input_shape=SHAPE, num_classes=K, budget=5)
    assert box.query(images(2)).shape == (2, K)
    assert box.input_shape == SHAPE and box.num_classes == K
    with pytest.raises(ConfigError, match="input_shape"):
        BlackBox(plain, num_classes=K)
    with pytest.raises(ConfigError, match="num_classes"):
        BlackBox(plain, input_shape=SHAPE)
    with pytest.raises(ConfigError, match="contradicts"):
        BlackBox(net, num_classes=K + 1)
    with pytest.raises(ConfigError):
        BlackBox(plain, input_shape=(4, 4), num_classes=K)


@pytest.mark.parametrize("budget", [-1, 1.5, True, "10"])
def test_bad_budget_is_a_config_error(victim, budget):
    with pytest.raises(ConfigError, match="budget"):
        BlackBox(victim, budget=budget)


def test_bad_victim_output_is_not_counted():
    def broken(x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], K + 1)

    box = BlackBox(broken, input_shape=SHAPE, num_classes=K, budget=10)
    with pytest.raises(RuntimeError, match="expected logits"):
        box.query(images(3))
    assert box.queries_used == 0


def test_defended_victim_gives_clean_and_defended_posteriors(victim):
    x = images(6)
    defense = create_defense("reverse-sigmoid", beta=1.0)
    served = DefendedVictim(victim, defense)
    batch = served(x)
    assert isinstance(batch, DefendedBatch)
    with torch.no_grad():
        logits = victim(x)
    assert torch.allclose(batch.logits, logits)
    assert torch.allclose(batch.clean, torch.softmax(logits, dim=1))
    assert torch.allclose(batch.defended, defense(batch.clean))
    assert batch.victim_seconds >= 0 and batch.defense_seconds >= 0
    assert batch.seconds == batch.victim_seconds + batch.defense_seconds
    assert served.defense is defense and served.input_shape == SHAPE and served.num_classes == K

    # An attack gets a BlackBox over the same served victim: same answers, counted.
    box = BlackBox(served, budget=6)
    assert torch.allclose(box.query(x), batch.defended)
    assert box.queries_used == 6
    with pytest.raises(ConfigError):
        BlackBox(served, defense)


def test_a_victim_that_writes_its_input_never_edits_the_callers_images():
    def in_place(x: Tensor) -> Tensor:
        x.mul_(0.5)  # e.g. normalization done in place
        return x.flatten(1)[:, :K]

    x = images(4)
    before = x.clone()
    BlackBox(in_place, input_shape=SHAPE, num_classes=K).query(x)
    assert torch.equal(x, before)


def test_a_victim_that_declares_it_never_writes_its_input_is_spared_the_copy():
    seen: list[Tensor] = []

    class ReadOnly:
        input_shape, num_classes, writes_input = SHAPE, K, False

        def __call__(self, x: Tensor) -> Tensor:
            seen.append(x)
            return x.flatten(1)[:, :K]

    x = images(4)
    BlackBox(ReadOnly()).query(x)
    assert seen[0].data_ptr() == x.data_ptr()
