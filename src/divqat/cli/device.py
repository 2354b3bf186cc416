"""The victim on a device: `divqat export` (an ExecuTorch program, the defense fused inside) and
the thief who holds the device (`divqat attack --attack copy`)."""

from __future__ import annotations

import argparse
import os
import sys

from divqat.cli import _common as common

EXPORT_HELP = """\
Write a victim as an ExecuTorch program (.pte) that a device runtime runs with no Python, torch or
compiler: the network lowered to XNNPACK (int8, or fp32 for an fp32 victim) with the input
normalization inside and, with --defense, the softmax and the defense after the last layer, so the
program answers defended posteriors by itself. The victim's metadata goes inside the file.
int8 victims must be trained for the device (`divqat train --mode qat|divqat --target edge`).
--encrypt-key-file seals the file (AES-256-GCM; a missing key file is created with a new key);
loading decrypts in memory only (key file from DIVQAT_KEY_FILE for the other commands). Needs
divqat[edge].

Beside FILE.pte goes FILE.fingerprint.safetensors: the victim's ownership fingerprint (IPGuard,
Cao et al. 2021: 100 inputs just across its decision boundaries, made from test images of its
dataset, with the program's labels on them and the file's sha256), against which a copy found
later is matched, even fine-tuned, pruned or requantized. It adds about 15 s of one CPU core
for a ResNet-8 on 28x28 images (docs/guides/fingerprints.md); --no-fingerprint skips it.

Fusable defenses: none (softmax only), top-k, rounding, reverse-sigmoid, dcp.

example:
  divqat train --dataset fashion-mnist --mode qat --target edge --teacher runs/fp32 --epochs 1 \\
      --out runs/edge-qat
  divqat export --victim runs/edge-qat --defense dcp --param beta=0.5 --out qat-dcp.pte
  divqat export --victim runs/edge-qat --out qat.pte --encrypt-key-file device.key
  divqat attack --attack copy --victim qat.pte --out runs/copy     # the thief who holds the device
"""


def register(sub) -> None:
    e = common.described(sub, "export", "write a victim as an ExecuTorch device program (.pte)", EXPORT_HELP,
                  parents=[common.data_root_option(), common.threads_option(),
                           common.out_option("the program file to write", metavar="FILE.pte")])
    e.add_argument("--victim", required=True, metavar="DIR", help=common.VICTIM_HELP)
    e.add_argument("--defense", metavar="NAME", help="a fusable defense to run inside the program")
    common.add_defense_param(e)
    e.add_argument("--encrypt-key-file", metavar="KEY", help="seal the file with this key (created if missing)")
    e.add_argument("--max-batch", type=common.positive_int, default=256,
                   help="the largest batch one call takes (default: 256)")
    e.add_argument("--no-fingerprint", dest="fingerprint", action="store_false",
                   help="write no ownership fingerprint beside the program")
    e.add_argument("--fingerprint-points", type=common.positive_int, default=100, metavar="N",
                   help="points in the fingerprint (default: 100)")
    e.add_argument("--fingerprint-reference", action="append", default=[], metavar="DIR",
                   help="a victim known to be independent of this one (same data, another seed or "
                        "architecture), repeatable: its agreement with the fingerprint is recorded "
                        "as a floor of the chance rate")
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from divqat.pipelines.export import export_victim
    from divqat.registry import parse_params

    common.set_threads(args.threads)
    m = export_victim(args.victim, args.out, defense=args.defense, defense_params=parse_params(args.param),
                      encrypt_key_file=args.encrypt_key_file, max_batch=args.max_batch,
                      fingerprint=args.fingerprint, fingerprint_points=args.fingerprint_points,
                      fingerprint_references=args.fingerprint_reference,
                      data_root=args.data_root, log=lambda message: print(message, file=sys.stderr))
    inside = "logits" if m["defense"] is None else (
        f"{m['defense']}({', '.join(f'{k}={v}' for k, v in m['defense_params'].items())}) posteriors")
    sealed = f", encrypted with {args.encrypt_key_file}" if m["encrypted"] else ""
    print(f"{m['mode']} {m['arch']} -> {m['out']}: {m['precision']} XNNPACK program answering {inside}, "
          f"{m['bytes'] / 1024:.1f} KiB{sealed} ({m['seconds']:.0f} s)")
    if m["fingerprint"]:
        print(f"fingerprint: {m['fingerprint_points']} points -> {m['fingerprint']} "
              f"({m['fingerprint_seconds']:.0f} s of the export)")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from divqat.pipelines.device_copy import copy_attack
    from divqat.registry import parse_params

    m = copy_attack(args.victim, **parse_params(args.attack_param), data_root=args.data_root, out=args.out)
    r = m["results"][0]
    if r["adversary_accuracy"] is None:
        print(f"copy of {args.victim}: {m['note']} -> {os.path.join(args.out, 'metrics.json')}")
    else:
        print(f"copy of {args.victim} ({m['victim_mode']} {m['victim_arch']}): adversary accuracy "
              f"{r['adversary_accuracy']:.2%} (victim {m['victim_accuracy']:.2%}), agreement {r['agreement']:.2%}, "
              f"largest posterior difference {r['max_posterior_difference']:.1e}, 0 queries, "
              f"{r['seconds']:.1f} s -> {os.path.join(args.out, 'metrics.json')}")
    owner = m["fingerprint"]
    if owner is not None:
        found = [*(["identical file"] if owner["identical_file"] else []),
                 *([f"{owner['agreed']} of {owner['points']} points"] if owner["agreed"] is not None else [])]
        print(f"the owner's fingerprint: copy {'verified' if owner['verified'] else 'not verified'} "
              f"({', '.join(found) or 'nothing matched'}; p {owner['p_value']:.1e})")
    return 0

