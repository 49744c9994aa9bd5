"""Provisioning a deployment: a private CA, the coordinator's TLS and envelope keys, site bundles.

``fedlora keys init --out DIR --sites a,b,c [--san 127.0.0.1,localhost]`` writes::

    DIR/ca/ca.key, ca.crt                 the private CA (keep ca.key offline once done)
        enroll.key, enroll.pub                        signs the roster of site keys (offline too)
    DIR/coordinator/                      everything the coordinator needs
        ca.crt, superlink.crt, superlink.key          SuperLink TLS (cert signed by the CA)
        coordinator.key, coordinator.pub              HPKE envelope key (sites seal to it)
        coordinator-sign.key, coordinator-sign.pub    Ed25519 key that signs every instruction
        roster.signed                                 site keys signed by the enrollment key
        allow-list.json                               site envelope public keys (Ed25519)
        supernodes/<site>.pub                         SuperNode auth public keys (OpenSSH)
    DIR/sites/<site>/                     one bundle per site, handed to that site only
        ca.crt, coordinator.pub, coordinator-sign.pub whom to trust
        enroll.pub                                    checks the roster of site keys
        <site>.key, <site>.pub                        envelope signing key (Ed25519)
        supernode.key, supernode.pub                  SuperNode auth key (ECDSA P-256, OpenSSH)

``fedlora keys add-site --out DIR SITE [--replace]`` enrolls one more site later (or
rotates a site's keys with ``--replace``). Private keys are written with mode 0600 and never
printed; the commands print paths and SHA-256 fingerprints of public keys.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.markup import escape

from common.allow_list import add_site, load_allow_list
from common.instructions import INSTRUCTION_KEY_ID, INSTRUCTION_PUBLIC_NAME
from common.keys import (
    COORDINATOR_KEY_NAME,
    KEMS,
    PRIVATE_SUFFIX,
    PUBLIC_SUFFIX,
    KeyMaterialError,
    check_site_id,
    generate_coordinator_key,
    generate_site_key,
    load_site_private,
    load_site_public,
    public_fingerprint,
    public_path_for,
    write_new_file,
)
from common.progress import console
from common.roster import (
    ENROLL_KEY_ID,
    ENROLL_KEY_NAME,
    ENROLL_PUBLIC_NAME,
    ROSTER_FILE,
    write_roster,
)
from fedlora.arg_types import output_folder
from fedlora.help_text import doc_after_title

# File names inside a provisioning folder (the coordinator and site configs refer to them).
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
TLS_CERT = "superlink.crt"
TLS_KEY = "superlink.key"
ALLOW_LIST = "allow-list.json"
SUPERNODES_DIR = "supernodes"
NODE_KEY = "supernode.key"  # a site's SuperNode auth key (ECDSA P-256, OpenSSH format)
NODE_PUB = "supernode.pub"
COORDINATOR_PUB = "coordinator.pub"

# Validity (days): the CA outlives several server certificates; rotate the server's yearly.
# Always in the SuperLink's certificate: `fedlora coordinator` reaches it on loopback.
LOOPBACK_SAN = ("127.0.0.1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 397
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class Layout:
    """Where ``keys init`` puts each file under its ``--out`` folder."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def allow_list(self) -> Path:
        return self.coordinator / ALLOW_LIST

    @property
    def supernodes(self) -> Path:
        return self.coordinator / SUPERNODES_DIR

    def site(self, site_id: str) -> Path:
        return self.root / "sites" / check_site_id(site_id)


# ---------------------------------------------------------------------------- files


def _write(path: Path, data: bytes, mode: int, replace: bool = False) -> None:
    """``write_new_file`` into a 0700 folder (created if missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_new_file(path, data, mode, replace)


def _copy_public(source: Path, target: Path, replace: bool = False) -> None:
    if target.exists() and target.read_bytes() == source.read_bytes():
        return
    _write(target, source.read_bytes(), _PUBLIC_MODE, replace=replace)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ---------------------------------------------------------------------------- certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(entries: list[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IP SANs, everything else as DNS names."""
    names: list[x509.GeneralName] = []
    for entry in entries:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    return x509.SubjectAlternativeName(names)


