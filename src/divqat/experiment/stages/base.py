"""What an experiment's stage kind is: one object per kind that says, in one file, how its stages
are planned, what they read from the stages before them, what work they do, how a finished one
is summed up in a line, which result rows it gives and how long it should take.

The runner, the executors, the estimator and the results code loop over the registered kinds
(``STAGE_KINDS``) and never name one; adding a kind is one file plus its import in
``divqat.experiment.stages`` (the "Extending" page of the docs walks through one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from divqat.experiment.cache import stage_key
from divqat.experiment.labels import victim_name
from divqat.experiment.numerics import Numerics
from divqat.registry import Registry

if TYPE_CHECKING:  # only for annotations: the kinds' modules import these themselves
    from divqat.experiment.config import ExperimentConfig
    from divqat.experiment.sizes import Sizes
    from divqat.pipelines.stages import StageWork


@dataclass(frozen=True)
class Stage:
    """One unit of work. ``spec`` is what the stage itself is told (and hashed into ``key``);
    ``inputs`` are the keys of the stages it reads: the teacher for a victim, the victim for a
    defense, the victim and the defense for an attack, every int8 victim and its defenses for
    a timing stage (``groups``: those inputs per victim)."""

    kind: str
    key: str
    label: str
    spec: dict[str, Any]
    inputs: tuple[str, ...]
    seed: int
    groups: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class StageTask:
    """One stage as a worker needs it: plain data, absolute paths.

    ``folders`` names the input folders the work reads (``teacher``, ``victim``, or for a timing
    stage ``victim:<label>``); ``context`` holds what the work needs of its inputs' settings (the
    defense an attack runs behind; the defenses a timing stage serves); ``tokens`` are the
    inputs' tokens recorded in ``done.json``; ``numerics`` what the stage is computed under
    (``divqat.experiment.numerics``).
    """

    kind: str
    key: str
    label: str
    spec: dict[str, Any]
    tokens: dict[str, str]
    folders: dict[str, str]
    root: str
    context: dict[str, Any] = field(default_factory=dict)
    numerics: Numerics = field(default_factory=Numerics)

    def affinity(self) -> tuple[str, ...]:
        """What a worker that ran this stage holds in memory for the next one."""
        return STAGE_KINDS.get(self.kind).affinity(self)


class PlanScope:
    """What the kinds planned so far for one seed, handed to the next kind's ``plan``.

    ``victim`` is the int8 victim stage whose stages are being planned (None for the kinds
    planned once per seed); ``of(kind)`` the stages of a kind planned for this seed (for the
    victim being planned when the kind is planned per victim). ``seeds``: every seed's scope,
    for the kinds planned after every seed (``StageKind.after_seeds``); empty before.
    """

    def __init__(self, config: ExperimentConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        self.seeds: list[PlanScope] = []
        self.victim: Stage | None = None
        self.with_cap = len(config.divqat.caps) > 1
        self._seed: dict[str, list[Stage]] = {}
        self._victim: dict[tuple[str, str], list[Stage]] = {}

    @property
    def who(self) -> str:
        """The label of the victim being planned ("qat", "divqat a=2")."""
        return victim_name(self.victim.spec, self.with_cap)

    def add(self, kind: StageKind, stages: list[Stage]) -> None:
        if kind.per_victim:
            assert self.victim is not None
            self._victim.setdefault((self.victim.key, kind.name), []).extend(stages)
        else:
            self._seed.setdefault(kind.name, []).extend(stages)

    def of(self, kind: str, victim: Stage | None = None) -> list[Stage]:
        """Stages of ``kind`` planned for this seed, or for ``victim`` (default: the victim being
        planned, for the kinds planned per victim)."""
        victim = victim or self.victim
        if victim is not None and (victim.key, kind) in self._victim:
            return self._victim[(victim.key, kind)]
        return self._seed.get(kind, [])


@dataclass
class RowsContext:
    """What the kinds' ``rows`` read besides their own record: every stage by key, the finished
    records, and what earlier kinds left for later ones (``shared``: the side-by-side timings)."""

    config: ExperimentConfig
    by_key: dict[str, Stage]
    records: dict[str, dict[str, Any]]
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def with_cap(self) -> bool:
        return len(self.config.divqat.caps) > 1

    def result(self, key: str) -> dict[str, Any]:
        return self.records[key]["result"]


class StageKind:
    """One kind of experiment stage (a registered class; one instance serves every stage).

    Class attributes:
        name: the kind's name: ``done.json``'s ``kind`` and the folder under ``OUT/stages/``.
        per_victim: planned once per int8 victim (after the per-seed kinds planned the victims),
            or once per seed.
        after_victims: a per-seed kind planned after every victim's stages (the timing stage).
        after_seeds: a per-seed kind planned after every seed's stages, which may read the
            other seeds' (``PlanScope.seeds``; the verify stage's independent models).
        table: the ``results.json`` table its rows go to (None: no rows); see
            ``divqat.experiment.results.TABLES``.
        rows_first: its rows are collected before the other kinds' (later rows read them).
        order: where it is planned among the kinds of its scope (lower first): a kind that reads
            another kind's stages of the same seed or victim is planned after it.
    """

    name: ClassVar[str] = ""
    per_victim: ClassVar[bool] = False
    after_victims: ClassVar[bool] = False
    after_seeds: ClassVar[bool] = False
    table: ClassVar[str | None] = None
    rows_first: ClassVar[bool] = False
    order: ClassVar[int] = 50

    # -- planning (touches no file)

    def plan(self, scope: PlanScope) -> list[Stage]:
        """This kind's stages for ``scope`` (a seed, or a victim of it), in run order."""
        raise NotImplementedError

    def stage(self, spec: dict[str, Any], label: str, inputs: tuple[str, ...], seed: int,
              groups: tuple[tuple[str, ...], ...] = ()) -> Stage:
        """A stage of this kind, keyed by its spec and its inputs' keys (``stage_key``)."""
        return Stage(self.name, stage_key(self.name, spec, inputs), label, spec, inputs, seed, groups)

    def usable_inputs(self, stage: Stage, ok: Callable[[str], bool]) -> list[str] | None:
        """The inputs a stage reads now (``ok(key)``: that input finished and did not collapse),
        or None when it cannot run. Default: all of them, or None."""
        return list(stage.inputs) if all(ok(k) for k in stage.inputs) else None

    # -- wiring: what a stage is handed of the stages it reads

    def provide(self, source: Stage, folder: str, folders: dict[str, str],
                context: dict[str, Any]) -> None:
        """What a stage of this kind gives a stage that reads it: entries of ``folders`` (its
        folder under a role name) and of ``context`` (its settings). Default: nothing."""

    def wire(self, stage: Stage, sources: list[tuple[Stage, str]]) -> tuple[dict[str, str], dict[str, Any]]:
        """(folders, context) of a stage from its usable inputs (each with its folder): by
        default what each input's kind provides."""
        folders: dict[str, str] = {}
        context: dict[str, Any] = {}
        for source, folder in sources:
            STAGE_KINDS.get(source.kind).provide(source, folder, folders, context)
        return folders, context

    def affinity(self, task: StageTask) -> tuple[str, ...]:
        """What a worker that ran ``task`` holds for the next stage: the victim, and the defense
        it served (a Ray worker is handed the stage that reads what it holds)."""
        victim = task.folders.get("victim")
        if victim is None:
            return ()
        defense = task.context.get("defense")
        return (victim,) if defense is None else (victim, repr(sorted(defense.items())))

    # -- the work, in whatever process runs it

    def perform(self, task: StageTask, work: StageWork, folder: Path) -> dict[str, Any]:
        """Do the stage's work into ``folder``; returns its result (kept in ``done.json``)."""
        raise NotImplementedError

    def summary(self, result: dict[str, Any]) -> str:
        """One line on a finished stage, for the run's log."""
        return ""

    # -- results and estimates

    def rows(self, stage: Stage, ctx: RowsContext) -> list[dict[str, Any]]:
        """The stage's rows of ``table`` (it finished: ``ctx.result(stage.key)``)."""
        return []

    def estimate(self, spec: dict[str, Any], sizes: Sizes) -> tuple[str, float]:
        """(category, units of work) of a stage from its settings, for ``divqat run --plan``:
        stages of one category share a rate in seconds per unit."""
        return self.name, 1.0

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        """The line of the report's "Where the time went" table a finished stage counts in
        (``label``: its label up to the first " | ")."""
        words = label.split(" ", 2)
        return f"{self.name} {words[1]}" if len(words) > 1 else self.name


STAGE_KINDS: Registry[StageKind] = Registry("stage kind")


def register_kind(cls: type[StageKind]) -> type[StageKind]:
    """Class decorator: register one instance of a kind under its ``name``."""
    STAGE_KINDS.register(cls.name)(cls())
    return cls


def kinds_in_order() -> list[StageKind]:
    """Every registered kind, in planning order."""
    return sorted((STAGE_KINDS.get(n) for n in STAGE_KINDS.names()),
                  key=lambda k: (k.after_seeds, k.per_victim, k.after_victims, k.order))


__all__ = ["STAGE_KINDS", "PlanScope", "RowsContext", "Stage", "StageKind", "StageTask",
           "kinds_in_order", "register_kind"]
