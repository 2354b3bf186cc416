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

Out-of-distribution DivQAT (--divergence-on out): the divergence is pushed on outliers instead
of the training images, which keep CE (plus, with --distill W, a KL pull toward the teacher), so
in-distribution answers stay faithful while answers to foreign images stop carrying the teacher's
knowledge. It builds on outlier exposure (Hendrycks, Mazeika, Dietterich, "Deep Anomaly Detection
with Outlier Exposure", ICLR 2019); unlike it, the target is "away from the teacher" (capped),
not the uniform distribution. Outliers (--outliers): synth (default: made from each training
batch: blends of random image pairs, shuffled patches, strong corruptions; no labels used),
synth:KIND[+KIND] (mix, patches, corrupt), or an unlabeled dataset NAME[:SPLIT].

Writes OUT/victim.pt2, OUT/victim.json and OUT/metrics.json (test_accuracy, int8_test_accuracy,
kl_to_teacher, l1_to_teacher, train_seconds, per-epoch history).

example:
  divqat train --dataset fashion-mnist --arch resnet8 --mode fp32 --epochs 15 --out runs/fp32
  divqat train --dataset fashion-mnist --arch resnet8 --mode divqat --teacher runs/fp32 \\
      --epochs 1 --out runs/divqat          # kl, alpha 2, cap 0.15 (the measured default)
  divqat train ... --mode divqat --divergence kl --alpha 0.5 ...  # the paper's plain KL, no cap
  divqat train --dataset 'fashion-mnist[0-4]' ... --mode divqat --divergence-on out --cap 0.5 ...
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

--victim also takes a device program (`divqat export`, run by ExecuTorch). --attack copy is the
other threat on a device: whoever holds it copies the .pte file, no queries (--budget not needed;
--attack-param thief_has_key=false for a sealed file whose key the thief lacks; the defender's key
from DIVQAT_KEY_FILE).

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


def _shared_options(device_help: str = "torch device (default: cpu)",
                    progress: bool = True) -> argparse.ArgumentParser:
    """The options every command that loads data and runs models takes (a parent parser)."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--data-root", metavar="DIR",
                        help="folder holding the datasets that need one (cifar10, cifar100, svhn, "
                             "gtsrb, image-folder)")
    shared.add_argument("--device", default="cpu", help=device_help)
    shared.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: all cores)")
    if progress:
        shared.add_argument("--no-progress", action="store_true", help="no progress bars")
    return shared


def _option(*flags: str, **kwargs) -> argparse.ArgumentParser:
    """A parent parser with one option (--seed and --out: shared, with each command's help)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


def _defended_victim(required: bool, remote: bool = False) -> argparse.ArgumentParser:
    """--victim, --defense and its --param items (defend needs a defense; attack defaults to none
    and also takes the URL of a `divqat serve` API)."""
    parent = argparse.ArgumentParser(add_help=False)
    if remote:
        parent.add_argument("--victim", required=True, metavar="DIR|FILE|URL",
                            help="the victim directory (from `divqat train`), a device program "
                                 "(from `divqat export`), or the URL of a `divqat serve` API")
    else:
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
    from divqat.train.losses import DIVERGENCES, PLACEMENTS, RECOMMENDED
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
    t.add_argument("--dataset", required=True, metavar="NAME",
                   help=f"dataset to train on: {', '.join(dataset_names())}; NAME[a-b] or NAME[a,b,c] "
                        "keeps those classes only, relabelled 0..k-1 (e.g. fashion-mnist[0-4])")
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
    t.add_argument("--divergence-on", default="in", choices=PLACEMENTS,
                   help="where DivQAT pushes the divergence: in = the training images (the paper's), "
                        "out = outliers only (outlier exposure, Hendrycks et al., ICLR 2019), both "
                        "(default: in)")
    t.add_argument("--outliers", default="synth", metavar="SOURCE",
                   help="outliers for --divergence-on out/both: synth (from the training batches, no "
                        "labels used), synth:mix+patches+corrupt (some kinds), or an unlabeled dataset "
                        "NAME[:SPLIT] (default: synth)")
    t.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="with --divergence-on out: add W * KL(teacher || quantized) on the training "
                        "images, keeping their answers faithful (default: 0)")
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
    t.add_argument("--target", default="x86", choices=("x86", "edge"),
                   help="int8 scheme of qat/divqat: x86 (inductor, oneDNN) or edge (ExecuTorch's "
                        "XNNPACK, for `divqat export`; needs divqat[edge]) (default: x86)")
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
                       parents=[shared, _defended_victim(required=False, remote=True),
                                _option("--seed", type=int, default=0,
                                        help="seed of the thief (and of a defense's model) (default: 0)"),
                                _option("--out", required=True, metavar="DIR",
                                        help="where to write metrics.json")])
    a.add_argument("--attack", required=True, metavar="NAME", help="an attack name (see `divqat attacks`), or "
                   "copy: the on-device thief who copies the program file")
    a.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack parameter, repeatable (e.g. --attack-param reward=cert)")
    a.add_argument("--transfer", metavar="SET", help="the thief's transfer set: holdout or NAME[:SPLIT]")
    a.add_argument("--budget", type=_positive_int, nargs="+", metavar="N",
                   help="query budget(s); one surrogate per budget (required, except for --attack copy)")
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
    _add_remote_attack_options(a)
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
    _add_service_commands(sub)
    _add_export(sub)
    _add_detector_commands(sub, shared)
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
        settings = divqat_settings(args.alpha, args.divergence, args.cap, args.ramp, args.temperature,
                                   divergence_on=args.divergence_on, outliers=args.outliers,
                                   distill=args.distill)
    else:
        settings = DivQATSettings(alpha=args.alpha or 0.0, cap=args.cap, ramp=args.ramp,
                                  temperature=args.temperature, divergence_on=args.divergence_on,
                                  outliers=args.outliers, distill=args.distill)
    req = TrainRequest(dataset=args.dataset, arch=args.arch, mode=args.mode, out=args.out, epochs=args.epochs,
                       teacher=args.teacher, divqat=settings, limit=args.limit, holdout=args.holdout,
                       seed=args.seed, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                       data_root=args.data_root, device=args.device, progress=not args.no_progress,
                       target=args.target)
    m = train_victim(req)
    line = f"{args.mode} {args.arch} on {args.dataset}: test accuracy {m['test_accuracy']:.2%}"
    if "int8_test_accuracy" in m:
        line += (f", int8 test accuracy {m['int8_test_accuracy']:.2%}, KL to teacher {m['kl_to_teacher']:.4f}, "
                 f"L1 to teacher {m['l1_to_teacher']:.4f}")
    if "kl_to_teacher_outliers" in m:
        line += f"; on outliers ({m['outlier_set']}) KL to teacher {m['kl_to_teacher_outliers']:.4f}"
    print(f"{line} ({m['train_seconds']:.0f} s training) -> {args.out}")
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    from divqat.pipelines.context import RunContext
    from divqat.pipelines.defend import DefendRequest, defend_victim
    from divqat.registry import parse_params

    _set_threads(args.threads)
    m = defend_victim(DefendRequest(args.victim, args.defense, parse_params(args.param),
                                    queries=args.queries, limit=args.limit, batch_size=args.batch_size,
                                    seed=args.seed, misinformation_epochs=args.misinformation_epochs,
                                    retrain_misinformation=args.retrain_misinformation, out=args.out),
                      RunContext(data_root=args.data_root, device=args.device,
                                 progress=not args.no_progress,
                                 log=lambda message: print(message, file=sys.stderr)))
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
    from divqat.errors import ConfigError
    from divqat.pipelines.attack import AttackRequest, attack_victim
    from divqat.pipelines.context import RunContext
    from divqat.registry import parse_params

    if _is_url(args.victim):
        return cmd_attack_remote(args)
    _refuse_remote_options(args)
    _set_threads(args.threads)
    if args.attack == "copy":
        return cmd_copy(args)
    if not args.budget:
        raise ConfigError("--budget N [N ...] is required (one surrogate per budget)")
    training = SurrogateTraining(arch=args.surrogate, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, temperature=args.temperature, min_steps=args.min_steps,
                                 precision=args.precision, seed=args.seed,
                                 device=args.device, progress=not args.no_progress)
    m = attack_victim(AttackRequest(args.victim, args.attack, args.budget,
                                    parse_params(args.attack_param), defense=args.defense,
                                    defense_params=parse_params(args.param), transfer=args.transfer,
                                    training=training, labels_only=args.labels_only, out=args.out),
                      RunContext(data_root=args.data_root, device=args.device,
                                 progress=not args.no_progress,
                                 log=lambda message: print(message, file=sys.stderr)))
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


