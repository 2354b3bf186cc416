"""`divqat defend` (a defense's cost and effect on a victim) and `divqat defenses` (the list)."""

from __future__ import annotations

import argparse
import os

from divqat.cli import _common as common
from divqat.registry import params_text

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


def register(sub) -> None:
    d = common.described(sub, "defend", "evaluate a defense on a victim", DEFEND_HELP,
                  parents=[common.runtime_options(), common.defended_victim(required=True),
                           common.seed_option("seed of the model a defense builds (MAD's surrogate, "
                                       "the misinformation model) (default: 0)"),
                           common.out_option()])
    d.add_argument("--queries", metavar="NAME[:SPLIT]",
                   help="query set: any dataset, adapted to the victim's input (default: the victim's "
                        "own test split)")
    d.add_argument("--limit", type=common.positive_int, default=None, metavar="N", help="use the first N query images only")
    d.add_argument("--batch-size", type=common.positive_int, default=256, help="images per query (default: 256)")
    common.add_misinformation_epochs(d)
    d.add_argument("--retrain-misinformation", action="store_true",
                   help="adaptive-misinformation: retrain its model even if one is saved")
    d.set_defaults(func=cmd_defend)

    ds = sub.add_parser("defenses", help="list the defenses with their parameters and defaults")
    ds.set_defaults(func=cmd_defenses)


def cmd_defend(args: argparse.Namespace) -> int:
    from divqat.pipelines.defend import DefendRequest, defend_victim
    from divqat.registry import parse_params

    common.set_threads(args.threads)
    m = defend_victim(DefendRequest(args.victim, args.defense, parse_params(args.param),
                                    queries=args.queries, limit=args.limit,
                                    batch_size=args.batch_size, seed=args.seed,
                                    misinformation_epochs=args.misinformation_epochs,
                                    retrain_misinformation=args.retrain_misinformation, out=args.out),
                      common.run_context(args))
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

    common.print_params_listing([(r["name"], r["summary"], r["params"],
                           [("model", r["model"])] if r["model"] else []) for r in list_defenses()])
    return 0
