"""Key files and the allow-list: permissions, formats, and every way a key file can be wrong."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.allow_list import ALLOW_LIST_FORMAT, AllowList, add_site, load_allow_list
from common.errors import FedloraError
from common.keys import (
    KEMS,
    CoordinatorPrivateKey,
    KeyMaterialError,
    UnknownSite,
    check_site_id,
    export_public,
    generate_coordinator_key,
    generate_site_key,
    load_coordinator_private,
    load_coordinator_public,
    load_public_key,
    load_site_private,
    load_site_public,
    public_fingerprint,
    public_path_for,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secret_fragments(path: Path) -> list[str]:
    """Strings that would reveal a key file's content: each PEM body line, base64 and hex."""
    text = path.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("-----")]
    fragments = [line for line in lines if len(line) >= 16]
    for block in re.findall(r"-----BEGIN [A-Z ]+-----\n(.*?)-----END", text, re.DOTALL):
        der = base64.b64decode(block)
        fragments.append(der[-32:].hex())
    return fragments


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """A permissive umask: written private keys must still be 0600."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("kem", KEMS)
def test_coordinator_key_roundtrip(tmp_path: Path, kem: str) -> None:
    private_path = generate_coordinator_key(tmp_path / "keys", kem)  # type: ignore[arg-type]
    assert private_path == tmp_path / "keys" / "coordinator.key"
    assert mode_of(private_path) == 0o600
    assert mode_of(public_path_for(private_path)) == 0o644
    assert mode_of(tmp_path / "keys") == 0o700
    private = load_coordinator_private(private_path)
    public = load_coordinator_public(public_path_for(private_path))
    assert private.kem == public.kem == kem
    assert public_fingerprint(private.public_key()) == public_fingerprint(public)


def test_private_keys_are_0600_whatever_the_umask(tmp_path: Path, umask_zero: None) -> None:
    coordinator = generate_coordinator_key(tmp_path, "mlkem768-x25519")
    site = generate_site_key(tmp_path, "site-a")
    assert mode_of(coordinator) == mode_of(site) == 0o600
    assert not list(tmp_path.glob(".*.tmp")), "temp files must not be left behind"


def test_site_key_roundtrip(tmp_path: Path) -> None:
    private_path = generate_site_key(tmp_path, "hospital-a")
    assert private_path.name == "hospital-a.key"
    assert mode_of(private_path) == 0o600
    private = load_site_private(private_path)
    public = load_site_public(public_path_for(private_path))
    assert isinstance(private, Ed25519PrivateKey) and isinstance(public, Ed25519PublicKey)
    public.verify(private.sign(b"message"), b"message")


@pytest.mark.parametrize("make", ["coordinator", "site"])
def test_keys_are_never_overwritten(tmp_path: Path, make: str) -> None:
    def generate() -> Path:
        if make == "coordinator":
            return generate_coordinator_key(tmp_path)
        return generate_site_key(tmp_path, "site-a")

    first = generate()
    before = first.read_bytes()
    with pytest.raises(KeyMaterialError, match="already exists"):
        generate()
    assert first.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
@pytest.mark.parametrize("loader", [load_coordinator_private, load_site_private])
def test_exposed_private_key_is_refused(tmp_path: Path, mode: int, loader: object) -> None:
    if loader is load_coordinator_private:
        path = generate_coordinator_key(tmp_path)
    else:
        path = generate_site_key(tmp_path, "site-a")
    path.chmod(mode)
    with pytest.raises(KeyMaterialError) as caught:
        loader(path)  # type: ignore[operator]
    assert str(path) in str(caught.value)
    assert f"chmod 600 {path}" in str(caught.value)


def test_exposed_public_key_is_fine(tmp_path: Path) -> None:
    public = public_path_for(generate_site_key(tmp_path, "site-a"))
    public.chmod(0o644)
    load_site_public(public)


def write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def rsa_like_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


BAD_KEY_FILES = {
    "empty": b"",
    "garbage": os.urandom(300),
    "not pem": b"hello, I am not a key\n",
    "broken pem": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    "ec key": rsa_like_key_pem(),
}


@pytest.mark.parametrize("content", BAD_KEY_FILES.values(), ids=BAD_KEY_FILES.keys())
@pytest.mark.parametrize("loader", [load_coordinator_private, load_site_private])
def test_garbage_key_file_names_the_file(tmp_path: Path, content: bytes, loader: object) -> None:
    path = write_private(tmp_path / "some.key", content)
    with pytest.raises(KeyMaterialError) as caught:
        loader(path)  # type: ignore[operator]
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "loader",
    [load_coordinator_private, load_coordinator_public, load_site_private, load_site_public],
)
def test_missing_key_file_names_the_file(tmp_path: Path, loader: object) -> None:
    path = tmp_path / "nowhere" / "coordinator.key"
    with pytest.raises(KeyMaterialError, match="does not exist") as caught:
        loader(path)  # type: ignore[operator]
    assert str(path) in str(caught.value)


def test_folder_and_huge_file_are_not_keys(tmp_path: Path) -> None:
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(KeyMaterialError, match="not a regular file"):
        load_site_private(tmp_path / "dir.key")
    huge = write_private(tmp_path / "huge.key", b"A" * (1 << 20))
    with pytest.raises(KeyMaterialError, match="too large"):
        load_site_private(huge)


def test_encrypted_private_key_is_refused(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password"),
    )
    path = write_private(tmp_path / "enc.key", pem)
    with pytest.raises(KeyMaterialError, match="unencrypted PKCS#8"):
        load_site_private(path)


def test_wrong_kind_of_key_is_named(tmp_path: Path) -> None:
    coordinator = generate_coordinator_key(tmp_path / "c")
    site = generate_site_key(tmp_path / "s", "site-a")
    with pytest.raises(KeyMaterialError, match="site \\(Ed25519\\) key, expected the coord"):
        load_coordinator_private(site)
    with pytest.raises(KeyMaterialError, match="coordinator's key, expected a site's private"):
        load_site_private(coordinator)
    with pytest.raises(KeyMaterialError, match="expected a site's public key"):
        load_site_public(public_path_for(coordinator))
    with pytest.raises(KeyMaterialError, match="expected the coordinator's public key"):
        load_coordinator_public(public_path_for(site))


def test_hybrid_blocks_in_wrong_order_are_refused(tmp_path: Path) -> None:
    path = generate_coordinator_key(tmp_path, "mlkem768-x25519")
    blocks = re.findall(rb"-----BEGIN.*?-----END PRIVATE KEY-----\n", path.read_bytes(), re.DOTALL)
    assert len(blocks) == 2
    swapped = write_private(tmp_path / "swapped.key", blocks[1] + blocks[0])
    with pytest.raises(KeyMaterialError, match="not a fedlora private key"):
        load_coordinator_private(swapped)


@pytest.mark.parametrize("kem", KEMS)
def test_export_public_matches_generated(tmp_path: Path, kem: str) -> None:
    private = generate_coordinator_key(tmp_path, kem)  # type: ignore[arg-type]
    out = export_public(private, tmp_path / "exported" / "c.pub")
    assert out.read_bytes() == public_path_for(private).read_bytes()
    assert mode_of(out) == 0o644
    site = generate_site_key(tmp_path, "site-a")
    site_out = export_public(site, tmp_path / "s.pub")
    assert isinstance(load_public_key(site_out), Ed25519PublicKey)
    with pytest.raises(KeyMaterialError, match="already exists"):
        export_public(site, site_out)


def test_export_refuses_exposed_private_key(tmp_path: Path) -> None:
    site = generate_site_key(tmp_path, "site-a")
    site.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        export_public(site, tmp_path / "out.pub")


@pytest.mark.parametrize("kem", KEMS)
def test_repr_and_errors_never_show_key_material(tmp_path: Path, kem: str) -> None:
    path = generate_coordinator_key(tmp_path, kem)  # type: ignore[arg-type]
    key = load_coordinator_private(path)
    texts = [repr(key), str(key), repr(key.public_key())]
    # A coordinator key is no site key: both loaders must refuse it (a loader that accepted
    # it would be a bug of its own, and would leave this test with no error text to check).
    for loader, file in ((load_site_private, path), (load_site_public, public_path_for(path))):
        with pytest.raises(FedloraError) as refused:
            loader(file)
        texts.append(str(refused.value))
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError) as caught:
        load_coordinator_private(path)
    texts.append(str(caught.value))
    for fragment in secret_fragments(path) + secret_fragments(public_path_for(path)):
        assert all(fragment not in text for text in texts)
    assert kem in repr(key) and "sha256:" in repr(key)


@pytest.mark.parametrize("good", ["a", "site-1", "Hospital_A.eu", "x" * 64])
def test_valid_site_ids(good: str) -> None:
    assert check_site_id(good) == good


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "a/b", "-a", "x" * 65, "é", "a b", "a\n"])
def test_invalid_site_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(KeyMaterialError, match="invalid site id"):
        check_site_id(bad)
    with pytest.raises(KeyMaterialError, match="invalid site id"):
        generate_site_key(tmp_path, bad)


# ---------------------------------------------------------------------------- allow-list


def make_site(tmp_path: Path, site_id: str) -> Path:
    """A site's public key file."""
    return public_path_for(generate_site_key(tmp_path / "sites", site_id))