# ---------------------------------------------------------------- the prediction service:
# `divqat serve`, `divqat keys`, `divqat audit`, and `divqat attack --victim http://...`

SERVE_HELP = """\
Serve a victim behind its defense as an HTTP prediction API (FastAPI + uvicorn): POST
/v1/predict (a .npy batch or PNG/JPEG files -> defended posteriors, labels or top-k, as the API
key allows; JSON or .npy), GET /v1/model, GET /healthz, GET /metrics (Prometheus). Every request
needs an API key (`divqat keys create`); every image counts against the key's budget, committed
to --db before the answer leaves; rate limits answer 429 with Retry-After and RateLimit fields;
every request is in the audit log (`divqat audit`). Concurrent requests are batched into one
victim call (--max-delay-ms). Listens on 127.0.0.1 unless --host names another address.
SIGTERM or Ctrl-C finishes the requests in flight, then stops.

example:
  divqat keys create thief --budget 5000 --db keys.db > thief.key
  divqat serve --victim runs/qat --defense dcp --param beta=0.5 --db keys.db --port 8000
  curl -s -H "Authorization: Bearer $(cat thief.key)" -H "Content-Type: application/x-npy" \\
      --data-binary @batch.npy http://127.0.0.1:8000/v1/predict
"""

KEYS_HELP = """\
Manage the API keys of `divqat serve` in its key database (SQLite). The secret is printed once,
on stdout, and stored only as a hash: `divqat keys create NAME ... > NAME.key`.

  create NAME --budget N [--rate R --window S] [--output soft|labels|top-K]
  list             every key, its output level, budget and rate
  usage [NAME]     images counted against each budget, what is left, and the keys an
                   extraction detector flagged (`divqat serve --detector`)
  revoke NAME      the key is refused (401) from its next request on
  unflag NAME      clear a key's detector flag and forget its detector state
"""


