"""The divqat command: parses, calls the library, prints. Errors a user can cause print one line."""

from __future__ import annotations

import argparse
import os
import sys

from divqat.errors import DivqatError
from divqat.registry import params_text

TRAIN_HELP = """\
Train a victim on a registered dataset and save it as a loadable artifact.

  fp32    train from scratch (SGD nesterov, one-cycle, augmentation).
  qat     fine-tune an fp32 victim (--teacher) with fake quantization (torchao PT2E,
          X86 inductor quantizer), then convert to a real int8 program.
  divqat  as qat, with the loss CE(p_q, y) - alpha * D(p_teacher, p_q).

Writes OUT/victim.pt2, OUT/victim.json and OUT/metrics.json (test_accuracy, int8_test_accuracy,
kl_to_teacher, l1_to_teacher, train_seconds, per-epoch history).

example:
  divqat train --dataset fashion-mnist --arch resnet8 --mode fp32 --epochs 15 --out runs/fp32
  divqat train --dataset fashion-mnist --arch resnet8 --mode divqat --teacher runs/fp32 \\
      --epochs 1 --out runs/divqat          # kl, alpha 2, cap 0.15 (the measured default)
  divqat train ... --mode divqat --divergence kl --alpha 0.5 ...  # the paper's plain KL, no cap
"""


DEFEND_HELP = """\
Evaluate an output-perturbation defense on a victim: defender accuracy on the victim's test split,
mean L1 and KL(clean || defended) between clean and defended posteriors over a query set, the
fraction of queries whose argmax the defense changed, and milliseconds per query with and
without the defense. Writes OUT/metrics.json.

adaptive-misinformation trains a misinformation model on the victim's training images on first
use (VICTIM/misinformation/, reused afterwards); mad uses a random surrogate of the victim's
architecture. `divqat defenses` lists the defenses and their parameters.

example:
  divqat defend --victim runs/qat --defense dcp --param beta=0.5 --param gamma=0.2 --out runs/qat-dcp
  divqat defend --victim runs/qat --defense top-k --param k=1 --queries mnist:test --limit 2000 \\
      --out runs/qat-top1-mnist
"""


ATTACK_HELP = """\
Steal a victim: run a model extraction attack through the black box (the victim behind a
defense, with a query budget) and measure the surrogate on the victim's test split: adversary
accuracy and error, agreement with the defended victim's argmax (and with the clean one), queries
used; plus the defense's defender accuracy and L1/KL over the thief's queries. One fresh surrogate
per budget; the queries are collected once for the largest budget and reused.
Writes OUT/metrics.json (the largest budget's figures at the top, every budget under "results").

Transfer sets (--transfer): "holdout" = the training images the victim was trained without
(`divqat train --holdout N`; unseen, in-distribution), or NAME[:SPLIT] of any dataset (split
default: train), adapted to the victim's input. dfme and maze are data-free and take none.
`divqat attacks` lists the attacks and their parameters.

example:
  divqat attack --victim runs/qat --attack knockoff --defense dcp --param beta=0.5 \\
      --transfer mnist --budget 5000 --surrogate resnet8 --epochs 30 --out runs/steal-dcp
  divqat attack --victim runs/qat --attack knockoff --transfer holdout --budget 500 2000 10000 \\
      --labels-only --out runs/steal-labels
"""


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

Executors: serial (one stage at a time in this process, --threads threads) or ray (each stage a
Ray task with --cpus-per-stage CPUs and as many torch threads, started as soon as the stages it
reads are done; a local Ray instance on this machine's cores, or the cluster at --address /
RAY_ADDRESS, whose nodes must all see OUT at the same path). --plan prints the stages, what is
cached and an estimate of the time left, and runs nothing.

