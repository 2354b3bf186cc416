"""`divqat run` (an experiment, from nothing to the tables, cached stage by stage) and
`divqat report` (its report again, from its results)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from divqat.cli._common import described, out_option, positive_int, runtime_options, set_threads

RUN_HELP = """\
Run an experiment from nothing to the paper's tables: fp32 teacher -> int8 victims (qat, and
divqat per alpha) -> defense metrics -> extraction attacks (per victim x defense x attack x
transfer set x label-only flag x seed, one surrogate per budget) -> results and report.

Every stage is cached in OUT/stages/<kind>/<key>/ under a hash of its settings and inputs: a
second run skips what is done, an interrupted run (Ctrl-C, SIGTERM) resumes where it stopped,
and changing one setting recomputes only what depends on it. A stage that fails is reported
with its error, the stages that need it are skipped, the others finish, and the run exits 1;
running it again runs only what is missing. Writes OUT/results.csv (one row per victim x
defense x attack x budget x seed), OUT/results.json, OUT/report.md (mean ± sd over seeds,
divqat - qat with 95 % confidence intervals paired by seed) and OUT/plots/.

Every stage runs with the config's numerics.threads torch threads (default 1; --threads
overrides it) under either executor, so both give the same numbers, and a cached stage
computed under other numerics is recomputed, with a line saying why. Executors: serial (one
stage at a time in this process) or ray (each stage a Ray task on a worker that reserves
--cpus-per-stage CPUs, started as soon as the stages it reads are done; a local Ray instance on
this machine's cores, or the cluster at --address / RAY_ADDRESS, whose nodes must all see OUT at
the same path). --plan prints the stages, what is
cached and an estimate of the time left, and runs nothing.

Presets (shipped with divqat): smoke (a complete tiny pipeline, about 2 minutes on 2 cores),
default (Fashion-MNIST, 5 seeds: 1 h 17 min on 2 cores with --executor ray, about 38 min on 4),
paper-fmnist (the full Fashion-MNIST grid, 5 seeds: a cluster's work; see --plan),
paper-cifar10 (CIFAR-10/100 from --data-root; hours), thieves (every output perturbation
against the thieves that know, on the default's victims, 3 seeds: about 2 hours on 2 cores
with --executor ray from a copy of the default run, whose stages it shares).
The config format is documented in divqat.experiment.config; start from a preset's YAML
(src/divqat/experiment/presets/).

example:
  divqat run --preset smoke --out runs/smoke
  divqat run --preset default --executor ray                          # 2 stages at a time on 2 cores
  divqat run --preset paper-fmnist --plan --cores 64                  # its size and wall time
  divqat run --preset paper-fmnist --executor ray --address ray://head:10001 --out /shared/runs/p
  divqat run --preset paper-cifar10 --data-root ~/data --device cuda
  divqat run my-experiment.yaml --out runs/mine
  divqat report runs/mine          # rebuild report.md and the plots from results.json
"""


def register(sub) -> None:
    from divqat.experiment.config import preset_names

    r = described(sub, "run", "run (or resume) an experiment from a config or a preset", RUN_HELP,
                  parents=[runtime_options("torch device for training (default: cpu)",
                                          threads_help="torch CPU threads of every stage, under "
                                          "either executor (default: the config's "
                                          "numerics.threads, 1)"),
                           out_option("output folder (default: runs/NAME, NAME from the config)",
                                      required=False)])
    r.add_argument("config", nargs="?", metavar="CONFIG", help="a YAML experiment config")
    r.add_argument("--preset", choices=preset_names(), metavar="NAME",
                   help=f"a shipped config instead of CONFIG: {', '.join(preset_names())}")
    r.add_argument("--executor", choices=("serial", "ray"), default="serial",
                   help="serial: one stage at a time in this process; ray: stages as Ray tasks, as "
                        "many at a time as the CPUs allow (default: serial)")
    r.add_argument("--address", metavar="ADDR",
                   help="ray: join the running Ray cluster at ADDR (default: $RAY_ADDRESS, else a "
                        "local Ray instance on this machine's cores)")
    r.add_argument("--cpus-per-stage", type=positive_int, default=None, metavar="N",
                   help="ray: CPUs each stage worker reserves (default: the stage's torch threads, "
                        "numerics.threads)")
    r.add_argument("--plan", action="store_true",
                   help="print the stages, what is cached and the estimated time left; run nothing")
    r.add_argument("--cores", type=positive_int, default=None, metavar="N",
                   help="--plan: estimate the wall time on N cores (default: this machine's)")
    r.add_argument("--times", action="append", default=[], metavar="DIR",
                   help="--plan: also estimate from the stage times measured in DIR (repeatable)")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="rebuild report.md and the plots of an experiment from its results.json")
    rp.add_argument("dir", metavar="DIR", help="the experiment's output folder (`divqat run --out`)")
    rp.set_defaults(func=cmd_report)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    import signal
    import time

    from divqat.errors import ConfigError
    from divqat.experiment import load_config, load_preset, main_table, run_experiment
    from divqat.experiment.config import preset_names
    from divqat.experiment.executors import make_executor

    if (args.config is None) == (args.preset is None):
        what = "not both" if args.config is not None else f"one of: {', '.join(preset_names())}"
        raise ConfigError(f"give a CONFIG file or --preset NAME ({what})")
    config = load_config(args.config) if args.config else load_preset(args.preset)
    out = args.out or os.path.join("runs", config.name)
    if args.executor == "serial" and args.address:
        raise ConfigError("--address joins a Ray cluster: use it with --executor ray")
    if args.threads:  # the stages' numerics: the same threads under either executor
        config = dataclasses.replace(config, numerics=dataclasses.replace(config.numerics,
                                                                          threads=args.threads))
    if args.plan:
        from divqat.experiment.estimate import plan_lines

        cores = args.cores or (os.cpu_count() or 1)
        for line in plan_lines(config, out, cores=cores, cpus_per_stage=args.cpus_per_stage,
                               executor=args.executor, times_from=args.times,
                               data_root=args.data_root):
            print(line)
        return 0
    executor = make_executor(args.executor, address=args.address, cpus_per_stage=args.cpus_per_stage)
    set_threads(args.threads)
    start = time.perf_counter()
    try:  # SIGTERM stops like Ctrl-C: the running stages are dropped, the finished ones are kept
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        results = run_experiment(config, out, data_root=args.data_root, device=args.device,
                                 progress=not args.no_progress, executor=executor)
    except KeyboardInterrupt:
        print(f"divqat run: stopped; finished stages are kept in {os.path.join(out, 'stages')}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    stages = results["stages"]
    print()
    print(main_table(results))
    print(f"\n{stages['total']} stages ({stages['ran']} run, {stages['cached']} cached, "
          f"{stages['skipped']} skipped, {stages['failed']} failed) in "
          f"{time.perf_counter() - start:.0f} s ({args.executor})")
    print(f"report: {os.path.join(out, 'report.md')} (results.csv, results.json, plots/)")
    if results["failures"]:
        for failure in results["failures"]:
            print(f"divqat run: failed: {failure['stage']}: {failure['error']}", file=sys.stderr)
        print(f"divqat run: {stages['failed']} stage(s) failed and {stages['skipped']} were skipped; "
              "run the same command again to run only those", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from divqat.experiment import build_report, load_results

    results = load_results(args.dir)
    path = build_report(results, args.dir)
    print(f"report: {path} (plots in {os.path.join(args.dir, 'plots')})")
    return 0

