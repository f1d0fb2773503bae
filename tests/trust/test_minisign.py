"""minisign and signify/usign: cross-checks with the real tools, builders, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import KeyFileError, SignatureError, SourceError
from unbrick.trust import minisign
from unbrick.trust.minisign import (
    load_public_key,
    load_signature,
    parse_public_key,
    parse_signature,
    verify_file,
    verify_message,
)

# --- a small builder (the signing side, for property tests) -----------------------------------


def _keypair(seed: bytes, key_id: bytes) -> tuple[Ed25519PrivateKey, bytes]:
    sk = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())
    pk = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    text = "untrusted comment: test public key\n" + base64.b64encode(b"Ed" + key_id + pk).decode()
    return sk, (text + "\n").encode()


def _sign(
    sk: Ed25519PrivateKey,
    key_id: bytes,
    message: bytes,
    *,
    kind: str,
    trusted: bytes = b"timestamp:1\tfile:x",
) -> bytes:
    if kind == "signify":
        sig = sk.sign(message)
        return (
            b"untrusted comment: verify with key.pub\n"
            + base64.b64encode(b"Ed" + key_id + sig)
            + b"\n"
        )
    alg = b"ED" if kind == "minisign" else b"Ed"
    signed = hashlib.blake2b(message).digest() if alg == b"ED" else message
    sig = sk.sign(signed)
    glob = sk.sign(sig + trusted)
    return (
        b"untrusted comment: signature from test key\n"
        + base64.b64encode(alg + key_id + sig)
        + b"\ntrusted comment: "
        + trusted
        + b"\n"
        + base64.b64encode(glob)
        + b"\n"
    )


# --- real minisign -----------------------------------------------------------------------------


@pytest.fixture
def mkeys(tmp_path: Path) -> tuple[Path, Path, str]:
    need("minisign")
    pub, sec = tmp_path / "k.pub", tmp_path / "k.sec"
    out = run(["minisign", "-G", "-W", "-p", pub, "-s", sec]).stdout.decode()
    key_b64 = re.search(r"-P (\S+)", out)
    assert key_b64 is not None
    return pub, sec, key_b64.group(1)


def _data(tmp_path: Path, size: int = 300_000) -> Path:
    f = tmp_path / "firmware.bin"
    f.write_bytes(bytes(i % 251 for i in range(size)))
    return f


@pytest.mark.peer
@pytest.mark.parametrize("legacy", [False, True])
def test_minisign_signature_verifies(
    tmp_path: Path, mkeys: tuple[Path, Path, str], legacy: bool
) -> None:
    pub, sec, key_b64 = mkeys
    data = _data(tmp_path)
    sig_path = tmp_path / "firmware.bin.minisig"
    run(["minisign", "-S", *(["-l"] if legacy else []), "-s", sec, "-m", data,
         "-t", "release 1.2 for board X"])  # fmt: skip
    run(["minisign", "-V", "-p", pub, "-m", data])  # the tool agrees it is good
    key = load_public_key(pub)
    sig = load_signature(sig_path)
    assert sig.kind == ("minisign-legacy" if legacy else "minisign")
    result = verify_file(sig, key, data)
    assert result.kind == sig.kind
    assert result.trusted_comment == "release 1.2 for board X"
    # The key id is what minisign prints in the public key's comment (minisign prints it
    # as a number: no leading zeros).
    assert key.comment is not None
    assert int(key.comment.split()[-1], 16) == int(result.key_id, 16)
    # The bare base64 string (minisign -P) is the same key.
    bare = parse_public_key(key_b64)
    assert (bare.key_id, bare.public) == (key.key_id, key.public)
    # Tampered file.
    raw = bytearray(data.read_bytes())
    raw[12345] ^= 0x40
    (tmp_path / "bad.bin").write_bytes(bytes(raw))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_file(sig, key, tmp_path / "bad.bin")


@pytest.mark.peer
def test_minisign_tampered_comment_and_signature(
    tmp_path: Path, mkeys: tuple[Path, Path, str]
) -> None:
    pub, sec, _ = mkeys
    data = _data(tmp_path, 1000)
    run(["minisign", "-S", "-s", sec, "-m", data])
    key = load_public_key(pub)
    lines = (tmp_path / "firmware.bin.minisig").read_bytes().split(b"\n")
    # Trusted comment changed: the global signature catches it.
    changed = lines.copy()
    changed[2] = changed[2] + b" (edited)"
    with pytest.raises(SignatureError, match="trusted comment was changed"):
        verify_file(parse_signature(b"\n".join(changed)), key, data)
    # Untrusted comment changed: harmless, still valid.
    changed = lines.copy()
    changed[0] = b"untrusted comment: anything at all"
    verify_file(parse_signature(b"\n".join(changed)), key, data)
    # Signature bytes changed.
    raw = bytearray(base64.b64decode(lines[1]))
    raw[40] ^= 1
    changed = lines.copy()
    changed[1] = base64.b64encode(bytes(raw))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_file(parse_signature(b"\n".join(changed)), key, data)
    # Global signature changed.
    raw = bytearray(base64.b64decode(lines[3]))
    raw[0] ^= 1
    changed = lines.copy()
    changed[3] = base64.b64encode(bytes(raw))
    with pytest.raises(SignatureError, match="trusted comment"):
        verify_file(parse_signature(b"\n".join(changed)), key, data)


@pytest.mark.peer
def test_minisign_wrong_key_names_both_key_ids(
    tmp_path: Path, mkeys: tuple[Path, Path, str]
) -> None:
    pub, sec, _ = mkeys
    data = _data(tmp_path, 100)
    run(["minisign", "-S", "-s", sec, "-m", data])
    other_pub, other_sec = tmp_path / "o.pub", tmp_path / "o.sec"
    run(["minisign", "-G", "-W", "-p", other_pub, "-s", other_sec])
    good = load_public_key(pub)
    other = load_public_key(other_pub)
    sig = load_signature(tmp_path / "firmware.bin.minisig")
    with pytest.raises(SignatureError) as exc:
        verify_file(sig, other, data)
    assert minisign.minisign_key_id(good.key_id) in str(exc.value)
    assert minisign.minisign_key_id(other.key_id) in str(exc.value)
    # Same key id but a different key (forged id): the signature check still fails.
    forged = minisign.PublicKey(good.key_id, other.public, name="forged")
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_file(sig, forged, data)


@pytest.mark.peer
def test_minisign_empty_file(tmp_path: Path, mkeys: tuple[Path, Path, str]) -> None:
    pub, sec, _ = mkeys
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for legacy in ([], ["-l"]):
        run(["minisign", "-S", *legacy, "-s", sec, "-m", empty])
        assert verify_file(load_signature(tmp_path / "empty.minisig"), load_public_key(pub), empty)


# --- real signify ------------------------------------------------------------------------------


@pytest.mark.peer
def test_signify_signature_verifies(tmp_path: Path) -> None:
    need("signify-openbsd")
    pub, sec = tmp_path / "s.pub", tmp_path / "s.sec"
    run(["signify-openbsd", "-G", "-n", "-p", pub, "-s", sec])
    data = _data(tmp_path)
    sig_path = tmp_path / "firmware.bin.sig"
    run(["signify-openbsd", "-S", "-s", sec, "-m", data, "-x", sig_path])
    key = load_public_key(pub)
    sig = load_signature(sig_path)
    assert sig.kind == "signify"
    result = verify_file(sig, key, data)
    assert result.kind == "signify"
    assert result.key_id == key.key_id.hex()
    assert result.trusted_comment is None
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "bad.bin").write_bytes(bytes(raw))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_file(sig, key, tmp_path / "bad.bin")
    # Tampered signature file.
    lines = sig_path.read_bytes().split(b"\n")
    blob = bytearray(base64.b64decode(lines[1]))
    blob[-1] ^= 1
    lines[1] = base64.b64encode(bytes(blob))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_file(parse_signature(b"\n".join(lines)), key, data)
    # Embedded signatures (-e) are refused with a clear message.
    run(["signify-openbsd", "-S", "-e", "-s", sec, "-m", data, "-x", tmp_path / "e.sig"])
    with pytest.raises(SignatureError, match="embedded") as exc:
        load_signature(tmp_path / "e.sig")
    assert "too large" in exc.value.one_line()
    small = _data(tmp_path, 100)
    run(["signify-openbsd", "-S", "-e", "-s", sec, "-m", small, "-x", tmp_path / "s.sig"])
    with pytest.raises(SignatureError, match="embedded"):
        load_signature(tmp_path / "s.sig")


# --- hand-built edge cases ---------------------------------------------------------------------

KEY_ID = bytes.fromhex("0102030405060708")


@pytest.mark.unit
def test_key_file_errors(tmp_path: Path) -> None:
    _, pub = _keypair(b"a", KEY_ID)
    assert parse_public_key(pub).key_id == KEY_ID
    assert parse_public_key(pub.decode().splitlines()[1]).comment is None
    with pytest.raises(KeyFileError, match="is empty"):
        parse_public_key(b"\n\n")
    with pytest.raises(KeyFileError, match="no key line"):
        parse_public_key(b"untrusted comment: x\n")
    with pytest.raises(KeyFileError, match="bad base64"):
        parse_public_key(b"untrusted comment: x\n!!!!\n")
    with pytest.raises(KeyFileError, match="secret key"):
        parse_public_key(base64.b64encode(b"Ed" + bytes(156)))
    with pytest.raises(KeyFileError, match="is a signature"):
        parse_public_key(base64.b64encode(b"Ed" + bytes(72)))
    with pytest.raises(KeyFileError, match="not a minisign/signify Ed25519 public key"):
        parse_public_key(base64.b64encode(b"XX" + bytes(40)))
    with pytest.raises(KeyFileError, match="cannot read public key"):
        load_public_key(tmp_path / "missing.pub")
    (tmp_path / "big.pub").write_bytes(b"x" * (minisign.MAX_FILE_BYTES + 1))
    with pytest.raises(KeyFileError, match="too large"):
        load_public_key(tmp_path / "big.pub")


@pytest.mark.unit
def test_signature_file_errors(tmp_path: Path) -> None:
    sk, _ = _keypair(b"a", KEY_ID)
    good = _sign(sk, KEY_ID, b"m", kind="minisign").split(b"\n")
    with pytest.raises(SignatureError, match="no 'untrusted comment:' line"):
        parse_signature(b"hello\nworld\n")
    with pytest.raises(SignatureError, match="not a valid signature"):
        parse_signature(b"untrusted comment: x\nAAAA\n")
    with pytest.raises(SignatureError, match="unsupported signature algorithm"):
        parse_signature(b"untrusted comment: x\n" + base64.b64encode(b"XY" + bytes(72)))
    with pytest.raises(SignatureError, match="has 4 lines"):
        parse_signature(b"\n".join([*good[:4], b"extra"]))
    with pytest.raises(SignatureError, match="global signature line"):
        parse_signature(b"\n".join([*good[:3], b"AAAA"]))
    with pytest.raises(SignatureError, match="prehashed signature without a trusted comment"):
        parse_signature(b"\n".join(good[:2]))
    with pytest.raises(SourceError, match="cannot read signature"):
        load_signature(tmp_path / "missing.minisig")
    # CRLF line ends (a signature edited on Windows) still verify.
    crlf = _sign(sk, KEY_ID, b"m", kind="minisign").replace(b"\n", b"\r\n")
    _, pub = _keypair(b"a", KEY_ID)
    assert verify_message(parse_signature(crlf), parse_public_key(pub), b"m", target="m")


@pytest.mark.unit
def test_prehashed_helper_refuses_legacy() -> None:
    sk, pub = _keypair(b"a", KEY_ID)
    sig = parse_signature(_sign(sk, KEY_ID, b"m", kind="minisign-legacy"))
    with pytest.raises(SignatureError, match="not a prehashed one"):
        minisign.verify_prehashed(sig, parse_public_key(pub), bytes(64), target="m")


@pytest.mark.unit
def test_large_legacy_file_is_mapped(tmp_path: Path) -> None:
    sk, pub = _keypair(b"big", KEY_ID)
    data = tmp_path / "big.bin"
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB
    data.write_bytes(payload)
    for kind in ("minisign-legacy", "signify", "minisign"):
        sig = parse_signature(_sign(sk, KEY_ID, payload, kind=kind))
        assert verify_file(sig, parse_public_key(pub), data).kind == kind


# --- properties --------------------------------------------------------------------------------


@pytest.mark.unit
@settings(deadline=None, max_examples=100)
@given(
    seed=st.binary(min_size=1, max_size=8),
    key_id=st.binary(min_size=8, max_size=8),
    message=st.binary(max_size=2000),
    trusted=st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"\r" not in b),
    kind=st.sampled_from(minisign.KINDS),
)
def test_round_trip(seed: bytes, key_id: bytes, message: bytes, trusted: bytes, kind: str) -> None:
    sk, pub = _keypair(seed, key_id)
    blob = _sign(sk, key_id, message, kind=kind, trusted=trusted)
    sig = parse_signature(blob)
    key = parse_public_key(pub)
    assert (sig.kind, sig.key_id) == (kind, key_id)
    result = verify_message(sig, key, message, target="m")
    assert result.kind == kind
    if kind == "signify":
        assert result.key_id == key_id.hex()
        assert result.trusted_comment is None
    else:
        assert result.key_id == key_id[::-1].hex().upper()
        assert result.trusted_comment == trusted.decode("utf-8", "replace")
    with pytest.raises(SignatureError):
        verify_message(sig, key, message + b"x", target="m")


@pytest.mark.unit
@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=400))
def test_fuzz_parsers(data: bytes) -> None:
    for blob in (data, b"untrusted comment: x\n" + data):
        try:
            sig = parse_signature(blob)
        except SignatureError:
            pass
        else:
            assert sig.kind in minisign.KINDS
            assert len(sig.signature) == 64
        try:
            key = parse_public_key(blob)
        except KeyFileError:
            pass
        else:
            assert len(key.public) == 32


@pytest.mark.unit
@settings(deadline=None, max_examples=300)
@given(st.data())
def test_fuzz_mutated_signature(data: st.DataObject) -> None:
    sk, pub = _keypair(b"k", KEY_ID)
    kind = data.draw(st.sampled_from(minisign.KINDS))
    original = _sign(sk, KEY_ID, b"payload", kind=kind)
    buf = bytearray(original)
    pos = data.draw(st.integers(0, len(buf) - 1))
    op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if op == "flip":
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "cut":
        del buf[pos:]
    else:
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    mutated = bytes(buf)
    key = parse_public_key(pub)
    try:
        result = verify_message(parse_signature(mutated), key, b"payload", target="m")
    except SignatureError:
        return
    # A mutation that still verifies may only have touched what is not signed: the untrusted
    # comment, or the base64 padding/line ends that decode to the same bytes. Or it cut a legacy
    # minisign signature after its second line: what is left is a valid signify signature (the
    # formats share that layout), without the trusted comment, and reported as such.
    same = parse_signature(original)
    got = parse_signature(mutated)
    assert (got.signature, got.key_id) == (same.signature, same.key_id)
    if result.kind == kind:
        assert got.trusted_comment == same.trusted_comment
    else:
        assert (kind, result.kind, op) == ("minisign-legacy", "signify", "cut")
        assert result.trusted_comment is None