def _is_url(victim: str) -> bool:
    return victim.startswith(("http://", "https://"))


def _add_remote_attack_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--api-key-file", metavar="FILE",
                   help="with --victim URL: the thief's API key (a file holding the key `divqat keys "
                        "create` printed)")
    a.add_argument("--eval-key-file", metavar="FILE",
                   help="with --victim URL: a separate key for measuring the victim's answers on its "
                        "test split (agreement, defender accuracy); without it they are left out")


def _refuse_remote_options(args: argparse.Namespace) -> None:
    from divqat.errors import ConfigError

    if args.api_key_file or args.eval_key_file:
        raise ConfigError("--api-key-file and --eval-key-file go with --victim http://HOST:PORT")


def _add_service_commands(sub) -> None:
    s = sub.add_parser("serve", help="serve a (defended) victim as an HTTP prediction API",
                       description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[_shared_options(progress=False), _defended_victim(required=False),
                                _option("--seed", type=int, default=0,
                                        help="seed of a defense's model (default: 0)")])
    s.add_argument("--db", required=True, metavar="FILE", help="the key database (keys, usage, audit)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; another only when named here)")
    s.add_argument("--port", type=int, default=8000, help="TCP port; 0 takes a free one (default: 8000)")
    s.add_argument("--max-images", type=_positive_int, default=1024, metavar="N",
                   help="images per request (default: 1024)")
    s.add_argument("--max-body-mb", type=_positive_int, default=64, metavar="MB",
                   help="request body size (default: 64)")
    s.add_argument("--max-batch", type=_positive_int, default=256, metavar="N",
                   help="most images per batched victim call (default: 256)")
    s.add_argument("--max-delay-ms", type=float, default=2.0, metavar="MS",
                   help="how long a request may wait for others to share its victim call (default: 2)")
    s.add_argument("--fsync", action="store_true",
                   help="sync every count to disk (survives a power cut, not only a crash; slower)")
    s.add_argument("--misinformation-epochs", type=_positive_int, default=5, metavar="N",
                   help="adaptive-misinformation: epochs to train its model on first use (default: 5)")
    s.add_argument("--detector", metavar="NAME",
                   help="an extraction detector watching each key's queries (see `divqat detectors`; "
                        "calibrated with `divqat calibrate`); its alarms and scores go to the audit")
    s.add_argument("--detector-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a detector parameter, repeatable (default: its calibration's)")
    s.add_argument("--on-alarm", default="flag", choices=("flag", "block", "labels-only"),
                   help="what happens to a key the detector flags: flag (record only), block (403 "
                        "from its next request on), labels-only (answer labels only) (default: flag)")
    s.add_argument("--detector-save-every", type=float, default=1.0, metavar="S",
                   help="seconds between saves of a key's detector state to --db (always at its "
                        "first alarm and on shutdown; 0: after every request) (default: 1)")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="create, list, revoke the API keys of `divqat serve`",
                       description=KEYS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ks = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="a new key; prints its secret once")
    kc.add_argument("name", metavar="NAME")
    kc.add_argument("--budget", type=int, required=True, metavar="N", help="images the key may send, in all")
    kc.add_argument("--rate", type=_positive_int, default=None, metavar="R",
                    help="images per --window seconds (default: no rate limit)")
    kc.add_argument("--window", type=_positive_int, default=60, metavar="S",
                    help="the rate limit's window in seconds (default: 60)")
    kc.add_argument("--output", default="soft", metavar="soft|labels|top-K",
                    help="what the key receives: defended posteriors, labels only, or the top K "
                         "(default: soft)")
    for name, help_text in (("list", "every key"), ("usage", "images counted per key, and flags"),
                            ("revoke", "refuse a key from now on"),
                            ("unflag", "clear a key's detector flag and its detector state")):
        kp = ks.add_parser(name, help=help_text)
        if name == "usage":
            kp.add_argument("name", nargs="?", metavar="NAME")
        elif name in ("revoke", "unflag"):
            kp.add_argument("name", metavar="NAME")
    for kp in ks.choices.values():
        kp.add_argument("--db", required=True, metavar="FILE", help="the key database")
    k.set_defaults(func=cmd_keys)

    au = sub.add_parser("audit", help="per-key usage from the audit log of `divqat serve`")
    au.add_argument("--db", required=True, metavar="FILE", help="the key database")
    au.add_argument("--key", metavar="NAME", help="one key only, with its latest requests")
    au.add_argument("--requests", type=int, default=10, metavar="N",
                    help="with --key: how many of its latest requests to list (default: 10)")
    au.set_defaults(func=cmd_audit)


