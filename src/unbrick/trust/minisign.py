"""minisign and signify/usign Ed25519 signatures, verified in pure code.

Layouts (all base64 lines decode to little structures that start with a two-byte algorithm):

- public key (minisign, signify, OpenWrt usign alike)::

      untrusted comment: <text>
      base64("Ed" || key_id[8] || public_key[32])

  The comment line may be missing (minisign's ``-P`` string is the bare base64 line).
- minisign signature::

      untrusted comment: <text>
      base64(alg[2] || key_id[8] || signature[64])
      trusted comment: <text>
      base64(global_signature[64])

  ``alg`` is ``ED`` (prehashed, minisign's default since 0.8: the signature is over the
  BLAKE2b-512 digest of the file) or ``Ed`` (legacy: over the file itself). The global
  signature is over ``signature || trusted comment`` and makes the trusted comment tamper-proof.
- signify/usign signature: the first two lines only, always ``Ed`` over the file itself.

A legacy minisign signature cut after its second line is a valid signify signature of the same
file by the same key: the layouts coincide. It is then reported as ``signify``, with no trusted
comment, which is what it is; the trusted comment can be dropped that way but never altered.

A prehashed signature needs one streaming pass over the file. Ed25519 over a whole file needs
the whole message at once; it is mapped with ``mmap`` so a large image is not copied into memory.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from unbrick.errors import KeyFileError, SignatureError, SourceError
from unbrick.trust import SignatureResult
from unbrick.trust.digests import hash_stream

MAX_FILE_BYTES = 64 << 10
"""Largest key or signature file read: these are a few hundred bytes."""

MAX_UNMAPPED_BYTES = 256 << 20
"""A legacy signature over a file that cannot be mapped reads it into memory up to this size."""

_UNTRUSTED = b"untrusted comment:"
_TRUSTED = b"trusted comment: "
_ALG_LEGACY = b"Ed"
_ALG_PREHASHED = b"ED"

_KEY_LEN = 2 + 8 + 32
_SIG_LEN = 2 + 8 + 64
_MINISIGN_SECRET_LEN = 158
_SIGNIFY_SECRET_LEN = 104

KIND_MINISIGN = "minisign"
KIND_MINISIGN_LEGACY = "minisign-legacy"
KIND_SIGNIFY = "signify"
KINDS = (KIND_MINISIGN, KIND_MINISIGN_LEGACY, KIND_SIGNIFY)


def minisign_key_id(key_id: bytes) -> str:
    """A key id as minisign prints it: the little-endian 64-bit number in upper-case hex."""
    return key_id[::-1].hex().upper()


def signify_key_id(key_id: bytes) -> str:
    """A signify/usign key number as usign names key files: the bytes in lower-case hex."""
    return key_id.hex()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key from a minisign or signify/usign public key file."""

    key_id: bytes
    public: bytes
    comment: str | None = None
    name: str = "public key"


@dataclass(frozen=True)
class EdSignature:
    """A parsed minisign or signify signature file; ``kind`` is one of :data:`KINDS`."""

    kind: str
    key_id: bytes
    signature: bytes
    untrusted_comment: str
    trusted_comment: bytes | None = None
    global_signature: bytes | None = None
    name: str = "signature"

    @property
    def prehashed(self) -> bool:
        return self.kind == KIND_MINISIGN

    def key_id_text(self) -> str:
        if self.kind == KIND_SIGNIFY:
            return signify_key_id(self.key_id)
        return minisign_key_id(self.key_id)

    def trusted_comment_text(self) -> str | None:
        if self.trusted_comment is None:
            return None
        return self.trusted_comment.decode("utf-8", "replace")


def _lines(data: bytes) -> list[bytes]:
    return [line.removesuffix(b"\r") for line in data.split(b"\n")]