def make_ca(days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (ECDSA P-256) that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name("fedlora private CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    san: list[str],
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate for the names/addresses ``san``, signed by the CA."""
    if not san:
        raise KeyMaterialError("--san: give at least one DNS name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(san[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


# ---------------------------------------------------------------------------- SuperNode auth


def make_node_key(folder: Path, replace: bool = False) -> Path:
    """A SuperNode auth key pair: ``supernode.key`` (0600) and ``supernode.pub``, OpenSSH.

    Flower's ``--auth-supernode-private-key`` wants ECDSA in OpenSSH format; the public half
    (``ecdsa-sha2-nistp256 AAAA...``) is what ``flwr supernode register`` takes.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(folder / NODE_KEY, private, _PRIVATE_MODE, replace=replace)
    _write(folder / NODE_PUB, public + b"\n", _PUBLIC_MODE, replace=replace)
    return folder / NODE_KEY


def node_key_fingerprint(public_path: Path) -> str:
    """``sha256:<hex>`` of an OpenSSH public key line's key blob."""
    fields = public_path.read_text(encoding="utf-8").split()
    if len(fields) < 2:
        raise KeyMaterialError(f"{public_path} is not an OpenSSH public key")
    return "sha256:" + hashlib.sha256(base64.b64decode(fields[1])).hexdigest()


# ---------------------------------------------------------------------------- provisioning


def _report(label: str, path: Path, fingerprint: str | None = None) -> None:
    suffix = f"  ({fingerprint})" if fingerprint else ""
    console.print(f"{label}: {escape(str(path))}{suffix}", soft_wrap=True)


def init_deployment(out: Path, sites: list[str], san: list[str], kem: str = "x25519") -> Layout:
    """Create the CA, the coordinator's keys and one bundle per site under ``out``."""
    layout = Layout(Path(out))
    for site in sites:
        check_site_id(site)
    if len(set(sites)) != len(sites):
        raise KeyMaterialError(f"--sites: a site id repeats: {sites}")
    if layout.ca.exists() or layout.coordinator.exists():
        raise KeyMaterialError(f"{out} already holds a deployment; use `fedlora keys add-site`")
    san = list(dict.fromkeys([*san, *LOOPBACK_SAN]))  # the coordinator's own CLI uses these
    ca_key, ca_cert = make_ca()
    pem_cert = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(layout.ca / CA_KEY, _pem_private(ca_key), _PRIVATE_MODE)
    _write(layout.ca / CA_CERT, pem_cert, _PUBLIC_MODE)
    tls_key, tls_cert = make_server_cert(ca_key, ca_cert, san)
    _write(layout.coordinator / CA_CERT, pem_cert, _PUBLIC_MODE)
    _write(layout.coordinator / TLS_KEY, _pem_private(tls_key), _PRIVATE_MODE)
    tls_pem = tls_cert.public_bytes(serialization.Encoding.PEM)
    _write(layout.coordinator / TLS_CERT, tls_pem, _PUBLIC_MODE)
    generate_coordinator_key(layout.coordinator, kem=kem)  # type: ignore[arg-type]
    layout.supernodes.mkdir(mode=0o700, parents=True, exist_ok=True)
    _report("wrote the private CA (keep ca.key offline)", layout.ca)
    _report(f"wrote the coordinator's keys (TLS SAN {', '.join(san)})", layout.coordinator)
    for site in sites:
        enroll_site(layout, site)
    return layout


def _ed25519_public(folder: Path, key_id: str, label: str) -> Path:
    """``folder/<key_id>.pub``, with its key pair created (and reported) if missing: a keys
    folder made before the key existed gets it on the next ``add-site``."""
    private = folder / f"{key_id}{PRIVATE_SUFFIX}"
    if not private.exists():
        generate_site_key(folder, key_id)
        fingerprint = public_fingerprint(load_site_public(public_path_for(private)))
        _report(f"wrote {label}", private, fingerprint)
    return public_path_for(private)


def instruction_public(layout: Layout) -> Path:
    """The coordinator's instruction key (``common.instructions``); its public half goes into
    every bundle."""
    return _ed25519_public(
        layout.coordinator, INSTRUCTION_KEY_ID, "the coordinator's instruction key"
    )


def enroll_public(layout: Layout) -> Path:
    """The enrollment key (beside the CA: keep both offline); every bundle pins its public half
    to check the signed roster (``common.roster``)."""
    label = "the enrollment key (signs the site roster; keep it offline)"
    return _ed25519_public(layout.ca, ENROLL_KEY_ID, label)


def sign_roster(layout: Layout) -> Path:
    """Re-sign the roster of every enrolled site's key into the coordinator's folder."""
    enrolled = load_allow_list(layout.allow_list)
    keys = {site: enrolled.public_key(site) for site in enrolled}
    path = write_roster(
        layout.coordinator / ROSTER_FILE, keys, load_site_private(layout.ca / ENROLL_KEY_NAME)
    )
    _report(f"signed the roster of {len(keys)} sites", path)
    return path


def site_keygen(bundle: Path, site_id: str) -> tuple[Path, Path]:
    """At the site: its envelope key and SuperNode key in ``bundle`` (created 0700); return
    the two public files to hand to the enrollment authority (``add-site --public-keys``).

    The private halves never leave the site's machine: the authority enrolls only the public
    ones and hands back the public trust files (``ca.crt``, ``coordinator.pub``,
    ``coordinator-sign.pub``, ``enroll.pub``) to copy into ``bundle``.
    """
    check_site_id(site_id)
    bundle = Path(bundle)
    for name in (f"{site_id}{PRIVATE_SUFFIX}", NODE_KEY):
        if (bundle / name).exists():
            raise KeyMaterialError(f"{bundle / name} already exists; keys are never overwritten")
    bundle.mkdir(mode=0o700, parents=True, exist_ok=True)
    envelope = public_path_for(generate_site_key(bundle, site_id))
    make_node_key(bundle)
    fingerprint = public_fingerprint(load_site_public(envelope))
    _report(f"site {site_id}: envelope key (hand over the .pub only)", envelope, fingerprint)
    _report("  SuperNode key (hand over the .pub only)", bundle / NODE_PUB,
            node_key_fingerprint(bundle / NODE_PUB))  # fmt: skip
    return envelope, bundle / NODE_PUB


def _site_publics(folder: Path, site_id: str) -> tuple[Path, Path]:
    """A site's two public key files from ``folder``, checked for their kind."""
    envelope, node = Path(folder) / f"{site_id}{PUBLIC_SUFFIX}", Path(folder) / NODE_PUB
    for path in (envelope, node):
        if not path.is_file():
            raise KeyMaterialError(
                f"{path} not found: --public-keys names the folder `fedlora keys site-keygen` "
                f"wrote at the site (it holds {envelope.name} and {NODE_PUB})"
            )
    load_site_public(envelope)  # an Ed25519 public key, or a clear error naming the file
    try:
        key = load_ssh_public_key(node.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{node} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise KeyMaterialError(f"{node}: expected an ECDSA P-256 SuperNode key")
    return envelope, node


def enroll_site(
    layout: Layout, site_id: str, replace: bool = False, public_keys: Path | None = None
) -> Path:
    """Create ``site_id``'s bundle and enroll both of its public keys at the coordinator.

    With ``public_keys`` (the folder ``site_keygen`` wrote at the site), the site's own public
    keys are enrolled and its bundle here holds public files only; otherwise its keys are
    generated here (quick start: the authority then holds the site's private keys too).
    """
    bundle = layout.site(site_id)
    # Checked before anything is written: a bad folder leaves the deployment as it was.
    given, node = _site_publics(public_keys, site_id) if public_keys else (Path(), Path())
    coordinator_pub = public_path_for(layout.coordinator / COORDINATOR_KEY_NAME)
    if not coordinator_pub.is_file():
        raise KeyMaterialError(f"{coordinator_pub} not found; run `fedlora keys init` first")
    if bundle.exists() and not replace:
        raise KeyMaterialError(f"{bundle} already exists; pass --replace to rotate its keys")
    if replace and bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(mode=0o700, parents=True)
    _copy_public(layout.coordinator / CA_CERT, bundle / CA_CERT)
    _copy_public(coordinator_pub, bundle / COORDINATOR_PUB)
    _copy_public(instruction_public(layout), bundle / INSTRUCTION_PUBLIC_NAME)
    _copy_public(enroll_public(layout), bundle / ENROLL_PUBLIC_NAME)
    if public_keys is not None:
        envelope = bundle / f"{site_id}{PRIVATE_SUFFIX}"  # not here: only its public half
        _copy_public(given, public_path_for(envelope))
        _copy_public(node, bundle / NODE_PUB)
    else:
        envelope = generate_site_key(bundle, site_id)
        make_node_key(bundle)
    add_site(layout.allow_list, site_id, public_path_for(envelope), replace=replace)
    _copy_public(bundle / NODE_PUB, layout.supernodes / f"{site_id}.pub", replace=replace)
    sign_roster(layout)
    envelope_fp = public_fingerprint(load_site_public(public_path_for(envelope)))
    _report(f"site {site_id}: bundle", bundle)
    _report(f"  envelope key {site_id}{PRIVATE_SUFFIX} enrolled", layout.allow_list, envelope_fp)
    node_fp = node_key_fingerprint(bundle / NODE_PUB)
    _report("  SuperNode key enrolled", layout.supernodes / f"{site_id}.pub", node_fp)
    return bundle


# ---------------------------------------------------------------------------- command line


def add_deployment_parsers(sub: Any) -> None:
    """Add ``init`` / ``add-site`` to the ``fedlora keys`` sub-parsers."""
    init = sub.add_parser(
        "init",
        help="deployment: create the CA, TLS certificate, coordinator keys and site bundles",
        description=doc_after_title(__doc__),
        epilog=DEPLOYMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--out", type=output_folder, required=True, help="folder (created 0700)")
    init.add_argument(
        "--sites",
        default="",
        help="comma-separated site ids whose keys are generated here (quick start), e.g. a,b,c; "
        "leave out and enroll each site's own public keys with `add-site --public-keys`",
    )
    init.add_argument(
        "--san",
        default="127.0.0.1,localhost",
        help="comma-separated DNS names / IP addresses the sites use to reach the coordinator",
    )
    init.add_argument("--kem", choices=KEMS, default="x25519", help="envelope KEM")
    add = sub.add_parser(
        "add-site",
        help="deployment: create and enroll one more site's bundle (--replace rotates)",
        description="Create SITE's bundle under DIR/sites/SITE (envelope signing key, SuperNode "
        "key, the CA certificate and the coordinator's public keys) and enroll its public keys "
        "in the coordinator's allow-list and supernodes/ folder. With --replace, an enrolled "
        "site gets new keys and its old ones are dropped.",
        epilog=DEPLOYMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument(
        "--out", type=output_folder, required=True, help="the folder `keys init` wrote"
    )
    add.add_argument("site_id", metavar="SITE", help="the new site's id")
    add.add_argument("--replace", action="store_true", help="rotate an enrolled site's keys")
    add.add_argument(
        "--public-keys",
        type=Path,
        metavar="FOLDER",
        help="enroll the public keys that `keys site-keygen` made at the site (SITE.pub, "
        "supernode.pub) instead of generating the site's keys here",
    )
    keygen = sub.add_parser(
        "site-keygen",
        help="at a site: create its own envelope and SuperNode keys (hand over the .pub files)",
        description="Create SITE's envelope signing key (Ed25519) and SuperNode key (ECDSA "
        "P-256) in --out, at the site. Only SITE.pub and supernode.pub leave the site: the "
        "enrollment authority enrolls them with `fedlora keys add-site --public-keys`, and "
        "hands back ca.crt, coordinator.pub, coordinator-sign.pub and enroll.pub to copy into "
        "--out.",
        epilog=DEPLOYMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keygen.add_argument("--out", type=Path, required=True, help="the site's bundle folder")
    keygen.add_argument("site_id", metavar="SITE", help="the site's id")


DEPLOYMENT_EPILOG = """\
examples:
  fedlora keys init --out deploy/keys --sites hospital-a,hospital-b --san coord.example.org
  fedlora keys add-site --out deploy/keys hospital-c
  fedlora keys add-site --out deploy/keys hospital-a --replace     # rotate a site's keys

  # private keys made at the site, only public ones handed over:
  fedlora keys site-keygen --out /etc/fedlora/keys hospital-d      # at hospital-d
  fedlora keys add-site --out deploy/keys hospital-d --public-keys hospital-d-public/

Hand deploy/keys/sites/<site>/ to that site (and only that folder); the coordinator uses
deploy/keys/coordinator/. Keep deploy/keys/ca/ca.key offline.
"""


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_deployment_command(args: argparse.Namespace) -> None:
    """Run a parsed ``fedlora keys init`` / ``keys add-site``; FedloraError on failure."""
    if args.keys_command == "init":
        init_deployment(args.out, _split(args.sites), _split(args.san), args.kem)
    elif args.keys_command == "site-keygen":
        site_keygen(args.out, args.site_id)
    else:
        enroll_site(Layout(args.out), args.site_id, args.replace, args.public_keys)
