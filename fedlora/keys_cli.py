"""``fedlora keys``: create, export and enroll the keys of sealed mode.

fedlora keys coordinator --out DIR [--kem x25519|mlkem768-x25519]
fedlora keys site SITE_ID --out DIR
fedlora keys export-public PRIVATE --out FILE
fedlora keys enroll --allow-list FILE SITE_ID PUBLIC_KEY [--replace]
fedlora keys init --out DIR --sites a,b,c [--san HOSTS]     (a deployment: CA, TLS, bundles)
fedlora keys add-site --out DIR SITE [--replace] [--public-keys FOLDER]   (enroll one site)
fedlora keys site-keygen --out BUNDLE SITE                 (at a site: its own private keys)

The commands print the paths they write and SHA-256 fingerprints of public keys (to compare
out of band, e.g. over the phone, before enrolling); they never print key material.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape

from common.allow_list import add_site
from common.errors import FedloraError
from common.keys import (
    KEMS,
    export_public,
    generate_coordinator_key,
    generate_site_key,
    load_coordinator_public,
    load_public_key,
    load_site_public,
    public_fingerprint,
    public_path_for,
)
from common.progress import console
from fedlora.arg_types import output_folder
from fedlora.deploy_keys import add_deployment_parsers, run_deployment_command

KEYS_DESCRIPTION = """\
Keys of the sealed privacy mode. Each site seals its adapter delta to the coordinator's
public key (HPKE) and signs it with its own Ed25519 identity key; the coordinator opens only
envelopes signed by a site on its allow-list.

files:
  coordinator.key   the coordinator's private HPKE key; stays on the coordinator (mode 0600)
  coordinator.pub   its public half; copy it to every site
  SITE.key          a site's private Ed25519 identity key; stays at the site (mode 0600)
  SITE.pub          its public half; send it to the coordinator, who enrolls it
  allow-list        on the coordinator: a .json file (or a folder of SITE.pub files) of the
                    enrolled sites' public keys

Private keys are written with mode 0600 and never overwritten; a private key readable by
group or others is refused when loaded (fix it with `chmod 600 FILE`). No command prints
key material, only file paths and SHA-256 fingerprints of public keys.
"""

KEYS_EPILOG = """\
examples:
  fedlora keys coordinator --out keys/                      # on the coordinator
  fedlora keys site hospital-a --out keys/                  # at site hospital-a
  fedlora keys enroll --allow-list keys/allow.json hospital-a hospital-a.pub
  fedlora keys export-public keys/coordinator.key --out coordinator.pub

deployment (SuperLink TLS + SuperNode auth + envelope keys, one bundle per site):
  fedlora keys init --out deploy/keys --sites hospital-a,hospital-b --san coord.example.org
  fedlora keys add-site --out deploy/keys hospital-c
"""


def add_keys_parser(subparsers: Any) -> None:
    """Add ``keys`` and its sub-commands to the ``fedlora`` sub-parsers (``add_subparsers()``)."""
    keys = subparsers.add_parser(
        "keys",
        help="create, export and enroll keys for sealed mode (private keys are 0600)",
        description=KEYS_DESCRIPTION,
        epilog=KEYS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    _add_generate_parsers(sub)
    _add_export_and_enroll_parsers(sub)
    add_deployment_parsers(sub)


def _add_generate_parsers(sub: Any) -> None:
    coordinator = sub.add_parser(
        "coordinator",
        help="create the coordinator's key pair: DIR/coordinator.key (0600) + coordinator.pub",
        description="Create the coordinator's HPKE key pair. coordinator.key (mode 0600) "
        "decrypts every site's delta and never leaves the coordinator; coordinator.pub goes "
        "to every site.",
    )
    coordinator.add_argument(
        "--out", type=output_folder, required=True, help="folder (created 0700)"
    )
    coordinator.add_argument(
        "--kem",
        choices=KEMS,
        default="x25519",
        help="x25519 (default) or mlkem768-x25519, a hybrid post-quantum KEM that keeps "
        "recorded traffic safe from a future quantum computer (envelopes ~1.1 KB larger)",
    )
    site = sub.add_parser(
        "site",
        help="create a site's identity key pair: DIR/SITE_ID.key (0600) + SITE_ID.pub",
        description="Create a site's Ed25519 identity key pair. SITE_ID.key (mode 0600) signs "
        "the site's envelopes and stays at the site; send SITE_ID.pub to the coordinator.",
    )
    site.add_argument("site_id", metavar="SITE_ID", help="the site's id, e.g. hospital-a")
    site.add_argument("--out", type=output_folder, required=True, help="folder (created 0700)")


def _add_export_and_enroll_parsers(sub: Any) -> None:
    export = sub.add_parser(
        "export-public",
        help="write the public half of a private key file (coordinator or site)",
        description="Write the public half of PRIVATE (a coordinator.key or SITE.key) to FILE.",
    )
    export.add_argument("private", type=Path, metavar="PRIVATE", help="a private key file")
    export.add_argument("--out", type=Path, required=True, help="public key file to write")
    enroll = sub.add_parser(
        "enroll",
        help="add a site's public key to the coordinator's allow-list",
        description="Enroll SITE_ID with PUBLIC_KEY (its SITE.pub). The allow-list is a .json "
        "file (created if missing) or an existing folder of SITE.pub files. Compare the "
        "printed fingerprint with the one the site printed before trusting the key.",
    )
    enroll.add_argument("--allow-list", type=Path, required=True, help=".json file or folder")
    enroll.add_argument("site_id", metavar="SITE_ID", help="the site's id")
    enroll.add_argument("public_key", type=Path, metavar="PUBLIC_KEY", help="the site's .pub")
    enroll.add_argument(
        "--replace", action="store_true", help="rotate: replace the key of an enrolled site"
    )


def _report(label: str, path: Path, fingerprint: str | None = None) -> None:
    suffix = f"  ({fingerprint})" if fingerprint else ""
    console.print(f"{label}: {escape(str(path))}{suffix}", soft_wrap=True)


def _run(args: argparse.Namespace) -> None:
    if args.keys_command == "coordinator":
        private = generate_coordinator_key(args.out, args.kem)
        public = public_path_for(private)
        _report(f"wrote private key ({args.kem}, mode 0600)", private)
        _report("wrote public key", public, public_fingerprint(load_coordinator_public(public)))
    elif args.keys_command == "site":
        private = generate_site_key(args.out, args.site_id)
        public = public_path_for(private)
        _report("wrote private key (Ed25519, mode 0600)", private)
        _report("wrote public key", public, public_fingerprint(load_site_public(public)))
    elif args.keys_command == "export-public":
        out = export_public(args.private, args.out)
        _report("wrote public key", out, public_fingerprint(load_public_key(out)))
    elif args.keys_command == "enroll":
        target = add_site(args.allow_list, args.site_id, args.public_key, replace=args.replace)
        fingerprint = public_fingerprint(load_site_public(args.public_key))
        _report(f"enrolled site {args.site_id} in", target, fingerprint)
    elif args.keys_command in ("init", "add-site", "site-keygen"):
        run_deployment_command(args)
    else:  # argparse's choices make this unreachable
        raise ValueError(f"unknown keys command {args.keys_command!r}")


def run_keys(args: argparse.Namespace) -> int:
    """Run a parsed ``fedlora keys ...`` command; 0 on success, 2 with one error line."""
    try:
        _run(args)
    except FedloraError as exc:
        console.print(f"[red]error[/]: {escape(str(exc))}", soft_wrap=True)
        return 2
    return 0
