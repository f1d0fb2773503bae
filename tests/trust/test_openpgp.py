"""OpenPGP: keys and signatures made by the real gpg, checked by ours (through gpgv)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import KeyFileError, SignatureError, SourceError
from unbrick.trust import openpgp
from unbrick.trust.openpgp import (
    dearmor,
    keyring_bytes,
    load_keyring,
    looks_like_signature,
    parse_status,
    verify_clearsigned,
    verify_detached,
)


@dataclass
class Signer:
    home: Path
    uid: str
    fingerprint: str

    def gpg(self, *args: str | Path, **kw: object) -> bytes:
        env = dict(os.environ, GNUPGHOME=str(self.home))
        return run(["gpg", "--batch", "--yes", *args], env=env, **kw).stdout

    def export(self, dest: Path, *, armor: bool) -> Path:
        dest.write_bytes(self.gpg("--export", *(["--armor"] if armor else []), self.fingerprint))
        return dest

    def sign(self, data: Path, dest: Path, *extra: str, armor: bool = False) -> Path:
        self.gpg(*extra, "-u", self.fingerprint, *(["--armor"] if armor else []), "-o", dest,
                 "--detach-sign", data)  # fmt: skip
        return dest


def _new_signer(uid: str, algo: str, *extra: str) -> Signer:
    # A short private home: gpg-agent's socket path must stay under the Unix socket limit.
    home = Path(tempfile.mkdtemp(prefix="ugpg-", dir="/tmp"))
    env = dict(os.environ, GNUPGHOME=str(home))
    run(["gpg", "--batch", "--passphrase", "", *extra, "--quick-gen-key", uid, algo, "sign",
         "1d" if extra else "never"], env=env)  # fmt: skip
    out = run(["gpg", "--batch", "--with-colons", "--list-keys", uid], env=env).stdout.decode()
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    return Signer(home, uid, fpr)


def _cleanup(signer: Signer) -> None:
    env = dict(os.environ, GNUPGHOME=str(signer.home))
    subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
    shutil.rmtree(signer.home, ignore_errors=True)


@pytest.fixture(scope="module")
def signers() -> Iterator[dict[str, Signer]]:
    need("gpg", "gpgv", "gpgconf")
    made: dict[str, Signer] = {}
    try:
        made["ed25519"] = _new_signer("Alice <alice@example.org>", "ed25519")
        made["rsa2048"] = _new_signer("Rob <rob@example.org>", "rsa2048")
        made["other"] = _new_signer("Mallory <mallory@example.org>", "ed25519")
        yield made
    finally:
        for s in made.values():
            _cleanup(s)


def _data(tmp_path: Path) -> Path:
    f = tmp_path / "firmware.bin"
    f.write_bytes(os.urandom(200_000))
    return f


@pytest.mark.peer
@pytest.mark.parametrize("algo", ["ed25519", "rsa2048"])
@pytest.mark.parametrize("armored_key", [False, True])
@pytest.mark.parametrize("armored_sig", [False, True])
def test_gpg_signature_verifies(
    tmp_path: Path, signers: dict[str, Signer], algo: str, armored_key: bool, armored_sig: bool
) -> None:
    signer = signers[algo]
    data = _data(tmp_path)
    ring = signer.export(tmp_path / "key", armor=armored_key)
    sig = signer.sign(data, tmp_path / "fw.sig", armor=armored_sig)
    assert looks_like_signature(sig.read_bytes())
    result = verify_detached(sig, data, ring)
    assert result.kind == "openpgp"
    assert result.key_id == signer.fingerprint
    assert result.signer == signer.uid
    assert not result.weak
    # A changed byte fails.
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(SignatureError, match="BAD signature from"):
        verify_detached(sig, data, ring)


@pytest.mark.peer
def test_unrelated_key_is_no_pubkey(tmp_path: Path, signers: dict[str, Signer]) -> None:
    data = _data(tmp_path)
    ring = signers["ed25519"].export(tmp_path / "alice.gpg", armor=False)
    sig = signers["other"].sign(data, tmp_path / "fw.sig")
    with pytest.raises(SignatureError) as exc:
        verify_detached(sig, data, ring)
    message = str(exc.value)
    assert f"made by key {signers['other'].fingerprint[-16:]}" in message
    assert "which is not in alice.gpg" in message


@pytest.mark.peer
def test_only_the_given_keyring_is_trusted(
    tmp_path: Path, signers: dict[str, Signer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trustedkeys.kbx in the user's GnuPG home holding the signer must not make it pass."""
    mallory = signers["other"]
    ambient = tmp_path / "home"
    ambient.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(ambient))
    key = mallory.export(tmp_path / "m.gpg", armor=False)
    run(["gpg", "--batch", "--no-default-keyring", "--keyring", ambient / "trustedkeys.kbx",
         "--import", key], env=env)  # fmt: skip
    subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
    data = _data(tmp_path)
    sig = mallory.sign(data, tmp_path / "fw.sig")
    monkeypatch.setenv("GNUPGHOME", str(ambient))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".gnupg").symlink_to(ambient)
    # Sanity: plain gpgv with that home does trust the key.
    plain = subprocess.run(["gpgv", sig, data], capture_output=True, check=False)
    assert plain.returncode == 0
    alice = signers["ed25519"].export(tmp_path / "alice.gpg", armor=False)
    with pytest.raises(SignatureError, match=r"not in alice\.gpg"):
        verify_detached(sig, data, alice)