def test_json_allow_list_enroll_and_lookup(tmp_path: Path) -> None:
    allow = tmp_path / "allow.json"
    pub_a, pub_b = make_site(tmp_path, "site-a"), make_site(tmp_path, "site-b")
    assert add_site(allow, "site-a", pub_a) == allow
    add_site(allow, "site-b", pub_b)
    document = json.loads(allow.read_text())
    assert document["format"] == ALLOW_LIST_FORMAT and set(document["sites"]) == {
        "site-a",
        "site-b",
    }
    allow_list = load_allow_list(allow)
    assert (
        len(allow_list) == 2 and "site-a" in allow_list and list(allow_list) == ["site-a", "site-b"]
    )
    expected = load_site_public(pub_a).public_bytes_raw()
    assert allow_list.public_key("site-a").public_bytes_raw() == expected


def test_unknown_site_is_a_clear_error(tmp_path: Path) -> None:
    allow = tmp_path / "allow.json"
    add_site(allow, "site-a", make_site(tmp_path, "site-a"))
    with pytest.raises(UnknownSite, match="'site-z' is not in the allow-list") as caught:
        load_allow_list(allow).public_key("site-z")
    assert isinstance(caught.value, KeyMaterialError) and str(allow) in str(caught.value)


def test_folder_allow_list(tmp_path: Path) -> None:
    folder = tmp_path / "allowed"
    folder.mkdir()
    written = add_site(folder, "site-a", make_site(tmp_path, "site-a"))
    assert written == folder / "site-a.pub"
    add_site(folder, "site.b", make_site(tmp_path, "site.b"))
    assert list(load_allow_list(folder)) == ["site-a", "site.b"]
    rotated = public_path_for(generate_site_key(tmp_path / "new", "site-a"))
    add_site(folder, "site-a", rotated, replace=True)
    assert written.read_bytes() == rotated.read_bytes()
    assert not list(folder.glob(".*.tmp"))