def cmd_serve(args: argparse.Namespace) -> int:
    from divqat.pipelines.context import RunContext
    from divqat.registry import parse_params
    from divqat.serve.app import ServiceLimits
    from divqat.serve.server import ServiceRequest, run_service

    _set_threads(args.threads)
    limits = ServiceLimits(max_images=args.max_images, max_body_bytes=args.max_body_mb * 2**20,
                           max_batch=args.max_batch, max_delay=args.max_delay_ms / 1e3)
    run_service(ServiceRequest(args.victim, args.db, args.defense, parse_params(args.param),
                               host=args.host, port=args.port, limits=limits, fsync=args.fsync,
                               seed=args.seed, misinformation_epochs=args.misinformation_epochs,
                               detector=args.detector,
                               detector_params=parse_params(args.detector_param),
                               on_alarm=args.on_alarm, save_every=args.detector_save_every),
                RunContext(data_root=args.data_root, device=args.device))
    return 0


def _when(t: float | None) -> str:
    import time

    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _flag_text(flag: dict | None) -> str:
    if flag is None:
        return "-"
    score = "" if flag["score"] is None else f", score {flag['score']:.4g}"
    return f"{_when(flag['flagged'])} by {flag['detector']} after {flag['queries']} queries{score}"


def cmd_keys(args: argparse.Namespace) -> int:
    from divqat.serve.store import KeyStore

    store = KeyStore(args.db, create=args.action == "create")
    try:
        if args.action == "create":
            key, secret = store.create_key(args.name, args.budget, rate=args.rate, window=args.window,
                                           output=args.output)
            rate = f", {key.rate} images per {key.window:g} s" if key.rate else ""
            print(f"created key {key.name!r} ({key.output}, budget {key.budget}{rate}) in {args.db}; "
                  "its secret follows on stdout, shown only this once", file=sys.stderr)
            print(secret)
        elif args.action == "list":
            rows = [["name", "key id", "output", "budget", "rate", "created", "revoked"]]
            rows += [[k.name, k.key_id, k.output, str(k.budget),
                      f"{k.rate}/{k.window:g}s" if k.rate else "-", _when(k.created), _when(k.revoked)]
                     for k in store.keys()]
            print(_table(rows) if len(rows) > 1 else f"no keys in {args.db}")
        elif args.action == "usage":
            keys = [store.key(args.name)] if args.name else store.keys()
            flags = store.flags()
            rows = [["name", "used", "budget", "left", "revoked", "flagged"]]
            rows += [[k.name, str(k.used), str(k.budget), str(k.left), _when(k.revoked),
                      _flag_text(flags.get(k.name))] for k in keys]
            print(_table(rows) if len(rows) > 1 else f"no keys in {args.db}")
        elif args.action == "unflag":
            key = store.unflag(args.name)
            print(f"key {key.name!r} unflagged; its detector state is forgotten")
        else:
            key = store.revoke(args.name)
            print(f"revoked key {key.name!r} ({key.used} of {key.budget} images used)")
    finally:
        store.close()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from divqat.serve.store import KeyStore

    store = KeyStore(args.db, create=False)
    try:
        usage = store.usage(args.key)
        rows = [["key", "output", "budget", "counted", "requests", "answered", "images answered",
                 "in flight", "refused", "last request"]]
        rows += [[u["name"], u["output"], str(u["budget"]), str(u["used"]), str(u["requests"]),
                  str(u["answered_requests"]), str(u["images_answered"]), str(u["in_flight"]),
                  str(u["refused_requests"]), _when(u["last"])] for u in usage]
        print(_table(rows))
        mismatch = [u["name"] for u in usage if u["images_counted"] != u["used"]]
        if mismatch:  # the counter and the audit are written in one transaction: never expected
            print(f"warning: the audit's counted images differ from the counter for {', '.join(mismatch)}")
        if args.key:
            print()
            lines = [["time", "images", "counted", "outcome", "status", "ms", "batch sha256",
                      "detector score", "alarm"]]
            lines += [[_when(r["time"]), str(r["images"]), str(r["counted"]), r["outcome"],
                       str(r["status"] or "-"), "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}",
                       (r["batch_sha256"] or "-")[:16],
                       "-" if r["detector_score"] is None else f"{r['detector_score']:.4g}",
                       {None: "-", 0: "no", 1: "ALARM"}[r["alarm"]]]
                      for r in store.audit(args.key, limit=max(0, args.requests))]
            print(_table(lines))
    finally:
        store.close()
    return 0


