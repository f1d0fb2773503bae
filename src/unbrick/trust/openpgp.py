"""OpenPGP signatures, checked with the real ``gpgv``.

``gpgv`` is GnuPG's verify-only tool: it trusts every key in the keyrings it is given and
nothing else. We run it as ``gpgv --status-fd 1 --keyring KEYRING SIG DATA`` with

- ``GNUPGHOME`` (and ``--homedir``) set to a new empty private directory, so no key of the
  user's own GnuPG setup is ever trusted. (With ``--keyring``, gpgv 2.2 does not read its
  default ``trustedkeys.kbx`` either; the empty home makes that independent of the version.)
- the keyring copied into that directory, given by absolute path: gpgv reads a bare name
  relative to its home, and may want to write a lock file next to the keyring. An ASCII-armored
  keyring (``gpg --export --armor``) is dearmored here in pure code, as gpgv reads only binary
  keyrings (``gpg --export``) and keybox files (``.kbx``).

The machine-readable status lines decide: a check passes only when there is a ``VALIDSIG`` and
no ``BADSIG``, ``ERRSIG``, ``NO_PUBKEY``, ``EXPSIG``, ``EXPKEYSIG``, ``REVKEYSIG``, ``NODATA``,
``BADARMOR`` or ``UNEXPECTED`` line, and gpgv exits 0.
"""

from __future__ import annotations

import binascii
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from unbrick.errors import KeyFileError, SignatureError, SourceError
from unbrick.tools import Tool
from unbrick.trust import SignatureResult

GPGV = Tool("gpgv", "gpgv")

MAX_KEYRING_BYTES = 64 << 20
MAX_SIGNATURE_BYTES = 1 << 20

_ARMOR_BEGIN = "-----BEGIN PGP "
_ARMOR_END = "-----END PGP "
_SIG_ARMOR = b"-----BEGIN PGP SIGNATURE-----"
_CLEARSIGN = b"-----BEGIN PGP SIGNED MESSAGE-----"

_TAG_SIGNATURE = 2
_TAG_SECRET_KEY = 5
_TAG_PUBLIC_KEY = 6

_WEAK_HASHES = {"1": "MD5", "2": "SHA-1"}
_PK_ALGOS = {"1": "RSA", "3": "RSA", "17": "DSA", "19": "ECDSA", "22": "EdDSA", "27": "Ed25519"}

_CRC24_INIT = 0xB704CE
_CRC24_POLY = 0x1864CFB


def _crc24(data: bytes) -> int:
    crc = _CRC24_INIT
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= _CRC24_POLY
    return crc & 0xFFFFFF


def _packet_tag(first: int) -> int | None:
    """The packet tag of an OpenPGP packet header byte; None if it is not one."""
    if not first & 0x80:
        return None
    if first & 0x40:
        return first & 0x3F
    return (first >> 2) & 0x0F


def looks_like_signature(data: bytes) -> bool:
    """True for an armored or binary OpenPGP signature (or a clear-signed message)."""
    head = data.lstrip()
    if head.startswith((_SIG_ARMOR, _CLEARSIGN)):
        return True
    return bool(data) and _packet_tag(data[0]) == _TAG_SIGNATURE


def is_clearsigned(data: bytes) -> bool:
    return data.lstrip().startswith(_CLEARSIGN)