def test_enrolling_again_and_rotating(tmp_path: Path) -> None:
    allow = tmp_path / "allow.json"
    pub = make_site(tmp_path, "site-a")
    add_site(allow, "site-a", pub)
    add_site(allow, "site-a", pub)  # the same key again: no change, no error
    rotated = public_path_for(generate_site_key(tmp_path / "new", "site-a"))
    with pytest.raises(KeyMaterialError, match=r"already enrolled .* --replace"):
        add_site(allow, "site-a", rotated)
    add_site(allow, "site-a", rotated, replace=True)
    new_raw = load_site_public(rotated).public_bytes_raw()
    assert load_allow_list(allow).public_key("site-a").public_bytes_raw() == new_raw


def test_two_sites_cannot_share_a_key(tmp_path: Path) -> None:
    allow = tmp_path / "allow.json"
    pub = make_site(tmp_path, "site-a")
    add_site(allow, "site-a", pub)
    with pytest.raises(KeyMaterialError, match="share one public key"):
        add_site(allow, "site-b", pub)
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(KeyMaterialError, match="share one public key"):
        AllowList({"a": key, "b": key})


def test_allow_list_accepts_hex_and_pem_entries(tmp_path: Path) -> None:
    hex_key, pem_key = (Ed25519PrivateKey.generate().public_key() for _ in range(2))
    pem = pem_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    allow = tmp_path / "allow.json"
    sites = {"hex": hex_key.public_bytes_raw().hex().upper(), "pem": pem.decode()}
    allow.write_text(json.dumps({"format": ALLOW_LIST_FORMAT, "sites": sites}))
    loaded = load_allow_list(allow)
    assert loaded.public_key("hex").public_bytes_raw() == hex_key.public_bytes_raw()
    assert loaded.public_key("pem").public_bytes_raw() == pem_key.public_bytes_raw()
    assert hex_key.public_bytes_raw().hex() not in repr(loaded)


BAD_ALLOW_LISTS = {
    "not json": "{",
    "a list": "[]",
    "no format": json.dumps({"sites": {}}),
    "other format": json.dumps({"format": "x/1", "sites": {}}),
    "sites not a map": json.dumps({"format": ALLOW_LIST_FORMAT, "sites": []}),
    "short hex": json.dumps({"format": ALLOW_LIST_FORMAT, "sites": {"a": "abcd"}}),
    "number": json.dumps({"format": ALLOW_LIST_FORMAT, "sites": {"a": 7}}),
    "bad site id": json.dumps({"format": ALLOW_LIST_FORMAT, "sites": {"../a": "00" * 32}}),
}


@pytest.mark.parametrize("text", BAD_ALLOW_LISTS.values(), ids=BAD_ALLOW_LISTS.keys())
def test_bad_allow_list_is_refused(tmp_path: Path, text: str) -> None:
    allow = tmp_path / "allow.json"
    allow.write_text(text)
    with pytest.raises(KeyMaterialError):
        load_allow_list(allow)


def test_allow_list_path_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="does not exist"):
        load_allow_list(tmp_path / "missing.json")
    with pytest.raises(KeyMaterialError, match=r"neither a folder nor a .json file"):
        add_site(tmp_path / "allow.txt", "site-a", make_site(tmp_path, "site-a"))
    with pytest.raises(KeyMaterialError, match="coordinator's key"):
        add_site(tmp_path / "allow.json", "c", public_path_for(generate_coordinator_key(tmp_path)))


def test_coordinator_private_key_class_is_usable_in_memory() -> None:
    """Tests and the apps may build keys in memory; the class is not tied to files."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = CoordinatorPrivateKey(X25519PrivateKey.generate())
    assert key.kem == "x25519" and key.public_key().kem == "x25519"
