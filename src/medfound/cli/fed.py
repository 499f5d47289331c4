"""`medfound fed COMMAND`: the coordinator's side of a federation (superlink, register,
reconcile)."""

from __future__ import annotations

from pathlib import Path

from medfound.cli.common import command_group, print_json


def add_fed(sub) -> None:
    """`medfound fed COMMAND ...`."""
    fsub = command_group(sub, "fed", "the coordinator's side of a federation",
                         "Commands the coordinator (the federation's server) runs.")
    add_fed_superlink(fsub)
    add_fed_register(fsub)
    add_fed_reconcile(fsub)


def cmd_fed_superlink(args) -> int:
    from medfound.fed.deployment import run_process, superlink_command

    cmd = superlink_command(certs=args.certs, insecure=args.insecure, address=args.address,
                            database=args.database, auth=args.auth)
    print(f"SuperLink on {args.address} ({'insecure' if args.insecure else 'TLS'}"
          f"{', registered centers only' if args.auth else ''}); Ctrl-C stops it", flush=True)
    return run_process(cmd)


def add_fed_superlink(fsub) -> None:
    """`medfound fed superlink`."""
    s = fsub.add_parser(
        "superlink", help="run the coordinator's Flower SuperLink",
        description="Start a Flower SuperLink and keep it running: centers join it with "
        "`medfound center join`, and `medfound run federate fed.mode=deployment "
        "fed.deployment.superlink=HOST:PORT ...` submits runs to it (their ServerApp runs "
        "here and writes out_dir on this machine). TLS is on by default.")
    s.add_argument("--address", default="127.0.0.1:9092", metavar="HOST:PORT",
                   help="where to listen (default 127.0.0.1:9092; 0.0.0.0:9092 for other machines)")
    s.add_argument("--certs", metavar="DIR",
                   help="folder with ca.crt, server.pem, server.key (scripts/make_certs.sh DIR)")
    s.add_argument("--insecure", action="store_true", help="no TLS (a trial on one machine only)")
    s.add_argument("--database", metavar="PATH",
                   help="SuperLink state database file: a restarted SuperLink still knows its "
                        "centers and registered keys (default: Flower's in-memory state, lost "
                        "on restart)")
    s.add_argument("--auth", action="store_true",
                   help="node authentication: only centers whose public keys were registered "
                        "(`medfound fed register`) may join; needs TLS")
    s.set_defaults(func=cmd_fed_superlink)


def cmd_fed_register(args) -> int:
    import tempfile

    from medfound.fed.deployment import register_centers

    with tempfile.TemporaryDirectory(prefix="medfound-flwr-") as home:
        ids = register_centers(args.public_keys, superlink=args.superlink,
                               root_certificates=args.root_certificates, flwr_home=home)
    for key, node in zip(args.public_keys, ids, strict=True):
        print(f"registered {key} as SuperNode {node}")
    return 0


def add_fed_register(fsub) -> None:
    """`medfound fed register CENTER.pub ...`."""
    s = fsub.add_parser(
        "register", help="admit centers to a SuperLink started with --auth",
        description="Register center public keys (CENTER.pub from `medfound center keys`) with "
        "the SuperLink, through Flower's `flwr supernode register`. A SuperNode whose key is "
        "not registered is refused.")
    s.add_argument("public_keys", nargs="+", metavar="CENTER.pub", help="public key file(s)")
    s.add_argument("--superlink", default="127.0.0.1:9092", metavar="HOST:PORT",
                   help="the SuperLink (default 127.0.0.1:9092)")
    s.add_argument("--root-certificates", required=True, metavar="CA.crt",
                   help="CA certificate the SuperLink's certificate is signed with")
    s.set_defaults(func=cmd_fed_register)


def cmd_fed_reconcile(args) -> int:
    from medfound.fed.audit import format_reconcile, reconcile

    result = reconcile(args.center_log, args.receipts)
    if args.json:
        print_json(result)
    else:
        print(format_reconcile(result))
    clean = not (result["only_center"] or result["only_coordinator"] or result["center_chain"]
                 or result["receipts_chain"])
    return 0 if clean else 1


def add_fed_reconcile(fsub) -> None:
    """`medfound fed reconcile --center-log LOG --receipts RECEIPTS`."""
    s = fsub.add_parser(
        "reconcile", help="compare a center's audit log with the coordinator's receipts",
        description="List every message one side has and the other has not: what the center's "
        "log says it sent that the coordinator has no receipt of, and the other way round, in "
        "both directions (matched by sha256 of the content). Also says whether each chain is "
        "whole. Exit 0 when both sides agree, 1 otherwise.")
    s.add_argument("--center-log", required=True, type=Path, metavar="LOG",
                   help="the center's audit log (WORK/audit/CENTER.jsonl)")
    s.add_argument("--receipts", required=True, type=Path, metavar="RECEIPTS",
                   help="the coordinator's receipts (FED/receipts.jsonl)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=cmd_fed_reconcile)
