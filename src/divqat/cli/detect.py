"""Extraction detectors: `divqat detectors` (the list), `divqat calibrate` (a threshold for a
false-alarm rate, kept with the victim) and `divqat detect` (how soon they catch a thief)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from divqat.cli import _common as common

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
  divqat calibrate --victim runs/qat --detector mmd --detector-param window=256 --streams 40 \\
      --length 5000
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


def register(sub) -> None:

    dl = sub.add_parser("detectors", help="list the extraction detectors with their parameters and defaults")
    dl.set_defaults(func=cmd_detectors)

    c = common.described(sub, "calibrate", "calibrate an extraction detector's threshold on a victim", CALIBRATE_HELP,
                  parents=[common.runtime_options("unused: calibration runs on the CPU (default: cpu)"),
                           common.seed_option()])
    c.add_argument("--victim", required=True, metavar="DIR", help=common.VICTIM_HELP)
    c.add_argument("--detector", required=True, action="append", metavar="NAME",
                   help="a detector (see `divqat detectors`); one per run")
    common.add_detector_param(c, "a detector parameter, repeatable (e.g. --detector-param window=256; "
                          "default: the detector's)")
    c.add_argument("--target-far", type=float, default=0.05, metavar="RATE",
                   help="share of benign streams allowed to raise the alarm (default: 0.05)")
    c.add_argument("--streams", type=common.positive_int, default=40, help="benign streams (default: 40)")
    c.add_argument("--length", type=common.positive_int, default=5000, metavar="N",
                   help="queries per benign stream: the stream length the rate holds for (default: 5000)")
    c.add_argument("--reference-size", type=common.positive_int, default=1000, metavar="N",
                   help="mmd: benign reference images (default: 1000)")
    c.set_defaults(func=cmd_calibrate)

    d = common.described(sub, "detect", "measure extraction detectors against an attack", DETECT_HELP,
                  parents=[common.runtime_options(), common.defended_victim(required=False),
                           common.seed_option("seed of the thief and of the benign streams (default: 0)"),
                           common.out_option()])
    d.add_argument("--detector", required=True, action="append", metavar="NAME",
                   help="a detector (see `divqat detectors`); repeat it to watch the same stream with several")
    common.add_detector_param(d, "a parameter of the (single) detector, repeatable (default: its calibration's)")
    d.add_argument("--attack", required=True, metavar="NAME", help="an attack (see `divqat attacks`)")
    d.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack parameter, repeatable (e.g. --attack-param mix=0.5 for knockoff)")
    d.add_argument("--transfer", metavar="SET", help="the thief's transfer set: holdout or NAME[:SPLIT]")
    d.add_argument("--benign", default="holdout", metavar="SET",
                   help="the evasive knockoff thief's benign-looking images (default: holdout)")
    d.add_argument("--budget", type=common.positive_int, required=True, metavar="N", help="the thief's query budget")
    d.add_argument("--labels-only", action="store_true", help="the black box answers labels only")
    d.add_argument("--benign-streams", type=int, default=20, metavar="N",
                   help="honest clients for the false-alarm rate (default: 20; 0 skips it)")
    d.add_argument("--surrogate", default="resnet8", metavar="ARCH",
                   help=common.arch_help("the thief's surrogate architecture"))
    d.add_argument("--epochs", type=common.positive_int, default=5,
                   help="surrogate epochs (jbda's substitutes, the adaptive thief) (default: 5)")
    d.add_argument("--min-steps", type=int, default=150, metavar="N",
                   help="at least N optimizer steps per surrogate (default: 150, as the default experiment)")
    d.set_defaults(func=cmd_detect)


def cmd_detectors(args: argparse.Namespace) -> int:
    from divqat.pipelines.detect import list_detectors

    rows = []
    for r in list_detectors():
        alarm = r["alarm"] + ("; needs `divqat calibrate` first" if r["needs_calibration"] else "")
        rows.append((r["name"], r["summary"], r["params"],
                     [("alarm", alarm)] + ([("model", r["model"])] if r["model"] else [])))
    common.print_params_listing(rows)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from divqat.pipelines.detect import CalibrateRequest, calibrate_detector, calibration_path
    from divqat.registry import parse_params

    if len(args.detector) > 1:  # argparse would keep the last one silently
        from divqat.errors import ConfigError

        raise ConfigError(f"calibrate one detector per run (got --detector {' --detector '.join(args.detector)}): "
                          "run `divqat calibrate` once for each")
    args.detector = args.detector[0]
    common.set_threads(args.threads)
    r = calibrate_detector(CalibrateRequest(args.victim, args.detector,
                                            parse_params(args.detector_param),
                                            target_far=args.target_far, streams=args.streams,
                                            length=args.length, reference_size=args.reference_size,
                                            seed=args.seed),
                           # The victim's features are computed on the CPU, as before.
                           dataclasses.replace(common.run_context(args, quiet_log=True), device="cpu"))
    worst = sorted(w for w in r["worst_scores"] if w is not None)
    print(f"{args.detector}: {r['threshold_param']} = {r['threshold']:.6g} (alarm when the score is "
          f"{r['alarm_when']} it) for a false-alarm rate <= {r['target_far']:g} over {r['streams']} "
          f"benign streams of {r['length']} queries ({r['benign']}): {r['in_sample_false_alarms']} "
          f"raise it; their most suspicious scores range {worst[0]:.6g} .. {worst[-1]:.6g}; "
          f"{r['seconds']:.0f} s -> {calibration_path(args.victim, args.detector)}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from divqat.errors import ConfigError
    from divqat.pipelines.detect import DetectRequest, detect_attack
    from divqat.registry import parse_params

    common.set_threads(args.threads)
    names = list(dict.fromkeys(args.detector))
    if args.detector_param and len(names) > 1:
        raise ConfigError("--detector-param goes with a single --detector")
    params = parse_params(args.detector_param)
    training = common.surrogate_training(args)
    m = detect_attack(DetectRequest(args.victim, {n: params for n in names}, args.attack, args.budget,
                                    parse_params(args.attack_param), transfer=args.transfer,
                                    benign=args.benign, defense=args.defense,
                                    defense_params=parse_params(args.param), training=training,
                                    labels_only=args.labels_only, benign_streams=args.benign_streams,
                                    seed=args.seed, out=args.out),
                      common.run_context(args))
    thief = m["attack"] + (f" (mix {m['mix']:g})" if m.get("mix") else "")
    source = m["transfer_set"] or "data-free"
    for name, r in m["detectors"].items():
        found = (f"alarm after {r['first_alarm']} queries" if r["detected"]
                 else f"not raised within {m['queries_used']} queries")
        line = (f"{name} vs {thief} ({source}) on the {m['victim_mode']} victim + {m['defense']}: "
                f"{found} (most suspicious score {r['worst_score']}, {r['tests']} tests)")
        if "service_wide" in r:  # a Sybil thief: each key alone, then the keys' union
            union = r["service_wide"]
            line = (f"{name} vs {thief} over {r['keys']} keys ({source}) on the {m['victim_mode']} "
                    f"victim + {m['defense']}: {r['keys_flagged_alone']} of {r['keys']} keys raised "
                    "it alone" + (f" (earliest after {r['first_alarm']} of a key's queries)"
                                  if r["detected"] else "")
                    + "; service-wide view: " + (f"alarm after {union['first_alarm']} queries of all keys"
                                                if union["detected"] else
                                                f"not raised within {union['queries']} queries"))
            if "per_key_false_alarms" in r:
                k = r["per_key_false_alarms"]
                line += (f"; false alarms per key {k['false_alarms']}/{k['benign_streams']} of "
                         f"{k['benign_length']}")
        if "false_alarm_rate" in r:
            line += (f"; false alarms {r['false_alarms']}/{r['benign_streams']} benign streams of "
                     f"{r['benign_length']} ({r['false_alarm_rate']:.1%})")
        if not r["calibrated"]:
            line += "; uncalibrated (the detector's default threshold)"
        print(line)
    print(f"-> {os.path.join(args.out, 'metrics.json')}")
    return 0