def dearmor(data: bytes, *, name: str = "keyring") -> bytes:
    """The binary packets of every ASCII-armored block in ``data`` (KeyFileError if damaged).

    Each block's CRC-24 checksum line, when present, is checked.
    """
    text = data.decode("ascii", "replace")
    out = bytearray()
    blocks = 0
    state = "outside"
    body: list[str] = []
    crc_line: str | None = None
    block_type = ""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if state == "outside":
            if line.startswith(_ARMOR_BEGIN) and line.endswith("-----"):
                block_type = line[len(_ARMOR_BEGIN) : -5]
                state, body, crc_line = "headers", [], None
        elif state == "headers":
            if not line:
                state = "body"
            elif ":" not in line:  # no header block: this line is already data
                state = "body"
                body.append(line)
        elif line.startswith(_ARMOR_END):
            if line != f"{_ARMOR_END}{block_type}-----":
                raise KeyFileError(f"{name} line {lineno}: armor END line does not match BEGIN")
            try:
                packets = binascii.a2b_base64("".join(body), strict_mode=True)
            except (binascii.Error, ValueError) as e:
                raise KeyFileError(f"{name}: bad base64 in the armored block") from e
            if crc_line is not None:
                try:
                    crc = binascii.a2b_base64(crc_line, strict_mode=True)
                except (binascii.Error, ValueError) as e:
                    raise KeyFileError(f"{name}: bad armor checksum line") from e
                if len(crc) != 3 or int.from_bytes(crc, "big") != _crc24(packets):
                    raise KeyFileError(
                        f"{name}: armor checksum does not match (the file is damaged)",
                        hint="download or export the key again",
                    )
            if block_type.endswith("PRIVATE KEY BLOCK"):
                raise KeyFileError(
                    f"{name} is a secret key", hint="export the PUBLIC key (gpg --export KEYID)"
                )
            out += packets
            blocks += 1
            state = "outside"
        elif line.startswith("=") and len(line) == 5:
            crc_line = line[1:]
        elif line:
            body.append(line)
    if state != "outside":
        raise KeyFileError(f"{name}: armored block has no END line (the file is truncated)")
    if not blocks:
        raise KeyFileError(f"{name} holds no armored OpenPGP block")
    return bytes(out)


def keyring_bytes(data: bytes, *, name: str = "keyring") -> tuple[bytes, str]:
    """The keyring as gpgv can read it and its form: ``binary``, ``armored`` or ``keybox``."""
    hint = "give a public keyring: gpg --export KEYID > key.gpg (or --armor, or a .kbx file)"
    if len(data) >= 12 and data[8:12] == b"KBXf":
        return data, "keybox"
    form = "binary"
    if data.lstrip().startswith(_ARMOR_BEGIN.encode()):
        data = dearmor(data, name=name)
        form = "armored"
    if not data:
        raise KeyFileError(f"{name} is empty", hint=hint)
    tag = _packet_tag(data[0])
    if tag == _TAG_SECRET_KEY:
        raise KeyFileError(f"{name} is a secret key", hint=hint)
    if tag == _TAG_SIGNATURE:
        raise KeyFileError(f"{name} is a signature, not a keyring", hint=hint)
    if tag != _TAG_PUBLIC_KEY:
        raise KeyFileError(f"{name} is not an OpenPGP keyring", hint=hint)
    return data, form


def load_keyring(path: Path) -> tuple[bytes, str]:
    """Read a keyring file (KeyFileError for every failure) and return :func:`keyring_bytes`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEYRING_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read keyring {path}: {e.strerror or e}") from e
    if len(data) > MAX_KEYRING_BYTES:
        raise KeyFileError(f"keyring {path} is larger than {MAX_KEYRING_BYTES >> 20} MiB")
    return keyring_bytes(data, name=path.name)


@dataclass(frozen=True)
class ValidSig:
    fingerprint: str
    primary_fingerprint: str
    created: str
    pubkey_algo: str
    hash_algo: str


@dataclass
class GpgvStatus:
    """What gpgv's status lines say: good signatures, their details, and every problem."""

    good: list[tuple[str, str]] = field(default_factory=list)
    valid: list[ValidSig] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.valid) and not self.problems


def parse_status(
    text: str, *, keyring: str = "the keyring", signature: str = "signature"
) -> GpgvStatus:
    """Interpret ``[GNUPG:]`` status lines (pure; unknown or short lines are ignored)."""
    st = GpgvStatus()
    for raw in text.splitlines():
        if not raw.startswith("[GNUPG:] "):
            continue
        words = raw[9:].split(" ")
        kw, args = words[0], words[1:]
        rest = " ".join(args[1:])
        keyid = args[0] if args else "?"
        if kw == "GOODSIG":
            st.good.append((keyid, rest))
        elif kw == "VALIDSIG" and len(args) >= 9:
            primary = args[9] if len(args) >= 10 else args[0]
            st.valid.append(ValidSig(args[0], primary, args[1], args[6], args[7]))
        elif kw == "BADSIG":
            st.problems.append(
                f"BAD signature from {rest or keyid} ({keyid}): the file was changed or the"
                " signature is for another file"
            )
        elif kw == "NO_PUBKEY":
            st.problems.append(f"{signature} was made by key {keyid}, which is not in {keyring}")
        elif kw == "ERRSIG":
            rc = args[5] if len(args) >= 6 else "?"
            if rc != "9":  # 9 = no public key: reported by its own NO_PUBKEY line
                algo = args[1] if len(args) >= 2 else "?"
                st.problems.append(
                    f"signature by key {keyid} could not be checked (gpgv error code {rc},"
                    f" public key algorithm {_PK_ALGOS.get(algo, algo)})"
                )
        elif kw == "EXPKEYSIG":
            st.problems.append(f"signature by EXPIRED key {rest or keyid} ({keyid})")
        elif kw == "REVKEYSIG":
            st.problems.append(f"signature by REVOKED key {rest or keyid} ({keyid})")
        elif kw == "EXPSIG":
            st.problems.append(f"the signature by {rest or keyid} ({keyid}) has expired")
        elif kw == "NODATA":
            st.problems.append(f"{signature} holds no OpenPGP signature")
        elif kw == "BADARMOR":
            st.problems.append(f"the ASCII armor of {signature} is damaged")
        elif kw == "UNEXPECTED":
            st.problems.append(f"{signature} holds unexpected data")
    return st


