"""What several commands share: JSON and warning output, and the options `infer`, `serve`,
`inspect` and `center card` take alike."""

from __future__ import annotations

import argparse
import json
import sys


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def warn(lines) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def add_max_voxels(s) -> None:
    s.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse a study (or a resampled grid) of more than N voxels before "
                        "decoding it (default 536870912, or $MEDFOUND_MAX_VOXELS)")


def add_detection_options(s: argparse.ArgumentParser) -> None:
    """--threshold and --max-findings, as `infer` and `serve` both take them."""
    s.add_argument("--threshold", type=float, default=0.5,
                   help="report findings with probability ≥ this (default 0.5)")
    s.add_argument("--max-findings", type=int, default=20, help="at most this many per study")


def add_engine_options(s: argparse.ArgumentParser) -> None:
    """--engine, --precision and --threads: what runs the network, for `infer` and `serve`."""
    s.add_argument("--engine", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="what runs the network; auto (default): the fastest variant the model "
                        "card's export gate passed that this machine can run (onnxruntime fp32 "
                        "for an export without measured variants, or with a GPU provider)")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                   help="network arithmetic: fp32, bf16 (OpenVINO, on a CPU with bf16), int8 "
                        "(model.int8.onnx); a variant that failed the export gate is refused; "
                        "auto (default) as for --engine")
    s.add_argument("--threads", type=int, help="the engine's intra-op threads (default: all cores)")


def command_group(sub, name: str, help_: str, description: str):
    """`medfound NAME COMMAND ...`: a parser whose sub-commands are added to the returned
    action; `medfound NAME` alone prints its help and exits with 2."""
    group = sub.add_parser(name, help=help_, description=description)
    commands = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
    group.set_defaults(func=lambda a: (group.print_help(), 2)[1])
    return commands
