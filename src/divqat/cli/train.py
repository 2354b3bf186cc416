"""`divqat train`: a victim (fp32, QAT or DivQAT) as a loadable artifact."""

from __future__ import annotations

import argparse

from divqat.cli import _common as common

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


def register(sub) -> None:
    from divqat.pipelines.train import MODES
    from divqat.train.losses import DIVERGENCES, PLACEMENTS, RECOMMENDED
    from divqat.train.trainer import PRECISIONS

    t = common.described(sub, "train", "train an fp32, QAT or DivQAT victim", TRAIN_HELP,
                  parents=[common.runtime_options("torch device for training (default: cpu)"), common.seed_option(),
                           common.out_option("where to write the victim"), common.data_options()])
    t.add_argument("--arch", default="resnet8", metavar="ARCH", help=common.arch_help("architecture"))
    t.add_argument("--init", metavar="FILE",
                   help="fp32: start from these weights (.pt state dict or .safetensors), e.g. a "
                        "backbone; tensors whose names and shapes fit are loaded, the rest (such "
                        "as a head for other classes) start fresh")
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
    t.add_argument("--epochs", type=common.positive_int, required=True, help="training epochs")
    t.add_argument("--batch-size", type=common.positive_int, default=128, help="(default: 128)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.1 fp32, 0.01 qat/divqat)")
    t.add_argument("--limit", type=common.positive_int, default=None, metavar="N", help="train on the first N training images only")
    t.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="keep the last N training images out of training (an unseen in-distribution "
                        "transfer set for attacks) (default: 0)")
    t.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16 runs the forward passes (qat/divqat: the fake-quantized student's and "
                        "the DivQAT teacher's) under bf16 autocast where the CPU has native bf16, "
                        "fp32 elsewhere (default: fp32)")
    t.add_argument("--target", default="x86", choices=("x86", "edge"),
                   help="int8 scheme of qat/divqat: x86 (inductor, oneDNN) or edge (ExecuTorch's "
                        "XNNPACK, for `divqat export`; needs divqat[edge]) (default: x86)")
    t.set_defaults(func=cmd_train)
    register_import(sub)


def cmd_train(args: argparse.Namespace) -> int:
    from divqat.pipelines.train import TrainRequest, train_victim
    from divqat.train.losses import DivQATSettings, divqat_settings

    common.set_threads(args.threads)
    if args.mode == "divqat":  # unset options take the recommended setting
        settings = divqat_settings(args.alpha, args.divergence, args.cap, args.ramp, args.temperature,
                                   divergence_on=args.divergence_on, outliers=args.outliers,
                                   distill=args.distill)
    else:
        settings = DivQATSettings(alpha=args.alpha or 0.0, cap=args.cap, ramp=args.ramp,
                                  temperature=args.temperature, divergence_on=args.divergence_on,
                                  outliers=args.outliers, distill=args.distill)
    dataset = common.dataset_name(args)
    req = TrainRequest(dataset=dataset, arch=args.arch, init=args.init, mode=args.mode, out=args.out, epochs=args.epochs,
                       teacher=args.teacher, divqat=settings, limit=args.limit, holdout=args.holdout,
                       seed=args.seed, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                       data_root=args.data_root, device=args.device, progress=not args.no_progress,
                       target=args.target)
    m = train_victim(req)
    line = f"{args.mode} {args.arch} on {dataset}: test accuracy {m['test_accuracy']:.2%}"
    if "int8_test_accuracy" in m:
        line += (f", int8 test accuracy {m['int8_test_accuracy']:.2%}, KL to teacher {m['kl_to_teacher']:.4f}, "
                 f"L1 to teacher {m['l1_to_teacher']:.4f}")
    if "kl_to_teacher_outliers" in m:
        line += f"; on outliers ({m['outlier_set']}) KL to teacher {m['kl_to_teacher_outliers']:.4f}"
    if "init" in m:
        init = m["init"]
        line += (f"; from {init['file']}: {init['loaded']} tensors loaded, {len(init['fresh'])} "
                 f"fresh ({', '.join(init['fresh'][:4])}{', ...' if len(init['fresh']) > 4 else ''})")
    print(f"{line} ({m['train_seconds']:.0f} s training) -> {args.out}")
    return 0


IMPORT_HELP = """\
Turn a model trained elsewhere into an fp32 victim folder: the teacher that `divqat train --mode
qat|divqat --teacher DIR` fine-tunes, and what defend, attack, serve, export and `divqat run`
(victim.weights) start from.

The weights: a state dict saved with torch.save(model.state_dict(), FILE) (.pt/.pth; checkpoint
wrappings {"state_dict": ...} / {"model": ...} and DataParallel's "module." prefix are read too) or
a .safetensors file, for --arch built for the dataset's classes and channels. Keys or shapes that
do not fit are named in one line (exit 2). Normalization: divqat puts it inside the deployed model;
give the statistics the model was trained with (--mean/--std, e.g. ImageNet's 0.485,0.456,0.406 /
0.229,0.224,0.225), or leave them out for the training images' own statistics.

Writes OUT/victim.pt2, OUT/victim.json (with the weights' sha256), OUT/weights.pt, OUT/metrics.json.

example:
  divqat import --arch torchvision:mobilenet_v3_small --weights mine.pt \\
      --dataset image-folder --image-size 96 --data-root photos --out runs/mine
  divqat train --dataset image-folder --image-size 96 --data-root photos \\
      --arch torchvision:mobilenet_v3_small --mode divqat --teacher runs/mine --epochs 2 --out runs/divqat
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register_import(sub) -> None:
    i = common.described(sub, "import", "turn your own trained model into an fp32 victim", IMPORT_HELP,
                         parents=[common.runtime_options("torch device for evaluation (default: cpu)"),
                                  common.out_option("where to write the victim"), common.data_options()])
    i.add_argument("--arch", required=True, metavar="ARCH",
                   help=common.arch_help("the architecture the weights belong to", "none, required"))
    i.add_argument("--weights", required=True, metavar="FILE", help=".pt/.pth state dict or .safetensors")
    i.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                   help="the normalization mean the model was trained with (default: the training images')")
    i.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]",
                   help="the normalization std the model was trained with (default: the training images')")
    i.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="the last N training images were never trained on: an unseen in-distribution "
                        "transfer set for attacks (default: 0)")
    i.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from divqat.pipelines.import_model import ImportRequest, import_victim

    common.set_threads(args.threads)
    req = ImportRequest(arch=args.arch, weights=args.weights, dataset=common.dataset_name(args),
                        out=args.out, mean=args.mean, std=args.std, holdout=args.holdout)
    m = import_victim(req, common.run_context(args))
    print(f"imported {args.arch} on {m['dataset']}: test accuracy {m['test_accuracy']:.2%} on "
          f"{m['test_images']} images (weights sha256 {m['weights_sha256'][:12]}) -> {args.out}")
    return 0