def cmd_attack_remote(args: argparse.Namespace) -> int:
    from divqat.attacks import SurrogateTraining
    from divqat.errors import ConfigError
    from divqat.pipelines.attack import AttackRequest, ServiceAccess, attack_remote
    from divqat.pipelines.context import RunContext
    from divqat.registry import parse_params
    from divqat.remote import read_key_file

    if not args.api_key_file:
        raise ConfigError("--victim URL needs --api-key-file FILE (the thief's key, `divqat keys create`)")
    if args.defense != "none" or args.param:
        raise ConfigError("over HTTP the defense is the service's (`divqat serve --defense`); "
                          "drop --defense and --param")
    _set_threads(args.threads)
    training = SurrogateTraining(arch=args.surrogate, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, temperature=args.temperature, min_steps=args.min_steps,
                                 precision=args.precision, seed=args.seed, device=args.device,
                                 progress=not args.no_progress)
    m = attack_remote(AttackRequest(args.victim, args.attack, args.budget,
                                    parse_params(args.attack_param), transfer=args.transfer,
                                    training=training, labels_only=args.labels_only, out=args.out),
                      ServiceAccess(read_key_file(args.api_key_file),
                                    read_key_file(args.eval_key_file) if args.eval_key_file else None),
                      RunContext(data_root=args.data_root, device=args.device,
                                 progress=not args.no_progress,
                                 log=lambda message: print(message, file=sys.stderr)))
    kind = "label-only" if m["labels_only"] else f"{m['remote']['output']} answers"
    for r in m["results"]:
        agreement = "" if r["agreement"] is None else f", agreement {r['agreement']:.2%}"
        print(f"{m['attack']} ({kind}, {m['transfer_set'] or 'data-free'}) vs {m['victim']}: budget "
              f"{r['budget']}: adversary accuracy {r['adversary_accuracy']:.2%} (error "
              f"{r['adversary_error']:.2%}){agreement}, {r['queries_used']} queries, {r['seconds']:.0f} s")
    if m["defender_accuracy"] is not None:
        print(f"defender accuracy {m['defender_accuracy']:.2%} (with the evaluation key)")
    print(f"thief's key: {m['queries_used']} images counted by the service, {m['remote']['key_left']} left; "
          f"left out: {', '.join(m['left_out'])} -> {os.path.join(args.out, 'metrics.json')}")
    return 0





