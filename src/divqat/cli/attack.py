"""`divqat attack` (steal a victim through the black box, locally or over HTTP) and `divqat attacks`
(the list)."""

from __future__ import annotations

import argparse
import os

from divqat.cli import _common as common
from divqat.cli.device import cmd_copy
from divqat.registry import params_text

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

Thieves that know (see the attacks guide): recovery (the defense it is served with, or
--attack-param defense=NAME defense_params=k=v,...; over HTTP it must be named), fixmatch (its
unqueried transfer images unlabeled), averaging (views=M queries per image, all counted), sybil
(attack=NAME keys=K: one box per key in process, --api-key-file K1 ... KK over HTTP).

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


def register(sub) -> None:
    from divqat.train.trainer import PRECISIONS

    a = common.described(sub, "attack", "run an extraction attack against a (defended) victim", ATTACK_HELP,
                  parents=[common.runtime_options(), common.defended_victim(required=False, remote=True),
                           common.seed_option("seed of the thief (and of a defense's model) (default: 0)"),
                           common.out_option()])
    a.add_argument("--attack", required=True, metavar="NAME", help="an attack name (see `divqat attacks`), or "
                   "copy: the on-device thief who copies the program file")
    a.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack parameter, repeatable (e.g. --attack-param reward=cert)")
    a.add_argument("--transfer", metavar="SET", help="the thief's transfer set: holdout or NAME[:SPLIT]")
    a.add_argument("--budget", type=common.positive_int, nargs="+", metavar="N",
                   help="query budget(s); one surrogate per budget (required, except for --attack copy)")
    a.add_argument("--labels-only", action="store_true", help="the black box answers labels only")
    a.add_argument("--surrogate", default="resnet8", metavar="ARCH",
                   help=common.arch_help("the thief's surrogate architecture"))
    a.add_argument("--epochs", type=common.positive_int, default=30,
                   help="surrogate training epochs over the stored queries (default: 30)")
    a.add_argument("--min-steps", type=int, default=0, metavar="N",
                   help="at least N optimizer steps per surrogate: small budgets get more epochs "
                        "(default: 0, --epochs as given)")
    a.add_argument("--batch-size", type=common.positive_int, default=128, help="surrogate batch size (default: 128)")
    a.add_argument("--lr", type=float, default=0.1, help="surrogate peak learning rate, cosine (default: 0.1)")
    a.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the soft cross-entropy (default: 1)")
    a.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="surrogate training: bf16 autocast where the CPU has it (default: fp32)")
    a.add_argument("--eval-precision", default="fp32", choices=PRECISIONS,
                   help="the surrogates' test-split pass: bf16 autocast with BatchNorm folded where "
                        "the CPU has it (default: fp32)")
    a.add_argument("--watermark", type=float, default=None, metavar="RATE",
                   help="watermark this fraction of the thief's answers (DAWN; after the defense, "
                        "e.g. 0.005): says how many were marked and keeps the marks in OUT/marks.npz "
                        "for `divqat verify` (default: none)")
    a.add_argument("--save-surrogate", metavar="PATH",
                   help="write the stolen surrogate as a model file `divqat verify --suspect` loads "
                        "(several budgets: PATH's stem-BUDGET, e.g. stolen-1000.pt) (default: not written)")
    _add_remote_attack_options(a)
    a.set_defaults(func=cmd_attack)

    al = sub.add_parser("attacks", help="list the attacks with their parameters and defaults")
    al.set_defaults(func=cmd_attacks)


def _is_url(victim: str) -> bool:
    return victim.startswith(("http://", "https://"))


def _add_remote_attack_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--api-key-file", metavar="FILE", nargs="+",
                   help="with --victim URL: the thief's API key (a file holding the key `divqat keys "
                        "create` printed); a Sybil thief (--attack sybil) gives one file per key")
    a.add_argument("--eval-key-file", metavar="FILE",
                   help="with --victim URL: a separate key for measuring the victim's answers on its "
                        "test split (agreement, defender accuracy); without it they are left out")
    a.add_argument("--insecure", action="store_true",
                   help="with --victim http://HOST: send the API keys over plain HTTP to a host that is "
                        "not loopback (refused without it: use https://)")


def _refuse_remote_options(args: argparse.Namespace) -> None:
    from divqat.errors import ConfigError

    if args.api_key_file or args.eval_key_file or args.insecure:
        raise ConfigError("--api-key-file, --eval-key-file and --insecure go with --victim http://HOST:PORT")