def _b64(line: bytes) -> bytes | None:
    try:
        return binascii.a2b_base64(line.strip(), strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def looks_like(data: bytes) -> bool:
    """True when ``data`` starts like a minisign/signify key or signature file."""
    return data.lstrip().startswith(_UNTRUSTED)


def parse_public_key(data: bytes | str, *, name: str = "public key") -> PublicKey:
    """Parse a public key file, or the bare base64 key string. KeyFileError if unusable."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    hint = "give the minisign/signify public key (.pub file or its base64 line)"
    lines = [line.strip() for line in _lines(raw) if line.strip()]
    if not lines:
        raise KeyFileError(f"{name} is empty", hint=hint)
    comment: str | None = None
    if lines[0].startswith(_UNTRUSTED):
        comment = lines[0][len(_UNTRUSTED) :].strip().decode("utf-8", "replace")
        if len(lines) < 2:
            raise KeyFileError(f"{name} has a comment line but no key line", hint=hint)
        body = lines[1]
    else:
        body = lines[0]
    decoded = _b64(body)
    if decoded is None:
        raise KeyFileError(f"{name} is not a minisign/signify public key (bad base64)", hint=hint)
    if len(decoded) in (_MINISIGN_SECRET_LEN, _SIGNIFY_SECRET_LEN) or (
        comment is not None and "secret key" in comment and "signature" not in comment
    ):
        raise KeyFileError(
            f"{name} is a secret key", hint="give the PUBLIC key (.pub); keep the secret key safe"
        )
    if len(decoded) == _SIG_LEN:
        raise KeyFileError(f"{name} is a signature, not a public key", hint=hint)
    if len(decoded) != _KEY_LEN or decoded[:2] != _ALG_LEGACY:
        raise KeyFileError(
            f"{name} is not a minisign/signify Ed25519 public key"
            f" ({len(decoded)} bytes, algorithm {decoded[:2]!r})",
            hint=hint,
        )
    return PublicKey(decoded[2:10], decoded[10:], comment, name)


def load_public_key(path: Path) -> PublicKey:
    """Read and parse a public key file: SourceError-free, every failure is a KeyFileError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read public key {path}: {e.strerror or e}") from e
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"{path} is too large to be a minisign/signify public key")
    return parse_public_key(data, name=path.name)


def parse_signature(data: bytes, *, name: str = "signature") -> EdSignature:
    """Parse a minisign or signify/usign signature file. SignatureError if malformed."""
    hint = "give the .minisig/.sig file that was published with the image"
    lines = _lines(data)
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) < 2 or not lines[0].startswith(_UNTRUSTED):
        raise SignatureError(
            f"{name} is not a minisign/signify signature (no 'untrusted comment:' line)",
            hint=hint,
        )
    untrusted = lines[0][len(_UNTRUSTED) :].strip().decode("utf-8", "replace")
    decoded = _b64(lines[1])
    if decoded is None or len(decoded) != _SIG_LEN:
        raise SignatureError(f"{name}: the signature line is not a valid signature", hint=hint)
    alg, key_id, signature = decoded[:2], decoded[2:10], decoded[10:]
    if alg not in (_ALG_LEGACY, _ALG_PREHASHED):
        raise SignatureError(f"{name}: unsupported signature algorithm {alg!r}", hint=hint)
    if len(lines) >= 3 and lines[2].startswith(_TRUSTED):
        if len(lines) != 4:
            raise SignatureError(
                f"{name}: a minisign signature has 4 lines, this one has {len(lines)}", hint=hint
            )
        global_signature = _b64(lines[3])
        if global_signature is None or len(global_signature) != 64:
            raise SignatureError(f"{name}: the global signature line is not valid", hint=hint)
        kind = KIND_MINISIGN if alg == _ALG_PREHASHED else KIND_MINISIGN_LEGACY
        trusted = lines[2][len(_TRUSTED) :]
        return EdSignature(kind, key_id, signature, untrusted, trusted, global_signature, name)
    if alg != _ALG_LEGACY:
        raise SignatureError(f"{name}: prehashed signature without a trusted comment", hint=hint)
    if len(lines) > 2:
        raise SignatureError(
            f"{name}: extra lines after the signature (an embedded 'signify -e' signature?)",
            hint="give a detached signature made with 'signify -S' without -e",
        )
    return EdSignature(KIND_SIGNIFY, key_id, signature, untrusted, name=name)


