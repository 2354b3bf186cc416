"""The `thieves` preset (the strongest-thief tables), planned, not run: its stages, which thief runs behind
which defense in which regime, and the default experiment's stages it shares."""

from __future__ import annotations

from collections import Counter, defaultdict

from divqat.experiment import load_preset, plan_stages
from divqat.experiment.config import preset_text

DEFENSES = {"none", "dcp", "reverse-sigmoid", "adaptive-misinformation", "mad", "rounding"}
IN, SAME = "holdout", "fashion-mnist[5-9]:train"


def test_the_thieves_preset_plans_every_defense_against_every_thief_that_applies():
    config = load_preset("thieves")
    stages = plan_stages(config)
    assert config.seeds == (0, 1, 2)
    assert Counter(s.kind for s in stages) == {"fp32": 3, "victim": 12, "defense": 36, "attack": 336,
                                               "timing": 3}
    assert {d.name for d in config.defenses} == DEFENSES
    # Per victim, seed and regime, the thieves behind each defense.
    thieves: dict[tuple, set[tuple[str, bool]]] = defaultdict(set)
    for s in stages:
        if s.kind != "attack":
            continue
        assert 5000 in s.spec["budgets"]  # the tables are at 5,000 queries
        defense = s.label.split(" | ")[2].split()[0]
        victim = s.label.split(" | ")[1]
        thieves[(victim, s.seed, s.spec["transfer"], defense)].add((s.spec["name"], s.spec["labels_only"]))
    victims = {k[0] for k in thieves}
    assert victims == {"qat", "divqat a=2", "divqat-out a=2", "divqat-out-cap1 a=2"}
    blind = {("knockoff", False), ("knockoff", True)}
    for (victim, seed, transfer, defense), got in thieves.items():
        want = blind | {("averaging", False)}
        if defense != "none":  # the recovery thief has nothing to undo behind none
            want |= {("recovery", False)}
        if transfer == SAME:  # 25,000 images left unqueried; none in the 5,000-image holdout
            want |= {("fixmatch", False), ("fixmatch", True)}
        assert got == want, (victim, seed, transfer, defense)
    assert {k[2] for k in thieves} == {IN, SAME}
    # Every defense behind the QAT victim; the DivQAT victims (themselves the defense) behind
    # none and DCP, as in the default experiment.
    assert {k[3] for k in thieves if k[0] == "qat"} == DEFENSES
    assert all(k[3] in {"none", "dcp"} for k in thieves if k[0] != "qat")
    assert len(thieves) == 3 * 2 * (6 + 3 * 2)


def test_the_thieves_preset_shares_the_default_experiments_stages_and_states_its_time():
    default = {s.key: s for s in plan_stages(load_preset("default"))}
    thieves = {s.key for s in plan_stages(load_preset("thieves"))}
    # The same teacher, victims, none and DCP defenses, and blind thieves behind them (every
    # default stage of seeds 0-2 but the foreign-domain thieves and the timing, which serves
    # other defenses; the default runs seeds 3 and 4 too).
    left = [s.label for key, s in default.items() if key not in thieves and s.seed in (0, 1, 2)]
    assert left and all("animal-mnist" in label or label.startswith("timing") for label in left)
    assert len(default.keys() & thieves) == 135
    header = preset_text("thieves").split("\nname:")[0]
    stages = len(plan_stages(load_preset("thieves")))
    assert f"{stages} stages:" in header and "divqat run --preset thieves --plan" in header
    assert f"Of them {len(default.keys() & thieves)} " in header