def _run_gpgv(
    keyring: Path, files: list[Path], *, output: Path | None, size_bytes: int, sig_name: str
) -> tuple[GpgvStatus, str]:
    """Run gpgv in a fresh empty home with a private copy of the keyring."""
    data, _form = load_keyring(keyring)
    with tempfile.TemporaryDirectory(prefix="unbrick-gpgv-") as home:
        ring = Path(home, "trusted.kbx" if _form == "keybox" else "trusted.gpg")
        ring.write_bytes(data)
        args = ["--homedir", home, "--status-fd", "1", "--keyring", str(ring)]
        if output is not None:
            args += ["--output", str(output.absolute())]
        args += [str(p.absolute()) for p in files]
        env = dict(os.environ, GNUPGHOME=home, LC_ALL="C", LANGUAGE="C")
        result = GPGV.run(args, check=False, env=env, timeout_s=60.0 + size_bytes / (20 << 20))
    status = parse_status(result.out, keyring=keyring.name, signature=sig_name)
    if result.returncode != 0 and not status.problems:
        lines = [ln for ln in result.err.splitlines() if ln.strip()]
        status.problems.append(
            f"gpgv failed with exit status {result.returncode}: "
            f"{lines[-1].removeprefix('gpgv: ') if lines else 'no output'}"
        )
    return status, result.err


def _result(status: GpgvStatus, sig_name: str, target: str) -> SignatureResult:
    if not status.passed:
        problems = status.problems or [f"{sig_name} holds no valid signature"]
        raise SignatureError(
            f"{sig_name} does not verify {target}: {'; '.join(problems)}",
            hint="do not flash this file; check that you have the signer's public key",
        )
    valid = status.valid[0]
    uid = status.good[0][1] if status.good else None
    weak_hash = next(
        (_WEAK_HASHES[v.hash_algo] for v in status.valid if v.hash_algo in _WEAK_HASHES), None
    )
    return SignatureResult(
        kind="openpgp",
        key_id=valid.primary_fingerprint,
        signer=uid,
        weak=weak_hash is not None,
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e


def verify_detached(signature: Path, data: Path, keyring: Path) -> SignatureResult:
    """Check a detached signature (binary or armored) over ``data`` with only ``keyring``.

    SignatureError when it does not verify; KeyFileError for an unusable keyring; SourceError
    for an unreadable file; ToolError when gpgv is missing or hangs.
    """
    _size(signature)
    status, _ = _run_gpgv(
        keyring, [signature, data], output=None, size_bytes=_size(data), sig_name=signature.name
    )
    return _result(status, signature.name, data.name)


def verify_clearsigned(signed: Path, keyring: Path) -> tuple[SignatureResult, bytes]:
    """Check a clear-signed file; return the result and the signed text as gpgv output it.

    Parse the returned text, never the file itself: only that text is covered by the signature.
    """
    size = _size(signed)
    with tempfile.TemporaryDirectory(prefix="unbrick-clearsigned-") as tmp:
        out = Path(tmp, "signed.txt")
        status, _ = _run_gpgv(keyring, [signed], output=out, size_bytes=size, sig_name=signed.name)
        result = _result(status, signed.name, "its own text")
        try:
            text = out.read_bytes()
        except OSError as e:
            raise SignatureError(f"gpgv wrote no signed text for {signed.name}") from e
    return result, text