def cmd_attack(args: argparse.Namespace) -> int:
    from divqat.errors import ConfigError
    from divqat.pipelines.attack import AttackRequest, attack_victim
    from divqat.registry import parse_params

    if _is_url(args.victim):
        return cmd_attack_remote(args)
    _refuse_remote_options(args)
    common.set_threads(args.threads)
    if args.attack == "copy":
        if args.watermark is not None or args.save_surrogate:
            raise ConfigError("--attack copy sends no queries and trains no surrogate: drop --watermark "
                              "and --save-surrogate")
        return cmd_copy(args)
    if not args.budget:
        raise ConfigError("--budget N [N ...] is required (one surrogate per budget)")
    training = common.surrogate_training(args)
    m = attack_victim(AttackRequest(args.victim, args.attack, args.budget,
                                    parse_params(args.attack_param), defense=args.defense,
                                    defense_params=parse_params(args.param), transfer=args.transfer,
                                    training=training, labels_only=args.labels_only, out=args.out,
                                    watermark=args.watermark, save_surrogate=args.save_surrogate),
                      common.run_context(args))
    params = params_text(m["defense_params"], ", ")
    kind = "label-only" if m["labels_only"] else "soft-label"
    for i, key in enumerate(m.get("streams") or []):
        print(f"key {i + 1}: {key['queries_used']} of {key['budget']} queries")
    for r in m["results"]:
        print(f"{m['attack']} ({kind}, {m['transfer_set'] or 'data-free'}) vs {m['victim_mode']} victim "
              f"+ {m['defense']}({params}): budget {r['budget']}: adversary accuracy "
              f"{r['adversary_accuracy']:.2%} (error {r['adversary_error']:.2%}), agreement "
              f"{r['agreement']:.2%}, {r['queries_used']} queries, {r['seconds']:.0f} s")
        for line in _thief_notes(r):
            print(line)
    print(f"defender accuracy {m['defender_accuracy']:.2%} (undefended {m['victim_accuracy']:.2%}), "
          f"L1 {m['l1_distance']:.4f} -> {os.path.join(args.out, 'metrics.json')}")
    _print_ownership(m)
    return 0


def _print_ownership(m: dict) -> None:
    """The watermark's and the saved surrogates' lines, where the attack had them."""
    w = m.get("watermark")
    if w:
        print(f"watermark (rate {w['rate']:g}): {w['marked']} of {w['answered']} answers marked "
              f"({w['marked_fraction']:.2%}); {w['distinct_marks']} marked inputs and {w['controls']} "
              f"controls kept -> {w['marks_file']}; an honest user asking the test split: "
              f"{w['test_answers_marked']} answers marked, accuracy {w['defender_accuracy_watermarked']:.2%}")
    for budget, path in (m.get("surrogate_files") or {}).items():
        print(f"surrogate of budget {budget} -> {path}")


def _thief_notes(row: dict) -> list[str]:
    """What a thief that knows did with its answers, from a result's ``info``."""
    info = row.get("info") or {}
    recovery = info.get("recovery")
    if not recovery:
        return []
    known = info["defense_known"]
    if not recovery["applied"]:
        return [f"  recovery ({known['name']}): not applied, {recovery['why']}"]
    line = f"  recovery ({known['name']} {params_text(known['params'])}".rstrip() + "): "
    if "l1_recovered" in recovery:
        line += (f"L1 to the shadow's clean posteriors {recovery['l1_perturbed']:.4f} perturbed, "
                 f"{recovery['l1_recovered']:.4f} recovered; ")
    return [line + f"the victim's answers moved by L1 {recovery['answers_moved_l1']:.4f}"]


def cmd_attacks(args: argparse.Namespace) -> int:
    from divqat.attacks import describe_attacks

    common.print_params_listing([(name, summary, defaults, []) for name, summary, defaults
                          in describe_attacks()])
    return 0


def cmd_attack_remote(args: argparse.Namespace) -> int:
    from divqat.errors import ConfigError
    from divqat.pipelines.attack import AttackRequest, ServiceAccess, attack_remote
    from divqat.registry import parse_params
    from divqat.remote import read_key_file

    if not args.api_key_file:
        raise ConfigError("--victim URL needs --api-key-file FILE (the thief's key, `divqat keys create`)")
    if args.defense != "none" or args.param:
        raise ConfigError("over HTTP the defense is the service's (`divqat serve --defense`); "
                          "drop --defense and --param")
    common.set_threads(args.threads)
    training = common.surrogate_training(args)
    keys = [read_key_file(f) for f in args.api_key_file]
    m = attack_remote(AttackRequest(args.victim, args.attack, args.budget,
                                    parse_params(args.attack_param), transfer=args.transfer,
                                    training=training, labels_only=args.labels_only, out=args.out,
                                    watermark=args.watermark, save_surrogate=args.save_surrogate),
                      ServiceAccess(keys[0],
                                    read_key_file(args.eval_key_file) if args.eval_key_file else None,
                                    insecure=args.insecure, more_keys=tuple(keys[1:])),
                      common.run_context(args))
    kind = "label-only" if m["labels_only"] else f"{m['remote']['output']} answers"
    for r in m["results"]:
        agreement = "" if r["agreement"] is None else f", agreement {r['agreement']:.2%}"
        print(f"{m['attack']} ({kind}, {m['transfer_set'] or 'data-free'}) vs {m['victim']}: budget "
              f"{r['budget']}: adversary accuracy {r['adversary_accuracy']:.2%} (error "
              f"{r['adversary_error']:.2%}){agreement}, {r['queries_used']} queries, {r['seconds']:.0f} s")
        for line in _thief_notes(r):
            print(line)
    if m["defender_accuracy"] is not None:
        print(f"defender accuracy {m['defender_accuracy']:.2%} (with the evaluation key)")
    for i, key in enumerate(m.get("streams") or []):
        print(f"key {i + 1}: {key['queries_used']} images counted by the service, {key['left']} left")
    print(f"thief's key{'s' if m.get('streams') else ''}: {m['queries_used']} images counted by the "
          f"service, {m['remote']['key_left']} left{' on the first' if m.get('streams') else ''}; "
          f"left out: {', '.join(m['left_out'])} -> {os.path.join(args.out, 'metrics.json')}")
    _print_ownership(m)
    return 0