# ---------------------------------------------------------------- the device: export, copy

EXPORT_HELP = """\
Write a victim as an ExecuTorch program (.pte) that a device runtime runs with no Python, torch or
compiler: the network lowered to XNNPACK (int8, or fp32 for an fp32 victim) with the input
normalization inside and, with --defense, the softmax and the defense after the last layer, so the
program answers defended posteriors by itself. The victim's metadata goes inside the file.
int8 victims must be trained for the device (`divqat train --mode qat|divqat --target edge`).
--encrypt-key-file seals the file (AES-256-GCM; a missing key file is created with a new key);
loading decrypts in memory only (key file from DIVQAT_KEY_FILE for the other commands). Needs
divqat[edge].

Fusable defenses: none (softmax only), top-k, rounding, reverse-sigmoid, dcp.

example:
  divqat train --dataset fashion-mnist --mode qat --target edge --teacher runs/fp32 --epochs 1 \\
      --out runs/edge-qat
  divqat export --victim runs/edge-qat --defense dcp --param beta=0.5 --out qat-dcp.pte
  divqat export --victim runs/edge-qat --out qat.pte --encrypt-key-file device.key
  divqat attack --attack copy --victim qat.pte --out runs/copy     # the thief who holds the device
"""


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="write a victim as an ExecuTorch device program (.pte)",
                       description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--victim", required=True, metavar="DIR", help="the victim directory (from `divqat train`)")
    e.add_argument("--defense", metavar="NAME", help="a fusable defense to run inside the program")
    e.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a defense parameter, repeatable (e.g. --param beta=0.5)")
    e.add_argument("--out", required=True, metavar="FILE.pte", help="the program file to write")
    e.add_argument("--encrypt-key-file", metavar="KEY", help="seal the file with this key (created if missing)")
    e.add_argument("--max-batch", type=_positive_int, default=256,
                   help="the largest batch one call takes (default: 256)")
    e.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores)")
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from divqat.pipelines.export import export_victim
    from divqat.registry import parse_params

    _set_threads(args.threads)
    m = export_victim(args.victim, args.out, defense=args.defense, defense_params=parse_params(args.param),
                      encrypt_key_file=args.encrypt_key_file, max_batch=args.max_batch,
                      log=lambda message: print(message, file=sys.stderr))
    inside = "logits" if m["defense"] is None else (
        f"{m['defense']}({', '.join(f'{k}={v}' for k, v in m['defense_params'].items())}) posteriors")
    sealed = f", encrypted with {args.encrypt_key_file}" if m["encrypted"] else ""
    print(f"{m['mode']} {m['arch']} -> {m['out']}: {m['precision']} XNNPACK program answering {inside}, "
          f"{m['bytes'] / 1024:.1f} KiB{sealed} ({m['seconds']:.0f} s)")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from divqat.pipelines.device_copy import copy_attack
    from divqat.registry import parse_params

    m = copy_attack(args.victim, **parse_params(args.attack_param), data_root=args.data_root, out=args.out)
    r = m["results"][0]
    if r["adversary_accuracy"] is None:
        print(f"copy of {args.victim}: {m['note']} -> {os.path.join(args.out, 'metrics.json')}")
        return 0
    print(f"copy of {args.victim} ({m['victim_mode']} {m['victim_arch']}): adversary accuracy "
          f"{r['adversary_accuracy']:.2%} (victim {m['victim_accuracy']:.2%}), agreement {r['agreement']:.2%}, "
          f"largest posterior difference {r['max_posterior_difference']:.1e}, 0 queries, "
          f"{r['seconds']:.1f} s -> {os.path.join(args.out, 'metrics.json')}")
    return 0


# ---------------------------------------------------------------- extraction detectors:
# `divqat detectors`, `divqat calibrate`, `divqat detect`

