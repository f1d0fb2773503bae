"""verify_file: usage rules, one hashing pass, every check kind, and how they combine."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import need, run
from tests.trust.test_minisign import _keypair, _sign
from tests.trust.test_openpgp import Signer, _cleanup, _new_signer
from unbrick.errors import SourceError, UsageError
from unbrick.trust import verify as verify_mod
from unbrick.trust.sums import format_entry
from unbrick.trust.verify import detect_signature_kind, verify_file

KEY_ID = bytes.fromhex("1122334455667788")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    f = tmp_path / "firmware.bin"
    f.write_bytes(bytes(range(256)) * 1000)
    return f


def _sums(tmp_path: Path, image: Path, algorithms: Sequence[str] = ("sha256",)) -> Path:
    data = image.read_bytes()
    lines = [format_entry(a, hashlib.new(a, data).hexdigest(), image.name) for a in algorithms]
    path = tmp_path / "SHA256SUMS"
    path.write_text("\n".join([*lines, format_entry("sha256", "0" * 64, "other.bin")]) + "\n")
    return path


def _minisign_files(tmp_path: Path, message: bytes, kind: str = "minisign") -> tuple[Path, Path]:
    sk, pub = _keypair(b"verify", KEY_ID)
    key = tmp_path / "key.pub"
    key.write_bytes(pub)
    sig = tmp_path / f"sig-{kind}.minisig"
    sig.write_bytes(_sign(sk, KEY_ID, message, kind=kind))
    return sig, key


# --- usage --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_usage_errors(tmp_path: Path, image: Path) -> None:
    sig, key = _minisign_files(tmp_path, image.read_bytes())
    with pytest.raises(UsageError, match="needs a key"):
        verify_file(image, signature=sig)
    with pytest.raises(UsageError, match="no signature to check"):
        verify_file(image, minisign_key=key)
    with pytest.raises(UsageError, match="only one kind of key"):
        verify_file(image, signature=sig, minisign_key=key, cms_ca=key)
    with pytest.raises(UsageError, match="not a SHA-256 digest"):
        verify_file(image, sha256="abc")
    with pytest.raises(UsageError, match="unknown certificate purpose"):
        verify_file(image, sha256="0" * 64, cms_purpose="web")


@pytest.mark.unit
def test_nothing_requested_is_not_ok_and_image_must_exist(tmp_path: Path, image: Path) -> None:
    report = verify_file(image)
    assert report.checks == []
    assert not report.ok
    with pytest.raises(SourceError, match="cannot read"):
        verify_file(tmp_path / "missing.bin")
    with pytest.raises(SourceError, match="cannot read"):
        verify_file(tmp_path / "missing.bin", sha256="0" * 64)


# --- checksums -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_sha256(image: Path) -> None:
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    report = verify_file(image, sha256=f"SHA256:{digest.upper()}")
    assert report.ok
    assert report.digests == {"sha256": digest}
    bad = verify_file(image, sha256="f" * 64)
    assert not bad.ok
    (check,) = bad.checks
    assert (check.id, check.passed, check.error) == ("sha256", False, "IntegrityError")
    assert digest in check.detail


@pytest.mark.unit
def test_sums_weak_and_strong(tmp_path: Path, image: Path) -> None:
    weak = verify_file(image, sums=_sums(tmp_path, image, ["md5"]))
    assert weak.ok
    assert weak.weak
    assert weak.checks[0].weak
    assert "WEAK" in weak.checks[0].detail
    both = verify_file(image, sums=_sums(tmp_path, image, ["md5", "sha512"]))
    assert both.ok
    assert not both.weak
    assert both.checks[0].detail.startswith("matches sha512")


@pytest.mark.unit
def test_sums_failures_are_checks(tmp_path: Path, image: Path) -> None:
    missing = verify_file(image, sums=tmp_path / "nope")
    assert not missing.ok
    assert missing.checks[0].error == "SourceError"
    other = tmp_path / "fw2.bin"
    other.write_bytes(b"x")
    unlisted = verify_file(other, sums=_sums(tmp_path, image))
    assert "fw2.bin is not listed in SHA256SUMS" in unlisted.checks[0].detail
    junk = tmp_path / "junk"
    junk.write_text("<html>not found</html>\n")
    report = verify_file(image, sums=junk)
    assert "no valid checksum line" in report.checks[0].detail


@pytest.mark.unit
def test_malformed_lines_become_warnings(tmp_path: Path, image: Path) -> None:
    sums = _sums(tmp_path, image)
    sums.write_text(sums.read_text() + "garbage\n")
    report = verify_file(image, sums=sums)
    assert report.ok
    assert report.warnings == ["SHA256SUMS line 3: not a checksum line (expected 'HEX  NAME' or"
                               " 'ALGO (NAME) = HEX')"]  # fmt: skip


@pytest.mark.unit
def test_image_is_hashed_once_for_every_digest(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    real = verify_mod.hash_file

    def counting(path: Path, algorithms: Sequence[str]) -> dict[str, str]:
        calls.append(list(algorithms))
        return real(path, algorithms)

    monkeypatch.setattr(verify_mod, "hash_file", counting)
    sig, key = _minisign_files(tmp_path, image.read_bytes())
    report = verify_file(
        image,
        sha256=hashlib.sha256(image.read_bytes()).hexdigest(),
        sums=_sums(tmp_path, image, ["md5", "sha512"]),
        signature=sig,
        minisign_key=key,
    )
    assert report.ok, report.checks
    assert len(calls) == 1
    assert sorted(calls[0]) == ["blake2b", "md5", "sha256", "sha512"]
    assert [c.id for c in report.checks] == ["sha256", "sums", "minisign"]
    json.dumps(report.to_dict())


# --- signatures ----------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["minisign", "minisign-legacy", "signify"])
def test_minisign_over_image(tmp_path: Path, image: Path, kind: str) -> None:
    sig, key = _minisign_files(tmp_path, image.read_bytes(), kind)
    report = verify_file(image, signature=sig, minisign_key=key)
    assert report.ok, report.checks
    assert report.checks[0].id == ("signify" if kind == "signify" else "minisign")
    assert report.signature is not None
    assert report.signature.kind == kind
    image.write_bytes(image.read_bytes() + b"!")
    bad = verify_file(image, signature=sig, minisign_key=key)
    assert not bad.ok
    assert "BAD signature" in bad.checks[0].detail
    assert bad.checks[0].error == "SignatureError"


@pytest.mark.unit
def test_signature_over_the_checksum_file(tmp_path: Path, image: Path) -> None:
    sums = _sums(tmp_path, image)
    sig, key = _minisign_files(tmp_path, sums.read_bytes())
    report = verify_file(image, sums=sums, signature=sig, minisign_key=key)
    assert report.ok, report.checks
    assert "covers the checksum file" in report.checks[1].detail
    # A changed image: the signature over SHA256SUMS is still good, the checksum is not.
    image.write_bytes(b"evil")
    report = verify_file(image, sums=sums, signature=sig, minisign_key=key)
    assert not report.ok
    assert [c.passed for c in report.checks] == [False, True]


@pytest.mark.unit
def test_signature_over_image_when_sums_also_given(tmp_path: Path, image: Path) -> None:
    sig, key = _minisign_files(tmp_path, image.read_bytes())
    report = verify_file(image, sums=_sums(tmp_path, image), signature=sig, minisign_key=key)
    assert report.ok, report.checks
    assert "covers the checksum file" not in report.checks[1].detail
    # Neither: the failure says both were tried.
    sig2, _ = _minisign_files(tmp_path, b"something else")
    report = verify_file(image, sums=_sums(tmp_path, image), signature=sig2, minisign_key=key)
    assert not report.ok
    assert "(nor is it a valid signature of SHA256SUMS); do not flash" in report.checks[1].detail


@pytest.mark.unit
def test_wrong_key_and_broken_key(tmp_path: Path, image: Path) -> None:
    sig, _ = _minisign_files(tmp_path, image.read_bytes())
    _, other_pub = _keypair(b"other", bytes(8))
    other = tmp_path / "other.pub"
    other.write_bytes(other_pub)
    report = verify_file(image, signature=sig, minisign_key=other)
    assert not report.ok
    assert "8877665544332211" in report.checks[0].detail
    assert "0000000000000000" in report.checks[0].detail
    assert "blake2b" not in report.digests  # known to fail before hashing
    broken = tmp_path / "broken.pub"
    broken.write_text("not a key\n")
    report = verify_file(image, signature=sig, minisign_key=broken)
    assert report.checks[0].error == "KeyFileError"


@pytest.mark.unit
def test_signature_kind_must_match_key_kind(tmp_path: Path, image: Path) -> None:
    sig, key = _minisign_files(tmp_path, image.read_bytes())
    report = verify_file(image, signature=sig, gpg_keyring=key)
    assert not report.ok
    assert report.checks[0].id == "openpgp"
    assert (
        "sig-minisign.minisig is a minisign/signify signature, but the key given is an OpenPGP"
        " keyring" in report.checks[0].detail
    )
    garbage = tmp_path / "garbage.sig"
    garbage.write_bytes(b"hello world")
    report = verify_file(image, signature=garbage, cms_ca=key)
    assert "not a minisign, signify, OpenPGP or CMS signature" in report.checks[0].detail
    report = verify_file(image, signature=tmp_path / "missing.sig", minisign_key=key)
    assert report.checks[0].error == "SourceError"


@pytest.mark.unit
def test_detect_signature_kind() -> None:
    assert detect_signature_kind(b"untrusted comment: x\nRW...") == "minisign"
    assert detect_signature_kind(b"-----BEGIN PGP SIGNATURE-----\n") == "openpgp"
    assert detect_signature_kind(b"\x89\x01\x33") == "openpgp"
    assert detect_signature_kind(b"-----BEGIN CMS-----\n") == "cms"
    assert detect_signature_kind(b"\x30\x82\x01\x00\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x02")
    assert detect_signature_kind(b"") is None


@pytest.mark.unit
def test_missing_program_is_a_failed_check(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sig = tmp_path / "fw.asc"
    sig.write_bytes(b"-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n")
    ring = tmp_path / "k.gpg"
    ring.write_bytes(b"\x99\x00\x00")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    report = verify_file(image, signature=sig, gpg_keyring=ring)
    assert not report.ok
    assert report.checks[0].error == "ToolError"
    assert "gpgv" in report.checks[0].detail


# --- with the real tools -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice() -> Iterator[Signer]:
    need("gpg", "gpgv", "gpgconf")
    signer = _new_signer("Alice <alice@example.org>", "ed25519")
    try:
        yield signer
    finally:
        _cleanup(signer)


@pytest.mark.peer
def test_openpgp_signed_checksum_file(tmp_path: Path, image: Path, alice: Signer) -> None:
    sums = _sums(tmp_path, image)
    sig = alice.sign(sums, tmp_path / "SHA256SUMS.gpg")
    ring = alice.export(tmp_path / "alice.asc", armor=True)
    report = verify_file(image, sums=sums, signature=sig, gpg_keyring=ring)
    assert report.ok, report.checks
    assert report.signature is not None
    assert report.signature.key_id == alice.fingerprint
    # And directly over the image.
    sig2 = alice.sign(image, tmp_path / "fw.sig", armor=True)
    assert verify_file(image, signature=sig2, gpg_keyring=ring).ok


@pytest.mark.peer
def test_clearsigned_checksum_file(tmp_path: Path, image: Path, alice: Signer) -> None:
    plain = tmp_path / "CHECKSUM.txt"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    plain.write_text(f"# Fedora style\nSHA256 ({image.name}) = {digest}\n")
    signed = tmp_path / "CHECKSUM"
    alice.gpg("-u", alice.fingerprint, "-o", signed, "--clearsign", plain)
    ring = alice.export(tmp_path / "alice.gpg", armor=False)
    report = verify_file(image, sums=signed, gpg_keyring=ring)
    assert report.ok, report.checks
    assert [c.id for c in report.checks] == ["sums-openpgp", "sums"]
    # Without the keyring the entries are read but the signature is not checked.
    unchecked = verify_file(image, sums=signed)
    assert unchecked.ok
    assert "clear-signed but its signature was not checked" in unchecked.warnings[0]
    # A line added after signing (outside the signed text) is never read.
    signed.write_text(signed.read_text() + f"SHA256 (evil.bin) = {digest}\n")
    evil = tmp_path / "evil.bin"
    evil.write_bytes(image.read_bytes())
    report = verify_file(evil, sums=signed, gpg_keyring=ring)
    assert not report.ok
    assert "evil.bin is not listed" in report.checks[1].detail
    # A changed digest inside the signed text breaks the signature.
    signed.write_text(signed.read_text().replace(digest, "0" * 64))
    report = verify_file(image, sums=signed, gpg_keyring=ring)
    assert not report.checks[0].passed


@pytest.mark.peer
def test_openwrt_style_usign_over_sha256sums(tmp_path: Path, image: Path) -> None:
    need("signify-openbsd", "sha256sum")
    pub, sec = tmp_path / "k.pub", tmp_path / "k.sec"
    run(["signify-openbsd", "-G", "-n", "-p", pub, "-s", sec])
    sums = tmp_path / "sha256sums"
    sums.write_bytes(run(["sha256sum", "firmware.bin"], cwd=tmp_path).stdout)
    run(["signify-openbsd", "-S", "-s", sec, "-m", sums, "-x", tmp_path / "sha256sums.sig"])
    report = verify_file(image, sums=sums, signature=tmp_path / "sha256sums.sig", minisign_key=pub)
    assert report.ok, report.checks
    assert [c.id for c in report.checks] == ["sums", "signify"]


@pytest.mark.peer
def test_cms_through_verify_file(tmp_path: Path, image: Path) -> None:
    need("openssl")
    key, ca = tmp_path / "ca.key", tmp_path / "ca.pem"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", ca, "-subj", "/CN=Device CA", "-days", "5"])  # fmt: skip
    sig = tmp_path / "fw.p7s"
    run(["openssl", "cms", "-sign", "-binary", "-nosmimecap", "-outform", "DER", "-in", image,
         "-signer", ca, "-inkey", key, "-out", sig])  # fmt: skip
    report = verify_file(image, signature=sig, cms_ca=ca)
    assert report.ok, report.checks
    assert report.signature is not None
    assert report.signature.signer == "CN=Device CA"
    os.truncate(image, 100)
    report = verify_file(image, signature=sig, cms_ca=ca)
    assert not report.ok
    assert "BAD signature" in report.checks[0].detail