@pytest.mark.peer
def test_keybox_keyring(tmp_path: Path, signers: dict[str, Signer]) -> None:
    signer = signers["ed25519"]
    kbx = tmp_path / "ring.kbx"
    run(["gpg", "--batch", "--no-default-keyring", "--keyring", kbx, "--import",
         signer.export(tmp_path / "k", armor=False)],
        env=dict(os.environ, GNUPGHOME=str(signer.home)))  # fmt: skip
    assert keyring_bytes(kbx.read_bytes())[1] == "keybox"
    data = _data(tmp_path)
    assert verify_detached(signer.sign(data, tmp_path / "s"), data, kbx).signer == signer.uid


@pytest.mark.peer
def test_expired_key_fails(tmp_path: Path) -> None:
    need("gpg", "gpgv", "gpgconf")
    old = _new_signer("Old <old@example.org>", "ed25519", "--faked-system-time", "20200101T000000")
    try:
        data = _data(tmp_path)
        sig = old.sign(data, tmp_path / "s", "--faked-system-time", "20200101T010000")
        ring = old.export(tmp_path / "old.gpg", armor=False)
        with pytest.raises(SignatureError, match=r"EXPIRED key Old <old@example\.org>"):
            verify_detached(sig, data, ring)
    finally:
        _cleanup(old)


@pytest.mark.peer
def test_sha1_signature_is_flagged_weak(tmp_path: Path, signers: dict[str, Signer]) -> None:
    signer = signers["rsa2048"]
    data = _data(tmp_path)
    sig = signer.sign(data, tmp_path / "s", "--digest-algo", "SHA1")
    result = verify_detached(sig, data, signer.export(tmp_path / "k", armor=True))
    assert result.weak


@pytest.mark.peer
def test_clearsigned_text(tmp_path: Path, signers: dict[str, Signer]) -> None:
    signer = signers["ed25519"]
    text = tmp_path / "CHECKSUM"
    text.write_text("# sums\nSHA256 (a.bin) = " + "ab" * 32 + "\n- dashed line\n")
    signed = tmp_path / "CHECKSUM.asc"
    signer.gpg("-u", signer.fingerprint, "-o", signed, "--clearsign", text)
    ring = signer.export(tmp_path / "k.asc", armor=True)
    result, out = verify_clearsigned(signed, ring)
    assert result.signer == signer.uid
    assert out == text.read_bytes()
    tampered = tmp_path / "tampered.asc"
    tampered.write_bytes(signed.read_bytes().replace(b"ab" * 32, b"cd" * 32))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_clearsigned(tampered, ring)


@pytest.mark.peer
def test_dearmor_matches_gpg_dearmor(tmp_path: Path, signers: dict[str, Signer]) -> None:
    armored = signers["rsa2048"].export(tmp_path / "k.asc", armor=True)
    binary = signers["rsa2048"].export(tmp_path / "k.gpg", armor=False)
    theirs = run(["gpg", "--dearmor"], input=armored.read_bytes()).stdout
    assert dearmor(armored.read_bytes()) == theirs == binary.read_bytes()
    # Two armored keys in one file: both are kept.
    both = (
        armored.read_bytes()
        + signers["ed25519"].export(tmp_path / "a.asc", armor=True).read_bytes()
    )
    joined = (
        binary.read_bytes()
        + signers["ed25519"].export(tmp_path / "a.gpg", armor=False).read_bytes()
    )
    assert keyring_bytes(both) == (joined, "armored")