CALIBRATE_HELP = """\
Calibrate an extraction detector on a victim for a target false-alarm rate, and keep the
calibration with the victim (VICTIM/detectors/NAME.json; for mmd also the defender's fp32 model,
features.pt, and the benign reference features, mmd.pt).

Benign streams: --streams honest clients, each sending --length of the images the victim was
trained on (its holdout and test split stay unseen, for `divqat detect`), in an order of its own.
The threshold is set so that at most floor(--target-far x --streams) of them raise the alarm
within --length queries. `divqat serve --detector` and `divqat detect` use it from then on.

example:
  divqat calibrate --victim runs/qat --detector prada --target-far 0.05
  divqat calibrate --victim runs/qat --detector mmd --param window=256 --streams 40 --length 5000
"""

DETECT_HELP = """\
Run an extraction attack through a black box watched by extraction detector(s), and report the
queries until each detector's first alarm (or "not raised within N"); then the false-alarm rate
over --benign-streams honest clients sending as many queries (the victim's test split and its
unseen holdout, in turn, each in its own random order). The thief runs as `divqat attack` runs
it, until its budget is spent. --attack-param mix=0.5 makes a knockoff thief evasive: half of its
queries are images of --benign (default: the victim's holdout). Writes OUT/metrics.json.

example:
  divqat detect --victim runs/qat --detector prada --attack jbda --transfer holdout --budget 5000 --out runs/detect-jbda
  divqat detect --victim runs/qat --detector prada --detector mmd --attack knockoff --transfer mnist \\
      --attack-param mix=0.5 --budget 4000 --out runs/detect-mix
"""


def _add_detector_commands(sub, shared: argparse.ArgumentParser) -> None:
    from divqat.models import model_names

    dl = sub.add_parser("detectors", help="list the extraction detectors with their parameters and defaults")
    dl.set_defaults(func=cmd_detectors)

    c = sub.add_parser("calibrate", help="calibrate an extraction detector's threshold on a victim",
                       description=CALIBRATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[shared])
    c.add_argument("--victim", required=True, metavar="DIR", help="the victim directory")
    c.add_argument("--detector", required=True, metavar="NAME", help="a detector (see `divqat detectors`)")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a detector parameter, repeatable (e.g. --param window=256)")
    c.add_argument("--target-far", type=float, default=0.05, metavar="RATE",
                   help="share of benign streams allowed to raise the alarm (default: 0.05)")
    c.add_argument("--streams", type=_positive_int, default=40, help="benign streams (default: 40)")
    c.add_argument("--length", type=_positive_int, default=5000, metavar="N",
                   help="queries per benign stream: the stream length the rate holds for (default: 5000)")
    c.add_argument("--reference-size", type=_positive_int, default=1000, metavar="N",
                   help="mmd: benign reference images (default: 1000)")
    c.add_argument("--seed", type=int, default=0, help="(default: 0)")
    c.set_defaults(func=cmd_calibrate)

    d = sub.add_parser("detect", help="measure extraction detectors against an attack",
                       description=DETECT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[shared, _defended_victim(required=False),
                                _option("--seed", type=int, default=0,
                                        help="seed of the thief and of the benign streams (default: 0)"),
                                _option("--out", required=True, metavar="DIR",
                                        help="where to write metrics.json")])
    d.add_argument("--detector", required=True, action="append", metavar="NAME",
                   help="a detector (see `divqat detectors`); repeat it to watch the same stream with several")
    d.add_argument("--detector-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the (single) detector, repeatable (default: its calibration's)")
    d.add_argument("--attack", required=True, metavar="NAME", help="an attack (see `divqat attacks`)")
    d.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack parameter, repeatable (e.g. --attack-param mix=0.5 for knockoff)")
    d.add_argument("--transfer", metavar="SET", help="the thief's transfer set: holdout or NAME[:SPLIT]")
    d.add_argument("--benign", default="holdout", metavar="SET",
                   help="the evasive knockoff thief's benign-looking images (default: holdout)")
    d.add_argument("--budget", type=_positive_int, required=True, metavar="N", help="the thief's query budget")
    d.add_argument("--labels-only", action="store_true", help="the black box answers labels only")
    d.add_argument("--benign-streams", type=int, default=20, metavar="N",
                   help="honest clients for the false-alarm rate (default: 20; 0 skips it)")
    d.add_argument("--surrogate", default="resnet8", choices=model_names(), metavar="ARCH",
                   help="the thief's surrogate architecture (default: resnet8)")
    d.add_argument("--epochs", type=_positive_int, default=5,
                   help="surrogate epochs (jbda's substitutes, the adaptive thief) (default: 5)")
    d.add_argument("--min-steps", type=int, default=150, metavar="N",
                   help="at least N optimizer steps per surrogate (default: 150, as the default experiment)")
    d.set_defaults(func=cmd_detect)


