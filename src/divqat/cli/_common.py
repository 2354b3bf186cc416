"""What the command modules share: the parent parsers of the common options, each defined once,
and the few helpers that turn arguments into library calls and results into lines."""

from __future__ import annotations

import argparse
import os
import sys

VICTIM_HELP = "the victim directory (from `divqat train`)"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_threads(parser: argparse.ArgumentParser,
                 help: str = "torch CPU threads (default: all cores)") -> None:
    parser.add_argument("--threads", type=positive_int, default=None, help=help)


def runtime_options(device_help: str = "torch device (default: cpu)", progress: bool = True,
                    threads_help: str | None = None) -> argparse.ArgumentParser:
    """The options of every command that loads data and runs models (a parent parser);
    ``threads_help`` where a command's --threads says more than "torch CPU threads"."""
    parent = data_root_option()
    parent.add_argument("--device", default="cpu", help=device_help)
    _add_threads(parent, *([threads_help] if threads_help else []))
    if progress:
        parent.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parent


def data_root_option() -> argparse.ArgumentParser:
    """--data-root alone, for a command that reads a dataset but trains nothing (export: the
    fingerprint's start images)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--data-root", metavar="DIR",
                        help="folder holding the datasets that need one (cifar10, cifar100, svhn, "
                             "gtsrb, image-folder)")
    return parent


def threads_option() -> argparse.ArgumentParser:
    """--threads alone, for a command that runs models but loads no data."""
    parent = argparse.ArgumentParser(add_help=False)
    _add_threads(parent)
    return parent


def seed_option(help: str = "(default: 0)") -> argparse.ArgumentParser:
    """--seed; the help says what the seed seeds in this command."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--seed", type=int, default=0, help=help)
    return parent


def out_option(help: str = "where to write metrics.json", metavar: str = "DIR",
               required: bool = True) -> argparse.ArgumentParser:
    """--out; the help says what the command writes there."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--out", required=required, metavar=metavar, help=help)
    return parent


def add_defense_param(parser: argparse.ArgumentParser) -> None:
    """--param: always a parameter of the defense, in every command that takes one."""
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a defense parameter, repeatable (e.g. --param beta=0.5)")


def add_detector_param(parser: argparse.ArgumentParser, help: str) -> None:
    """--detector-param: always a parameter of the extraction detector (--param is the defense's)."""
    parser.add_argument("--detector-param", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_misinformation_epochs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--misinformation-epochs", type=positive_int, default=5, metavar="N",
                        help="adaptive-misinformation: epochs to train its model on first use (default: 5)")


def defended_victim(required: bool, remote: bool = False) -> argparse.ArgumentParser:
    """--victim, --defense and its --param items (defend needs a defense; the others default to
    none, and attack also takes the URL of a `divqat serve` API)."""
    parent = argparse.ArgumentParser(add_help=False)
    if remote:
        parent.add_argument("--victim", required=True, metavar="DIR|FILE|URL",
                            help="the victim directory (from `divqat train`), a device program "
                                 "(from `divqat export`), or the URL of a `divqat serve` API")
    else:
        parent.add_argument("--victim", required=True, metavar="DIR", help=VICTIM_HELP)
    if required:
        parent.add_argument("--defense", required=True, metavar="NAME",
                            help="a defense name (see `divqat defenses`)")
    else:
        parent.add_argument("--defense", default="none", metavar="NAME",
                            help="the defense behind the black box (see `divqat defenses`; default: none)")
    add_defense_param(parent)
    return parent


ARCH_HELP = ("a built-in architecture ({names}), torchvision:NAME (any torchvision classification "
             "model, e.g. torchvision:mobilenet_v3_small), timm:NAME, or package.module:function "
             "(your own factory, called with num_classes= and in_channels=)")


def arch_help(what: str, default: str = "resnet8") -> str:
    """The --arch / --surrogate help: every form of architecture spec, and the default."""
    from divqat.models import model_names

    return f"{what}: {ARCH_HELP.format(names=', '.join(model_names()))} (default: {default})"


def data_options() -> argparse.ArgumentParser:
    """--dataset and --image-size: the data a victim is trained on or imported for."""
    from divqat.data import dataset_names

    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--dataset", required=True, metavar="NAME",
                        help=f"dataset: {', '.join(dataset_names())}; NAME[a-b] or NAME[a,b,c] "
                             "keeps those classes only, relabelled 0..k-1 (e.g. fashion-mnist[0-4])")
    parent.add_argument("--image-size", metavar="H[xW]", default=None,
                        help="image-folder: resize the shorter side and center-crop to this size, "
                             "e.g. 96 or 96x128 (default: 32x32, aspect not kept)")
    return parent


def dataset_name(args: argparse.Namespace) -> str:
    """--dataset with --image-size folded into its name (``image-folder@96``), the spelling the
    victim records and every later command reloads its data by."""
    if args.image_size is None:
        return args.dataset
    from divqat.data import parse_image_size, sized_name

    return sized_name(args.dataset, parse_image_size(args.image_size))


def described(sub, name: str, help: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """A command whose long description keeps its own line breaks (examples, lists)."""
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def surrogate_training(args: argparse.Namespace):
    """The thief's surrogate recipe from a command's options. attack takes the whole recipe;
    detect only the architecture and the length, the rest stays at the recipe's defaults."""
    from divqat.attacks import SurrogateTraining

    optional = {name: getattr(args, name) for name in ("batch_size", "lr", "temperature", "precision",
                                                       "eval_precision") if hasattr(args, name)}
    return SurrogateTraining(arch=args.surrogate, epochs=args.epochs, min_steps=args.min_steps,
                             seed=args.seed, device=args.device, progress=not args.no_progress,
                             **optional)


def print_params_listing(rows: list[tuple[str, str, dict, list[tuple[str, str]]]]) -> None:
    """`divqat defenses|attacks|detectors`: each name with its summary, then indented lines
    (params first, then what the row adds)."""
    from divqat.registry import params_text

    width = max(len(name) for name, _, _, _ in rows)
    for name, summary, params, extra in rows:
        print(f"{name:<{width}}  {summary}")
        print(f"{'':<{width}}  params: {params_text(params, ', ') or 'none'}")
        for label, text in extra:
            print(f"{'':<{width}}  {label}: {text}")


def run_context(args: argparse.Namespace, *, quiet_log: bool = False):
    """The drivers' ``RunContext`` from the runtime options (data root, device, progress bars);
    its log lines go to stderr (with ``quiet_log``: none under --no-progress)."""
    from divqat.pipelines.context import RunContext

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    no_progress = getattr(args, "no_progress", False)
    return RunContext(data_root=getattr(args, "data_root", None), device=getattr(args, "device", "cpu"),
                      progress=not no_progress, log=None if quiet_log and no_progress else log)

