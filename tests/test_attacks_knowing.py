"""The thieves that know: recovery (D-DAE), fixmatch (semi-supervised), averaging (ModelGuard's
smoothing attacker) and sybil (one attack over several keys), on the hand-made bars victim; the
recovery network on synthetic posteriors; query accounting; the service-wide detector view; and
the drivers that hand them what they need, in process, watched, over HTTP and from the CLI."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
import uvicorn
from conftest import TINY, TINY_CLASSES, BarsVictim, make_bars

from divqat.attacks import (
    KnownDefense,
    SpreadBoundary,
    SurrogateTraining,
    TransferSet,
    create_attack,
)
from divqat.attacks.fixmatch import strong_augment
from divqat.attacks.recovery import fit_recovery, keep_labels, l1, recover
from divqat.blackbox import BlackBox
from divqat.boundary import Blocked, BudgetExceeded
from divqat.defenses import create_defense
from divqat.detectors import Detector, Monitor, ServiceWide, groups_by_creation
from divqat.errors import ConfigError
from divqat.pipelines.thieves import known_defense

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE, K = (1, 16, 16), 4


@pytest.fixture(scope="module")
def transfer() -> TransferSet:
    images, labels = make_bars(400, seed=2)
    return TransferSet("bars", torch.from_numpy(images), torch.from_numpy(labels))


def training(seed: int = 0, epochs: int = 4) -> SurrogateTraining:
    return SurrogateTraining(epochs=epochs, batch_size=16, min_steps=60, progress=False, seed=seed)


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).float().mean())


def synthetic_posteriors(n: int, seed: int, k: int = 10) -> torch.Tensor:
    """Posteriors from confident to nearly uniform: softmax of Gaussian logits at random scales."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 6, dim=1)


# ---------------------------------------------------------------------- the recovery network

def test_recovery_network_undoes_dcp_with_known_parameters():
    dcp = create_defense("dcp", beta=0.5)  # tau = beta = 0.5
    train, test = synthetic_posteriors(2000, 0), synthetic_posteriors(1000, 10)
    net = fit_recovery(dcp(train), train, steps=600, seed=0)
    defended = dcp(test)
    recovered = recover(net, defended)
    # Measured (seeds 0-2): defended L1 0.186-0.197, recovered 0.104-0.109.
    assert l1(recovered, test) < 0.65 * l1(defended, test)
    # DCP leaves confident answers alone; the network leaves them nearly alone too (0.011-0.012).
    confident = test.amax(dim=1) > 0.6
    assert l1(defended[confident], test[confident]) < 1e-6
    assert l1(recovered[confident], test[confident]) < 0.03
    assert torch.allclose(recovered.sum(dim=1), torch.ones(len(recovered)), atol=1e-5)


def test_recovery_network_is_deterministic_and_refuses_mismatched_pairs():
    y = synthetic_posteriors(200, 3)
    a, b = (fit_recovery(y.flip(1), y, steps=20, seed=4) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(),
                                                  strict=True))
    with pytest.raises(ConfigError, match="recovery pairs"):
        fit_recovery(y, y[:, :3])


def test_keep_labels_swaps_back_only_the_rows_that_moved():
    y = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    kept = keep_labels(y, torch.tensor([0, 2]))
    assert torch.equal(kept, torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]]))
    assert torch.equal(y[1], torch.tensor([0.1, 0.6, 0.3]))  # the input is left as it was


# ---------------------------------------------------------------------- each thief steals

def _known(thief, defense: str, params: dict, train: SurrogateTraining, transfer) -> dict:
    return known_defense(thief, defense, params, train, transfer, SHAPE, K)


# (attack, params, least accuracy): measured with budget 192 and seeds 0, 1, 2, soft and
# label-only: recovery, fixmatch and sybil(knockoff) 1.0 every time, averaging 0.875-1.0
# (48 images at 4 views each). Chance is 0.25.
STEAL = [("recovery", {"steps": 300}, 0.8), ("fixmatch", {"mu": 2}, 0.8),
         ("averaging", {"views": 4}, 0.7), ("sybil", {"keys": 3}, 0.8)]