@pytest.mark.peer
def test_secret_key_is_refused(tmp_path: Path, signers: dict[str, Signer]) -> None:
    signer = signers["ed25519"]
    sec = tmp_path / "sec.asc"
    sec.write_bytes(signer.gpg("--pinentry-mode", "loopback", "--passphrase", "",
                               "--armor", "--export-secret-keys", signer.fingerprint))  # fmt: skip
    with pytest.raises(KeyFileError, match="secret key"):
        load_keyring(sec)
    sec.write_bytes(dearmor(sec.read_bytes().replace(b"PRIVATE", b"PUBLIC")))
    with pytest.raises(KeyFileError, match="secret key"):
        load_keyring(sec)


# --- pure parts --------------------------------------------------------------------------------


@pytest.mark.unit
def test_keyring_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read keyring"):
        load_keyring(tmp_path / "missing.gpg")
    with pytest.raises(KeyFileError, match="is empty"):
        keyring_bytes(b"")
    with pytest.raises(KeyFileError, match="not an OpenPGP keyring"):
        keyring_bytes(b"hello")
    with pytest.raises(KeyFileError, match="a signature, not a keyring"):
        keyring_bytes(b"\x88\x75rest")
    with pytest.raises(KeyFileError, match="no armored OpenPGP block"):
        dearmor(b"just text\n")
    block = (
        b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQ==\n=%s\n-----END PGP PUBLIC KEY BLOCK-----\n"
    )
    crc = openpgp._crc24(b"\x99").to_bytes(3, "big")
    good = block % base64.b64encode(crc)
    assert dearmor(good) == b"\x99"
    with pytest.raises(KeyFileError, match="armor checksum does not match"):
        dearmor(block % b"AAAA")
    with pytest.raises(KeyFileError, match="no END line"):
        dearmor(good.rsplit(b"-----END", 1)[0])
    with pytest.raises(KeyFileError, match="does not match BEGIN"):
        dearmor(good.replace(b"END PGP PUBLIC KEY BLOCK", b"END PGP SIGNATURE"))
    with pytest.raises(KeyFileError, match="bad base64"):
        dearmor(good.replace(b"mQ==", b"m!=="))


@pytest.mark.unit
def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        verify_detached(tmp_path / "no.sig", tmp_path / "no.bin", tmp_path / "no.gpg")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("[GNUPG:] BADSIG 0123 Alice", "BAD signature from Alice (0123)"),
        ("[GNUPG:] ERRSIG 0123 22 8 00 1 9 FPR\n[GNUPG:] NO_PUBKEY 0123", "made by key 0123"),
        ("[GNUPG:] ERRSIG 0123 99 8 00 1 4 FPR", "could not be checked (gpgv error code 4"),
        ("[GNUPG:] EXPKEYSIG 0123 Old", "EXPIRED key Old"),
        ("[GNUPG:] REVKEYSIG 0123 Gone", "REVOKED key Gone"),
        ("[GNUPG:] EXPSIG 0123 Late", "has expired"),
        ("[GNUPG:] NODATA 1", "holds no OpenPGP signature"),
        ("[GNUPG:] BADARMOR", "armor of"),
        ("[GNUPG:] UNEXPECTED 0", "unexpected data"),
    ],
)
def test_status_problems(lines: str, message: str) -> None:
    valid = "[GNUPG:] GOODSIG 0123 A\n[GNUPG:] VALIDSIG F 2020-01-01 1 0 4 0 22 8 00 F\n"
    st_ = parse_status(valid + lines)
    assert not st_.passed
    assert any(message in p for p in st_.problems), st_.problems


@pytest.mark.unit
def test_status_pass_needs_validsig() -> None:
    assert not parse_status("[GNUPG:] GOODSIG 0123 A\n").passed
    ok = parse_status("noise\n[GNUPG:] VALIDSIG SUB 2020-01-01 1 0 4 0 1 2 00 PRIMARY\n")
    assert ok.passed
    assert ok.valid[0].primary_fingerprint == "PRIMARY"
    assert ok.valid[0].hash_algo == "2"


@pytest.mark.unit
@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=600))
def test_fuzz_keyring_and_status(data: bytes) -> None:
    for blob in (data, b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n" + data):
        try:
            packets, form = keyring_bytes(blob)
        except KeyFileError:
            pass
        else:
            assert form in ("binary", "armored", "keybox")
            assert packets
    status = parse_status(data.decode("utf-8", "replace"))
    status_prefixed = parse_status("[GNUPG:] " + data.decode("utf-8", "replace"))
    assert isinstance(status.passed, bool)
    assert isinstance(status_prefixed.passed, bool)
    assert isinstance(looks_like_signature(data), bool)