Presets (shipped with divqat): smoke (a complete tiny pipeline, about 2 minutes on 2 cores),
default (Fashion-MNIST, 3 seeds, sized for 45 minutes on 2 cores with --executor ray),
paper-fmnist (the full Fashion-MNIST grid, 5 seeds: a cluster's work; see --plan),
paper-cifar10 (CIFAR-10/100 from --data-root; hours).
The config format is documented in divqat.experiment.config; start from a preset's YAML
(src/divqat/experiment/presets/).

example:
  divqat run --preset smoke --out runs/smoke
  divqat run --preset default --executor ray --cpus-per-stage 1      # 2 stages at a time on 2 cores
  divqat run --preset paper-fmnist --plan --cores 64                  # its size and wall time
  divqat run --preset paper-fmnist --executor ray --address ray://head:10001 --out /shared/runs/p
  divqat run --preset paper-cifar10 --data-root ~/data --device cuda
  divqat run my-experiment.yaml --out runs/mine
  divqat report runs/mine          # rebuild report.md and the plots from results.json
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


DESCRIPTION = ("Protect quantized image classifiers against model stealing (DivQAT, output-perturbation "
               "defenses) and measure it with real extraction attacks.")


def _shared_options(device_help: str = "torch device (default: cpu)") -> argparse.ArgumentParser:
    """The options every command that loads data and runs models takes (a parent parser)."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--data-root", metavar="DIR",
                        help="folder holding the datasets that need one (cifar10, cifar100, svhn, "
                             "gtsrb, image-folder)")
    shared.add_argument("--device", default="cpu", help=device_help)
    shared.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: all cores)")
    shared.add_argument("--no-progress", action="store_true", help="no progress bars")
    return shared


def _option(*flags: str, **kwargs) -> argparse.ArgumentParser:
    """A parent parser with one option (--seed and --out: shared, with each command's help)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


def _defended_victim(required: bool) -> argparse.ArgumentParser:
    """--victim, --defense and its --param items (defend needs a defense; attack defaults to none)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--victim", required=True, metavar="DIR",
                        help="the victim directory (from `divqat train`)")
    if required:
        parent.add_argument("--defense", required=True, metavar="NAME",
                            help="a defense name (see `divqat defenses`)")
    else:
        parent.add_argument("--defense", default="none", metavar="NAME",
                            help="the defense behind the black box (see `divqat defenses`; default: none)")
    parent.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a defense parameter, repeatable (e.g. --param beta=0.5)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from divqat.data import dataset_names
    from divqat.models import model_names
    from divqat.pipelines.train import MODES
    from divqat.train.losses import DIVERGENCES, RECOMMENDED
    from divqat.train.trainer import PRECISIONS

    parser = argparse.ArgumentParser(prog="divqat", description=DESCRIPTION)
    training = _shared_options("torch device for training (default: cpu)")
    shared = _shared_options()
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an fp32, QAT or DivQAT victim", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[training, _option("--seed", type=int, default=0, help="(default: 0)"),
                                _option("--out", required=True, metavar="DIR",
                                        help="where to write the victim")])
    t.add_argument("--dataset", required=True, choices=dataset_names(), metavar="NAME",
                   help=f"dataset to train on: {', '.join(dataset_names())}")
    t.add_argument("--arch", default="resnet8", choices=model_names(), metavar="ARCH",
                   help=f"architecture: {', '.join(model_names())} (default: resnet8)")
    t.add_argument("--mode", default="fp32", choices=MODES, help="fp32 | qat | divqat (default: fp32)")
    t.add_argument("--teacher", metavar="DIR", help="the fp32 victim that qat/divqat start from (required for them)")
    t.add_argument("--alpha", type=float, default=None,
                   help=f"DivQAT divergence weight; 0 gives plain QAT (default for divqat: {RECOMMENDED.alpha:g})")
    t.add_argument("--divergence", default=None, choices=DIVERGENCES,
                   help="DivQAT divergence: kl = KL(teacher||quantized), the paper's; reverse-kl; js "
                        "(Jensen-Shannon, bounded); tail-kl (KL over the non-true classes, renormalized) "
                        f"(default for divqat: {RECOMMENDED.divergence})")
    t.add_argument("--cap", type=float, default=None, metavar="NATS",
                   help="stop pushing a sample once its divergence exceeds this (default for divqat: "
                        f"{RECOMMENDED.cap:g} with the default divergence, else no cap; 0 = no cap)")
    t.add_argument("--ramp", type=float, default=0.0, metavar="FRACTION",
                   help="ramp alpha up from 0 over this fraction of the steps (default: 0 = no ramp)")
    t.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the divergence (default: 1)")
    t.add_argument("--epochs", type=_positive_int, required=True, help="training epochs")
    t.add_argument("--batch-size", type=_positive_int, default=128, help="(default: 128)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.1 fp32, 0.01 qat/divqat)")
    t.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="train on the first N training images only")
    t.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="keep the last N training images out of training (an unseen in-distribution "
                        "transfer set for attacks) (default: 0)")
    t.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 training only: bf16 runs the forward passes under bf16 autocast where "
                        "the CPU has native bf16, fp32 elsewhere (default: fp32)")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("defend", help="evaluate a defense on a victim", description=DEFEND_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[shared, _defended_victim(required=True),
                                _option("--seed", type=int, default=0,
                                        help="seed of the model a defense builds (MAD's surrogate, "
                                             "the misinformation model) (default: 0)"),
                                _option("--out", required=True, metavar="DIR",
                                        help="where to write metrics.json")])
    d.add_argument("--queries", metavar="NAME[:SPLIT]",
                   help="query set: any dataset, adapted to the victim's input (default: the victim's "
                        "own test split)")
    d.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="use the first N query images only")
    d.add_argument("--batch-size", type=_positive_int, default=256, help="images per query (default: 256)")
    d.add_argument("--misinformation-epochs", type=_positive_int, default=5, metavar="N",
                   help="adaptive-misinformation: epochs to train its model on first use (default: 5)")
    d.add_argument("--retrain-misinformation", action="store_true",
                   help="adaptive-misinformation: retrain its model even if one is saved")
    d.set_defaults(func=cmd_defend)

    ds = sub.add_parser("defenses", help="list the defenses with their parameters and defaults")
    ds.set_defaults(func=cmd_defenses)

    a = sub.add_parser("attack", help="run an extraction attack against a (defended) victim",
                       description=ATTACK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[shared, _defended_victim(required=False),
                                _option("--seed", type=int, default=0,
                                        help="seed of the thief (and of a defense's model) (default: 0)"),
                                _option("--out", required=True, metavar="DIR",
                                        help="where to write metrics.json")])
    a.add_argument("--attack", required=True, metavar="NAME", help="an attack name (see `divqat attacks`)")
    a.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack parameter, repeatable (e.g. --attack-param reward=cert)")
    a.add_argument("--transfer", metavar="SET", help="the thief's transfer set: holdout or NAME[:SPLIT]")
    a.add_argument("--budget", type=_positive_int, nargs="+", required=True, metavar="N",
                   help="query budget(s); one surrogate per budget")
    a.add_argument("--labels-only", action="store_true", help="the black box answers labels only")
    a.add_argument("--surrogate", default="resnet8", choices=model_names(), metavar="ARCH",
                   help="surrogate architecture (default: resnet8)")
    a.add_argument("--epochs", type=_positive_int, default=30,
                   help="surrogate training epochs over the stored queries (default: 30)")
    a.add_argument("--min-steps", type=int, default=0, metavar="N",
                   help="at least N optimizer steps per surrogate: small budgets get more epochs "
                        "(default: 0, --epochs as given)")
    a.add_argument("--batch-size", type=_positive_int, default=128, help="surrogate batch size (default: 128)")
    a.add_argument("--lr", type=float, default=0.1, help="surrogate peak learning rate, cosine (default: 0.1)")
    a.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the soft cross-entropy (default: 1)")
    a.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="surrogate training: bf16 autocast where the CPU has it (default: fp32)")
    a.set_defaults(func=cmd_attack)

    al = sub.add_parser("attacks", help="list the attacks with their parameters and defaults")
    al.set_defaults(func=cmd_attacks)

    from divqat.experiment.config import preset_names

    r = sub.add_parser("run", help="run (or resume) an experiment from a config or a preset",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[training])
    r.add_argument("config", nargs="?", metavar="CONFIG", help="a YAML experiment config")
    r.add_argument("--preset", choices=preset_names(), metavar="NAME",
                   help=f"a shipped config instead of CONFIG: {', '.join(preset_names())}")
    r.add_argument("--out", metavar="DIR", help="output folder (default: runs/NAME, NAME from the config)")
    r.add_argument("--executor", choices=("serial", "ray"), default="serial",
                   help="serial: one stage at a time in this process; ray: stages as Ray tasks, as "
                        "many at a time as the CPUs allow (default: serial)")
    r.add_argument("--address", metavar="ADDR",
                   help="ray: join the running Ray cluster at ADDR (default: $RAY_ADDRESS, else a "
                        "local Ray instance on this machine's cores)")
    r.add_argument("--cpus-per-stage", type=_positive_int, default=1, metavar="N",
                   help="ray: CPUs (and torch threads) per stage (default: 1)")
    r.add_argument("--plan", action="store_true",
                   help="print the stages, what is cached and the estimated time left; run nothing")
    r.add_argument("--cores", type=_positive_int, default=None, metavar="N",
                   help="--plan: estimate the wall time on N cores (default: this machine's)")
    r.add_argument("--times", action="append", default=[], metavar="DIR",
                   help="--plan: also estimate from the stage times measured in DIR (repeatable)")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="rebuild report.md and the plots of an experiment from its results.json")
    rp.add_argument("dir", metavar="DIR", help="the experiment's output folder (`divqat run --out`)")
    rp.set_defaults(func=cmd_report)
    return parser


def _version() -> str:
    from divqat import __version__

    return __version__


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def cmd_train(args: argparse.Namespace) -> int:
    from divqat.pipelines.train import TrainRequest, train_victim
    from divqat.train.losses import DivQATSettings, divqat_settings

    _set_threads(args.threads)
    if args.mode == "divqat":  # unset options take the recommended setting
        settings = divqat_settings(args.alpha, args.divergence, args.cap, args.ramp, args.temperature)
    else:
        settings = DivQATSettings(alpha=args.alpha or 0.0, cap=args.cap, ramp=args.ramp,
                                  temperature=args.temperature)
    req = TrainRequest(dataset=args.dataset, arch=args.arch, mode=args.mode, out=args.out, epochs=args.epochs,
                       teacher=args.teacher, divqat=settings, limit=args.limit, holdout=args.holdout,
                       seed=args.seed, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                       data_root=args.data_root, device=args.device, progress=not args.no_progress)
    m = train_victim(req)
    line = f"{args.mode} {args.arch} on {args.dataset}: test accuracy {m['test_accuracy']:.2%}"
    if "int8_test_accuracy" in m:
        line += (f", int8 test accuracy {m['int8_test_accuracy']:.2%}, KL to teacher {m['kl_to_teacher']:.4f}, "
                 f"L1 to teacher {m['l1_to_teacher']:.4f}")
    print(f"{line} ({m['train_seconds']:.0f} s training) -> {args.out}")
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    from divqat.pipelines.defend import defend_victim
    from divqat.registry import parse_params

    _set_threads(args.threads)
    m = defend_victim(args.victim, args.defense, parse_params(args.param), queries=args.queries,
                      limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                      misinformation_epochs=args.misinformation_epochs,
                      retrain_misinformation=args.retrain_misinformation, data_root=args.data_root,
                      device=args.device, progress=not args.no_progress,
                      log=lambda message: print(message, file=sys.stderr), out=args.out)
    params = params_text(m["params"], ", ")
    print(f"{m['defense']}({params}) on {args.victim} ({m['victim_mode']} {m['victim_arch']}): "
          f"defender accuracy {m['defender_accuracy']:.2%} (undefended {m['victim_accuracy']:.2%}) "
          f"on {m['test_set']}")
    print(f"over {m['queries']} queries of {m['query_set']}: L1 {m['l1_distance']:.4f}, "
          f"KL {m['kl_divergence']:.4f}, argmax changed {m['argmax_changed']:.2%}, "
          f"{m['ms_per_query_clean']:.3f} -> {m['ms_per_query_defended']:.3f} ms/query "
          f"({m['latency_ratio']:.2f}x) -> {os.path.join(args.out, 'metrics.json')}")
    return 0


def cmd_defenses(args: argparse.Namespace) -> int:
    from divqat.pipelines.defense_models import list_defenses

    rows = list_defenses()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['summary']}")
        params = params_text(r["params"], ", ") or "none"
        print(f"{'':<{width}}  params: {params}")
        if r["model"]:
            print(f"{'':<{width}}  model: {r['model']}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from divqat.attacks import SurrogateTraining
    from divqat.pipelines.attack import attack_victim
    from divqat.registry import parse_params

    _set_threads(args.threads)
    training = SurrogateTraining(arch=args.surrogate, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, temperature=args.temperature, min_steps=args.min_steps,
                                 precision=args.precision, seed=args.seed,
                                 device=args.device, progress=not args.no_progress)
    m = attack_victim(args.victim, args.attack, parse_params(args.attack_param), budgets=args.budget,
                      defense=args.defense, defense_params=parse_params(args.param),
                      transfer=args.transfer, training=training, labels_only=args.labels_only,
                      data_root=args.data_root, device=args.device, progress=not args.no_progress,
                      log=lambda message: print(message, file=sys.stderr), out=args.out)
    params = params_text(m["defense_params"], ", ")
    kind = "label-only" if m["labels_only"] else "soft-label"
    for r in m["results"]:
        print(f"{m['attack']} ({kind}, {m['transfer_set'] or 'data-free'}) vs {m['victim_mode']} victim "
              f"+ {m['defense']}({params}): budget {r['budget']}: adversary accuracy "
              f"{r['adversary_accuracy']:.2%} (error {r['adversary_error']:.2%}), agreement "
              f"{r['agreement']:.2%}, {r['queries_used']} queries, {r['seconds']:.0f} s")
    print(f"defender accuracy {m['defender_accuracy']:.2%} (undefended {m['victim_accuracy']:.2%}), "
          f"L1 {m['l1_distance']:.4f} -> {os.path.join(args.out, 'metrics.json')}")
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from divqat.attacks import describe_attacks

    rows = describe_attacks()
    width = max(len(name) for name, _, _ in rows)
    for name, summary, defaults in rows:
        print(f"{name:<{width}}  {summary}")
        params = params_text(defaults, ", ") or "none"
        print(f"{'':<{width}}  params: {params}")
    return 0


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
    if args.executor == "ray" and args.threads:
        raise ConfigError("--threads is for --executor serial; with ray each stage gets "
                          "--cpus-per-stage threads")
    if args.plan:
        from divqat.experiment.estimate import plan_lines

        cores = args.cores or (os.cpu_count() or 1)
        for line in plan_lines(config, out, cores=cores, cpus_per_stage=args.cpus_per_stage,
                               threads=args.threads, executor=args.executor, times_from=args.times,
                               data_root=args.data_root):
            print(line)
        return 0
    executor = make_executor(args.executor, address=args.address, cpus_per_stage=args.cpus_per_stage)
    _set_threads(args.threads)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DivqatError as e:
        print(f"divqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"divqat {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