@pytest.mark.parametrize("label_only", [False, True], ids=["soft", "label-only"])
@pytest.mark.parametrize("name,params,least", STEAL, ids=[s[0] for s in STEAL])
def test_each_thief_steals_the_undefended_bars_victim(name, params, least, label_only, bars_test,
                                                      transfer):
    thief = create_attack(name, **params)
    train = training()
    victims = [BarsVictim() for _ in range(thief.streams)]
    boxes = [BlackBox(v, budget=192 // thief.streams, label_only=label_only) for v in victims]
    box = boxes if thief.streams > 1 else boxes[0]
    stolen = thief.steal(box, [192], train, transfer=transfer,
                         **_known(thief, "none", {}, train, transfer))
    assert sum(v.seen for v in victims) == sum(b.queries_used for b in boxes) == 192
    assert stolen[0].queries_used == 192
    assert accuracy(stolen[0].surrogate, *bars_test) >= least
    if name == "recovery":
        assert stolen[0].info["recovery"]["applied"] is False
    if name == "fixmatch":
        assert stolen[0].info["unlabeled_images"] == 400 - 192


def test_recovery_thief_undoes_reverse_sigmoid_it_knows(bars_test, transfer):
    """Reverse sigmoid moves every answer (the bars victim is sure: about 0.42 of L1 per answer);
    the thief who knows it learns to move them back."""
    thief = create_attack("recovery", steps=300)
    train = training()
    box = BlackBox(BarsVictim(), create_defense("reverse-sigmoid", beta=0.5), budget=192)
    stolen = thief.steal(box, [192], train, transfer=transfer,
                         **_known(thief, "reverse-sigmoid", {"beta": 0.5}, train, transfer))
    for s in stolen:
        r = s.info["recovery"]
        assert r["applied"] and r["pairs"] == 4 * (s.queries_used - s.queries_used // 10)
        assert r["labels_kept"] and r["labels_changed"] == 0  # reverse sigmoid keeps labels
        assert r["l1_recovered"] < 0.5 * r["l1_perturbed"]  # measured 0.009-0.022 vs 0.076-0.127
        assert r["answers_moved_l1"] > 0.1
        assert s.info["defense_known"] == {"name": "reverse-sigmoid", "params": {"beta": 0.5}}
    assert accuracy(stolen[-1].surrogate, *bars_test) >= 0.8


def test_recovery_thief_on_label_answers_trains_on_the_labels(transfer):
    thief = create_attack("recovery", defense="top-k", defense_params="k=1")
    train = training(epochs=1)
    box = BlackBox(BarsVictim(), create_defense("top-k", k=1), budget=40)
    called = []
    known = KnownDefense("top-k", {"k": 1}, lambda images, labels: called.append(1))
    stolen = thief.steal(box, [40], train, transfer=transfer, known=known)
    assert stolen[0].info["recovery"]["applied"] is False
    assert "only labels" in stolen[0].info["recovery"]["why"] and not called
    with pytest.raises(ConfigError, match="KnownDefense"):
        thief.steal(BlackBox(BarsVictim(), budget=40), [40], train, transfer=transfer)
    with pytest.raises(ConfigError, match="assumes 'top-k'"):
        thief.steal(BlackBox(BarsVictim(), budget=40), [40], train, transfer=transfer,
                    known=KnownDefense("dcp", {}, lambda i, y: None))


def test_known_defense_is_the_served_one_unless_named_and_the_thiefs_own_seed(transfer):
    train = training()
    served = known_defense(create_attack("recovery"), "dcp", {"beta": 0.3}, train, transfer, SHAPE, K)
    assert (served["known"].name, served["known"].params) == ("dcp", {"beta": 0.3})
    named = known_defense(create_attack("recovery", defense="random-noise",
                                        defense_params={"eps": 0.2, "seed": 5}),
                          "dcp", {}, train, transfer, SHAPE, K)["known"]
    assert named.name == "random-noise" and named.params == {"eps": 0.2, "seed": 7919}
    # The simulated defense is the defense: a formula of the posteriors.
    y = synthetic_posteriors(8, 1, k=K)
    images = torch.zeros(8, *SHAPE, dtype=torch.uint8)
    perturb = served["known"].simulator(images, y.argmax(dim=1))
    assert torch.allclose(perturb(y, images.float()), create_defense("dcp", beta=0.3)(y))
    assert known_defense(create_attack("knockoff"), "dcp", {}, train, transfer, SHAPE, K) == {}
    with pytest.raises(ConfigError, match="does not publish"):
        known_defense(create_attack("recovery"), None, None, train, transfer, SHAPE, K)
    with pytest.raises(ConfigError, match="recovery.defense: unknown defense"):
        known_defense(create_attack("recovery", defense="nope"), None, None, train, transfer, SHAPE, K)
    with pytest.raises(ConfigError, match="name the defense"):
        create_attack("recovery", defense_params={"beta": 0.5})


def test_recovery_simulates_a_model_backed_defense_with_the_thiefs_own_model(transfer):
    train = SurrogateTraining(epochs=1, batch_size=16, progress=False)
    known = known_defense(create_attack("recovery"), "adaptive-misinformation", {"tau": 0.9},
                          train, transfer, SHAPE, K)["known"]
    images = transfer.images[:32]
    perturb = known.simulator(images, transfer.labels[:32] % K)
    y = synthetic_posteriors(32, 2, k=K)
    out = perturb(y, images.float() / 255)
    unsure = y.amax(dim=1) < 0.85  # the gate opens below tau: the thief's misinformation there
    assert out.shape == y.shape and torch.allclose(out.sum(dim=1), torch.ones(32), atol=1e-5)
    assert l1(out[unsure], y[unsure]) > 0.05 and l1(out[~unsure], y[~unsure]) < 1e-3


# ---------------------------------------------------------------------- fixmatch

def test_fixmatch_uses_the_unqueried_images_and_the_threshold(bars_victim, transfer):
    stolen = create_attack("fixmatch", mu=1, unlabeled=50).steal(
        BlackBox(bars_victim, budget=100), [40, 100], training(epochs=1), transfer=transfer)
    assert [s.info["unlabeled_images"] for s in stolen] == [50, 50]
    assert bars_victim.seen == 100
    strict = create_attack("fixmatch", threshold=1.0, mu=1).steal(
        BlackBox(BarsVictim(), budget=40), [40], training(epochs=1), transfer=transfer)
    assert strict[0].info["unlabeled_images"] == 360 and strict[0].info["mask"] == 0.0
    with pytest.raises(ConfigError, match="threshold"):
        create_attack("fixmatch", threshold=0)


def test_strong_augmentation_stays_an_image_and_changes_it():
    x = torch.rand(64, 3, 16, 16)
    out = strong_augment(x, torch.Generator().manual_seed(0))
    again = strong_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    assert out.min() >= 0 and out.max() <= 1
    assert ((out - x).abs().amax(dim=(1, 2, 3)) > 0.1).all()  # Cutout alone moves every image


# ---------------------------------------------------------------------- averaging

@pytest.mark.parametrize("label_only", [False, True], ids=["soft", "label-only"])
def test_averaging_counts_every_view_and_spends_at_most_the_budget(bars_victim, transfer, label_only):
    box = BlackBox(bars_victim, budget=130, label_only=label_only)
    stolen = create_attack("averaging", views=4, batch_size=30).steal(
        box, [130, 50], training(epochs=1), transfer=transfer)
    # 130 // 4 = 32 images, each queried 4 times: 128 counted, 2 unspent, never over.
    assert bars_victim.seen == box.queries_used == 128
    assert [(s.budget, s.queries_used, s.info["images"], s.info["unspent"]) for s in stolen] == [
        (50, 48, 12, 2), (130, 128, 32, 2)]
    with pytest.raises(ConfigError, match="buys no image"):
        create_attack("averaging", views=8).steal(BlackBox(BarsVictim(), budget=5), [5],
                                                  training(epochs=1), transfer=transfer)


def test_averaging_takes_back_the_labels_fresh_noise_flips(transfer):
    """Random noise toward a random wrong class (vertex, eps 1.2: 0.4 y + 0.6 e_j) flips every
    single answer's label; the mean of 8 answers to the same image puts about 0.2 on each wrong
    class and 0.4 on the right one: averaging removes the noise's variance (not its bias)."""
    victim = BarsVictim()
    images = transfer.images[:64]
    clean = torch.softmax(victim(images.float() / 255), dim=1).argmax(dim=1)
    noisy = BlackBox(victim, create_defense("random-noise", eps=1.2, target="vertex", seed=0))
    single = noisy.query(images.float() / 255).argmax(dim=1)
    thief = create_attack("averaging", views=8, augment="repeat")
    averaged = thief._ask(noisy, images, torch.Generator(), hflip=False).argmax(dim=1)
    assert (single == clean).float().mean() == 0
    assert (averaged == clean).float().mean() > 0.8  # P(a wrong class gets 6 of 8) = 2 % each
    labels = create_attack("averaging", views=4, augment="noise", sigma=0.5)._ask(
        BlackBox(victim, label_only=True), images, torch.Generator(), hflip=False)
    assert torch.allclose(labels.sum(dim=1), torch.ones(64)) and ((labels * 4) % 1 == 0).all()


# ---------------------------------------------------------------------- sybil

def test_sybil_keys_each_stay_within_their_budget(transfer):
    victims = [BarsVictim() for _ in range(3)]
    boxes = [BlackBox(v, budget=44) for v in victims]  # ceil(130 / 3)
    thief = create_attack("sybil", keys=3, attack_params="batch_size=32")
    stolen = thief.steal(boxes, [130], training(epochs=1), transfer=transfer)
    assert [b.queries_used for b in boxes] == [v.seen for v in victims]
    assert all(b.queries_used <= 44 for b in boxes) and sum(b.queries_used for b in boxes) == 130
    assert stolen[0].info["sybil"]["used"] == [b.queries_used for b in boxes]
    assert stolen[0].info["sybil"]["attack_params"] == {"batch_size": 32, "mix": 0.0}
    assert thief.params() == {"attack": "knockoff", "keys": 3, "schedule": "round-robin",
                              "attack_params": {"batch_size": 32}}
    with pytest.raises(ConfigError, match="holds 3 keys"):
        thief.steal(boxes[:2], [10], training(epochs=1), transfer=transfer)
    with pytest.raises(ConfigError, match="another attack"):
        create_attack("sybil", attack="sybil")
    with pytest.raises(ConfigError, match="sybil.attack: unknown attack"):
        create_attack("sybil", attack="nope")


@pytest.mark.parametrize("schedule,used", [("round-robin", [30, 30, 20]), ("split", [27, 27, 26]),
                                           ("sequential", [40, 40, 0])])
def test_spread_schedules(schedule, used):
    boxes = [BlackBox(BarsVictim(), budget=40) for _ in range(3)]
    spread = SpreadBoundary(boxes, schedule)
    x = torch.rand(80, *SHAPE)
    answers = torch.cat([spread.query(x[i:i + 10]) for i in range(0, 80, 10)])
    assert torch.allclose(answers, BlackBox(BarsVictim()).query(x))  # in the images' order
    assert spread.used == used and spread.queries_used == 80 and spread.queries_left == 40
    with pytest.raises(BudgetExceeded, match="3 keys have 40 images left"):
        spread.query(torch.rand(41, *SHAPE))
    assert spread.queries_used == 80


class CountingDetector(Detector):
    """Raises its alarm once its stream holds ``at`` queries (tests every batch)."""

    name = "counting"

    def __init__(self, threshold: float = 10) -> None:
        super().__init__()
        self.threshold = threshold

    def _observe(self, images, labels, answers):
        return [(self.queries + len(images), float(self.queries + len(images)))]

    def _reset(self) -> None:
        pass

    def _state(self):
        return {}

    def _load_state(self, state) -> None:
        pass


def test_a_blocked_key_is_dropped_and_its_share_goes_to_the_others():
    blocking = Monitor(CountingDetector(threshold=15), on_alarm="block")
    boxes = [BlackBox(BarsVictim(), budget=50, monitor=blocking), BlackBox(BarsVictim(), budget=50)]
    spread = SpreadBoundary(boxes, "split")
    for _ in range(4):
        spread.query(torch.rand(10, *SHAPE))
    # Key 1 took 5 + 5 + 5 + 5 = 20 and was blocked after 20 (> 15); the rest went to key 2.
    assert spread.blocked == [] and spread.used == [20, 20]
    spread.query(torch.rand(10, *SHAPE))
    assert spread.blocked == [0] and spread.used == [20, 30]
    assert spread.queries_left == 20
    spread.query(torch.rand(20, *SHAPE))
    with pytest.raises(Blocked):
        SpreadBoundary([boxes[0]]).query(torch.rand(1, *SHAPE))


def test_a_call_cut_short_by_a_blocked_key_says_what_was_counted():
    blocked = BlackBox(BarsVictim(), budget=50, monitor=Monitor(CountingDetector(threshold=15), on_alarm="block"))
    blocked.query(torch.rand(20, *SHAPE))  # its alarm is raised: the next query is refused
    first = BlackBox(BarsVictim(), budget=30)
    spread = SpreadBoundary([first, blocked], "sequential")
    # 30 images go to the first key and are answered; the blocked key refuses the other 10 and
    # nobody is left to take them: the message must not say "nothing counted".
    with pytest.raises(BudgetExceeded, match="30 of this call's 40 images were answered and counted") as e:
        spread.query(torch.rand(40, *SHAPE))
    assert "nothing counted" not in str(e.value) and first.queries_used == 30


# ---------------------------------------------------------------------- the service-wide view

def test_service_wide_view_sees_what_no_key_shows():
    view = ServiceWide(lambda: CountingDetector(threshold=100))
    for _ in range(4):  # 4 keys x 40 queries, interleaved in batches of 10
        for key in ("a", "b", "c", "d"):
            view.observe(key, torch.rand(10, *SHAPE), torch.rand(10, K))
    record = view.record()
    assert record["keys_flagged_alone"] == 0 and record["keys_flagged"] == 4
    assert record["groups"]["all"]["first_alarm"] == 110 and record["groups"]["all"]["queries"] == 160
    # The union raised it at its 110th query: a, b, c had sent 30 each then, d 20.
    assert {k: r["union_alarm_at"] for k, r in record["keys"].items()} == {"a": 30, "b": 30, "c": 30,
                                                                           "d": 20}
    assert view.verdict("d").first_alarm == 20 and view.key_verdict("d").first_alarm is None
    # A key's own alarm, counted in the union's queries too: with a threshold of 25 each key
    # raises it at its own 30th query, in round 3; key a's batch then is the union's 81st-90th.
    early = ServiceWide(lambda: CountingDetector(threshold=25))
    for _ in range(4):
        for key in ("a", "b", "c", "d"):
            early.observe(key, torch.rand(10, *SHAPE), torch.rand(10, K))
    keys = early.record()["keys"]
    assert keys["a"]["first_alarm"] == 30 and keys["a"]["first_alarm_in_union"] == 90
    assert keys["d"]["first_alarm_in_union"] == 120
    quiet = ServiceWide(lambda: CountingDetector(threshold=100), union_flags_keys=False)
    quiet.observe("a", torch.rand(200, *SHAPE), torch.rand(200, K))
    assert quiet.verdict("a").first_alarm == 200  # its own detector's
    assert quiet.union_verdict().first_alarm == 200


def test_service_wide_view_blocks_every_key_of_an_alarmed_group():
    groups = groups_by_creation({"t1": 0.0, "t2": 5.0, "t3": 9.0, "honest": 500.0}, window=10)
    assert groups == {"t1": "t1", "t2": "t1", "t3": "t1", "honest": "honest"}
    view = ServiceWide(lambda: CountingDetector(threshold=50), groups)
    boxes = {k: BlackBox(BarsVictim(), monitor=Monitor(view.stream(k), on_alarm="block"))
             for k in groups}
    for _ in range(2):
        for key in ("t1", "t2", "t3", "honest"):
            boxes[key].query(torch.rand(10, *SHAPE))
    # The thieves' group: 60 queries, alarm; the honest key (20 queries) is its own group.
    for key in ("t1", "t2", "t3"):
        with pytest.raises(Blocked):
            boxes[key].query(torch.rand(1, *SHAPE))
    boxes["honest"].query(torch.rand(1, *SHAPE))
    assert view.union_verdict("t1").first_alarm == 60 and view.union_verdict("honest").first_alarm is None


# ---------------------------------------------------------------------- the drivers

def test_attack_victim_hands_the_recovery_thief_the_served_defense(tiny_victims, tmp_path):
    from divqat.pipelines.attack import AttackRequest, attack_victim

    train = SurrogateTraining(epochs=2, batch_size=32, progress=False)
    m = attack_victim(AttackRequest(tiny_victims["qat"], "recovery", [120], {"steps": 100},
                                    defense="reverse-sigmoid", defense_params={"beta": 0.5},
                                    transfer="tiny-bars:train", training=train, out=tmp_path))
    info = m["results"][0]["info"]
    assert info["defense_known"] == {"name": "reverse-sigmoid", "params": {"beta": 0.5}}
    assert info["recovery"]["applied"] and m["queries_used"] == 120
    assert m["adversary_accuracy"] > 0.4  # 4 classes


def test_attack_victim_spreads_a_sybil_thief_over_its_keys(tiny_victims):
    from divqat.pipelines.attack import AttackRequest, attack_victim

    train = SurrogateTraining(epochs=2, batch_size=32, progress=False)
    m = attack_victim(AttackRequest(tiny_victims["qat"], "sybil", [100], {"keys": 3},
                                    transfer="tiny-bars:train", training=train))
    assert m["streams"] == [{"budget": 34, "queries_used": 34}, {"budget": 34, "queries_used": 34},
                            {"budget": 34, "queries_used": 32}]
    assert m["queries_used"] == 100 and m["results"][0]["info"]["sybil"]["keys"] == 3


def test_detect_compares_per_key_and_service_wide_alarms(tiny_victims):
    from divqat.pipelines.detect import DetectRequest, detect_attack

    m = detect_attack(DetectRequest(tiny_victims["qat"], {"prada": {"min_distances": 10, "check_every": 10}}, "sybil", 96,
                                    {"keys": 4, "schedule": "split", "attack_params": "batch_size=16"},
                                    transfer="tiny-bars:train", benign_streams=0,
                                    training=SurrogateTraining(epochs=1, progress=False)))
    assert [k["queries_used"] for k in m["keys"]] == [24] * 4 and m["queries_used"] == 96
    row = m["detectors"]["prada"]
    assert row["keys"] == 4 and set(row["per_key"]) == {"key1", "key2", "key3", "key4"}
    assert all(k["queries"] == 24 for k in row["per_key"].values())
    assert row["service_wide"]["queries"] == 96
    assert row["keys_flagged_alone"] == sum(k["first_alarm"] is not None for k in row["per_key"].values())
    # What a budget is compared with: a key's alarm in the thief's queries of all 4 keys.
    if row["first_alarm"] is not None:
        assert row["first_alarm_thief"] >= row["first_alarm"]


def test_an_experiment_stage_watches_a_sybil_thief_per_key_and_service_wide(tiny_victims, tmp_path):
    from divqat.pipelines.stages import AttackStageRequest, DefenseSetting, StageWork

    stage = AttackStageRequest(name="sybil", budgets=[60], params={"keys": 2}, transfer="tiny-bars:train",
                               surrogate={"epochs": 1, "batch_size": 32},
                               detectors={"prada": (tmp_path / "calibration",
                                                    {"min_distances": 10, "check_every": 10})})
    record = StageWork().attack(tmp_path / "stage", tiny_victims["qat"], DefenseSetting("none"), stage)
    row = record["detectors"]["prada"]
    assert row["keys"] == 2 and row["service_wide"]["queries"] == 60
    assert [k["queries"] for k in row["per_key"].values()] == [30, 30]
    assert json.loads((tmp_path / "stage" / "metrics.json").read_text())["detectors"] == record["detectors"]


class _Server:
    """uvicorn serving an app in a thread of this process, on a free loopback port."""

    def __init__(self, app) -> None:
        from divqat.serve.server import bind

        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, args=([sock],), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_sybil_and_recovery_thieves_over_http(tmp_path, capsys):
    from divqat.blackbox import DefendedVictim
    from divqat.cli import main
    from divqat.serve.app import create_app
    from divqat.serve.store import KeyStore

    db = tmp_path / "keys.db"
    defended = DefendedVictim(BarsVictim(), create_defense("reverse-sigmoid", beta=0.5))
    server = _Server(create_app(defended, db, classes=TINY_CLASSES, dataset=TINY))
    store = KeyStore(db)
    files = []
    for i in range(3):
        files.append(tmp_path / f"k{i}.key")
        files[-1].write_text(store.create_key(f"k{i}", 40)[1] + "\n")
    base = ["attack", "--victim", server.url, "--transfer", TINY, "--epochs", "2", "--batch-size", "32",
            "--threads", "1", "--no-progress"]
    try:
        code = main([*base, "--attack", "sybil", "--attack-param", "keys=3", "--budget", "120",
                     "--api-key-file", *map(str, files), "--out", str(tmp_path / "sybil")])
        assert code == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "key 3: 40 images counted by the service, 0 left" in out
        m = json.loads((tmp_path / "sybil" / "metrics.json").read_text())
        assert [k["queries_used"] for k in m["streams"]] == [40, 40, 40] and m["queries_used"] == 120
        assert [store.key(f"k{i}").used for i in range(3)] == [40, 40, 40]
        # Two keys for a three-key thief, and a recovery thief that does not name the defense.
        assert main([*base, "--attack", "sybil", "--attack-param", "keys=3", "--budget", "10",
                     "--api-key-file", *map(str, files[:2]), "--out", str(tmp_path / "x")]) == 2
        assert "holds 3 key(s); 2 were given" in capsys.readouterr().err
        (tmp_path / "r.key").write_text(store.create_key("r", 60)[1] + "\n")
        recovery = [*base, "--attack", "recovery", "--budget", "60", "--api-key-file",
                    str(tmp_path / "r.key"), "--out", str(tmp_path / "rec")]
        (tmp_path / "e.key").write_text(store.create_key("e", 10**6)[1] + "\n")
        assert main([*recovery, "--eval-key-file", str(tmp_path / "e.key")]) == 2
        assert "does not publish" in capsys.readouterr().err
        assert store.key("e").used == 0 and store.key("r").used == 0  # refused before any query
        assert main([*recovery, "--attack-param", "defense=reverse-sigmoid", "--attack-param",
                     "defense_params=beta=0.5", "--attack-param", "steps=100"]) == 0
        m = json.loads((tmp_path / "rec" / "metrics.json").read_text())
        assert m["results"][0]["info"]["recovery"]["applied"] and store.key("r").used == 60
    finally:
        server.stop()
        store.close()


def test_new_thieves_from_the_cli_in_process(tiny_victims, tmp_path, capsys):
    from divqat.cli import main

    base = ["attack", "--victim", str(tiny_victims["qat"]), "--transfer", "tiny-bars:train",
            "--epochs", "1", "--no-progress"]
    assert main([*base, "--attack", "averaging", "--attack-param", "views=3", "--budget", "100",
                 "--out", str(tmp_path / "avg")]) == 0
    m = json.loads((tmp_path / "avg" / "metrics.json").read_text())
    assert m["queries_used"] == 99 and m["results"][0]["info"]["images"] == 33
    assert main([*base, "--attack", "sybil", "--attack-param", "keys=2", "--attack-param",
                 "attack=fixmatch", "--attack-param", "attack_params=mu=1", "--budget", "60",
                 "--out", str(tmp_path / "sy")]) == 0
    assert "key 2: 30 of 30 queries" in capsys.readouterr().out
    assert main([*base, "--attack", "recovery", "--attack-param", "defense_params=beta=1",
                 "--budget", "10", "--out", str(tmp_path / "x")]) == 2
    assert "name the defense" in capsys.readouterr().err