def cmd_detectors(args: argparse.Namespace) -> int:
    from divqat.pipelines.detect import list_detectors

    rows = list_detectors()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['summary']}")
        print(f"{'':<{width}}  params: {params_text(r['params'], ', ') or 'none'}")
        print(f"{'':<{width}}  alarm: {r['alarm']}"
              + ("; needs `divqat calibrate` first" if r["needs_calibration"] else ""))
        if r["model"]:
            print(f"{'':<{width}}  model: {r['model']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from divqat.pipelines.context import RunContext
    from divqat.pipelines.detect import CalibrateRequest, calibrate_detector, calibration_path
    from divqat.registry import parse_params

    _set_threads(args.threads)
    r = calibrate_detector(CalibrateRequest(args.victim, args.detector, parse_params(args.param),
                                            target_far=args.target_far, streams=args.streams,
                                            length=args.length, reference_size=args.reference_size,
                                            seed=args.seed),
                           RunContext(data_root=args.data_root,
                                      log=None if args.no_progress else lambda m: print(m, file=sys.stderr)))
    worst = sorted(w for w in r["worst_scores"] if w is not None)
    print(f"{args.detector}: {r['threshold_param']} = {r['threshold']:.6g} (alarm when the score is "
          f"{r['alarm_when']} it) for a false-alarm rate <= {r['target_far']:g} over {r['streams']} "
          f"benign streams of {r['length']} queries ({r['benign']}): {r['in_sample_false_alarms']} "
          f"raise it; their most suspicious scores range {worst[0]:.6g} .. {worst[-1]:.6g}; "
          f"{r['seconds']:.0f} s -> {calibration_path(args.victim, args.detector)}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from divqat.attacks import SurrogateTraining
    from divqat.errors import ConfigError
    from divqat.pipelines.context import RunContext
    from divqat.pipelines.detect import DetectRequest, detect_attack
    from divqat.registry import parse_params

    _set_threads(args.threads)
    names = list(dict.fromkeys(args.detector))
    if args.detector_param and len(names) > 1:
        raise ConfigError("--detector-param goes with a single --detector")
    params = parse_params(args.detector_param)
    training = SurrogateTraining(arch=args.surrogate, epochs=args.epochs, min_steps=args.min_steps,
                                 seed=args.seed, device=args.device, progress=not args.no_progress)
    m = detect_attack(DetectRequest(args.victim, {n: params for n in names}, args.attack, args.budget,
                                    parse_params(args.attack_param), transfer=args.transfer,
                                    benign=args.benign, defense=args.defense,
                                    defense_params=parse_params(args.param), training=training,
                                    labels_only=args.labels_only, benign_streams=args.benign_streams,
                                    seed=args.seed, out=args.out),
                      RunContext(data_root=args.data_root, device=args.device,
                                 progress=not args.no_progress,
                                 log=lambda message: print(message, file=sys.stderr)))
    thief = m["attack"] + (f" (mix {m['mix']:g})" if m.get("mix") else "")
    source = m["transfer_set"] or "data-free"
    for name, r in m["detectors"].items():
        found = (f"alarm after {r['first_alarm']} queries" if r["detected"]
                 else f"not raised within {m['queries_used']} queries")
        line = (f"{name} vs {thief} ({source}) on the {m['victim_mode']} victim + {m['defense']}: "
                f"{found} (most suspicious score {r['worst_score']}, {r['tests']} tests)")
        if "false_alarm_rate" in r:
            line += (f"; false alarms {r['false_alarms']}/{r['benign_streams']} benign streams of "
                     f"{r['benign_length']} ({r['false_alarm_rate']:.1%})")
        if not r["calibrated"]:
            line += "; uncalibrated (the detector's default threshold)"
        print(line)
    print(f"-> {os.path.join(args.out, 'metrics.json')}")
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