def load_signature(path: Path) -> EdSignature:
    """Read and parse a signature file; SourceError if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SourceError(f"cannot read signature {path}: {e.strerror or e}") from e
    if len(data) > MAX_FILE_BYTES:
        raise SignatureError(
            f"{path.name} is too large to be a detached minisign/signify signature"
            " (an embedded 'signify -e' signature?)",
            hint="give the detached .minisig/.sig file that was published with the image",
        )
    return parse_signature(data, name=path.name)


def check_key_id(sig: EdSignature, key: PublicKey) -> None:
    """SignatureError naming both key ids when ``sig`` was not made with ``key``."""
    if hmac.compare_digest(sig.key_id, key.key_id):
        return
    show = signify_key_id if sig.kind == KIND_SIGNIFY else minisign_key_id
    raise SignatureError(
        f"{sig.name} was made with key {show(sig.key_id)}, but {key.name} is key"
        f" {show(key.key_id)}",
        hint="use the public key of whoever signed this file",
    )


def _ed25519(key: PublicKey) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(key.public)
    except ValueError as e:
        raise KeyFileError(f"{key.name} does not hold a valid Ed25519 key") from e


def _finish(sig: EdSignature, pub: Ed25519PublicKey) -> SignatureResult:
    if sig.trusted_comment is not None:
        if sig.global_signature is None:  # pragma: no cover - parse_signature sets both
            raise SignatureError(f"{sig.name}: the global signature is missing")
        try:
            pub.verify(sig.global_signature, sig.signature + sig.trusted_comment)
        except InvalidSignature as e:
            raise SignatureError(
                f"{sig.name}: the trusted comment was changed after signing",
                hint="do not trust this signature file; download it again",
            ) from e
    signer = f"{'signify' if sig.kind == KIND_SIGNIFY else 'minisign'} key {sig.key_id_text()}"
    return SignatureResult(
        kind=sig.kind,
        key_id=sig.key_id_text(),
        trusted_comment=sig.trusted_comment_text(),
        signer=signer,
    )


def _bad(sig: EdSignature, target: str) -> SignatureError:
    return SignatureError(
        f"BAD signature: {sig.name} is not a valid signature of {target}",
        hint="do not flash this file: it was changed, or the signature belongs to another file",
    )


def verify_message(
    sig: EdSignature, key: PublicKey, message: bytes | bytearray | memoryview, *, target: str
) -> SignatureResult:
    """Verify a signature over ``message`` held in memory (prehashed kinds hash it first)."""
    check_key_id(sig, key)
    pub = _ed25519(key)
    if sig.prehashed:
        signed: bytes | bytearray | memoryview = hashlib.blake2b(message).digest()
    else:
        signed = message
    try:
        pub.verify(sig.signature, signed)
    except InvalidSignature as e:
        raise _bad(sig, target) from e
    return _finish(sig, pub)


def verify_prehashed(
    sig: EdSignature, key: PublicKey, blake2b_digest: bytes, *, target: str
) -> SignatureResult:
    """Verify a prehashed (``ED``) minisign signature given the BLAKE2b-512 digest of the file."""
    if not sig.prehashed:
        raise SignatureError(f"{sig.name} is a {sig.kind} signature, not a prehashed one")
    check_key_id(sig, key)
    pub = _ed25519(key)
    try:
        pub.verify(sig.signature, blake2b_digest)
    except InvalidSignature as e:
        raise _bad(sig, target) from e
    return _finish(sig, pub)


def verify_file(sig: EdSignature, key: PublicKey, path: Path) -> SignatureResult:
    """Verify a signature over a file, streaming (prehashed) or mapping it (legacy, signify).

    SignatureError for any failed check; SourceError when the file cannot be read.
    """
    check_key_id(sig, key)
    try:
        with open(path, "rb") as f:
            if sig.prehashed:
                digest = hash_stream(f, ["blake2b"])["blake2b"]
                return verify_prehashed(sig, key, bytes.fromhex(digest), target=path.name)
            return _verify_mapped(sig, key, f, path)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e


def _verify_mapped(sig: EdSignature, key: PublicKey, f: BinaryIO, path: Path) -> SignatureResult:
    fileno = f.fileno()
    size = os.fstat(fileno).st_size
    if size == 0:
        return verify_message(sig, key, b"", target=path.name)
    try:
        mapped = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        # Not mappable (a pipe or special file): read it, within a bound.
        data = f.read(MAX_UNMAPPED_BYTES + 1)
        if len(data) > MAX_UNMAPPED_BYTES:
            raise SourceError(
                f"{path} cannot be memory-mapped and is too large to read into memory",
                hint="copy it to a regular file first",
            ) from None
        return verify_message(sig, key, data, target=path.name)
    try:
        with memoryview(mapped) as view:
            return verify_message(sig, key, view, target=path.name)
    finally:
        mapped.close()
