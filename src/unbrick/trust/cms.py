"""X.509 CMS/PKCS#7 detached signatures (RAUC, SWUpdate), checked with ``openssl cms``.

We run::

    openssl cms -verify -binary -inform DER|PEM -in SIG -content DATA
        -CAfile CA.pem -no-CApath -no-CAstore -purpose PURPOSE
        -signer SIGNERS.pem -out /dev/null

- Only the certificates in the CA file the user gives are trust anchors: ``-no-CApath`` and
  ``-no-CAstore`` keep the system store out (``-CAfile`` replaces the default file). The
  certificates embedded in the signature are used as untrusted intermediates only, so they can
  complete a chain to the given CA but never stand on their own: a self-signed signer that
  embeds itself fails ("self-signed certificate").
- Validity periods are checked at the current time, so an expired signer fails.
- ``-binary`` keeps OpenSSL from canonicalising line endings of the content.

Purpose: OpenSSL's default for ``cms -verify`` is ``smimesign``, which rejects the
``codeSigning``-only certificates that SWUpdate setups use; RAUC lets each device choose
(``check-purpose``). The question we answer is "is this file signed by a certificate that
chains to this CA", so the default here is ``any``; ``smimesign`` asks OpenSSL for the S/MIME
check, and ``codesign`` (which OpenSSL 3.0 lacks) verifies with ``any`` and then requires the
signer certificate's extended key usage to include ``codeSigning``, as SWUpdate does. The
signer's extended key usages are reported so a mismatch with the device is visible.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from unbrick.errors import KeyFileError, SignatureError, SourceError, UsageError
from unbrick.tools import Tool
from unbrick.trust import SignatureResult

if TYPE_CHECKING:  # x509 loads only when a CMS signature is checked (it is slow to import)
    from cryptography import x509

OPENSSL = Tool("openssl", "openssl")

PURPOSES = ("any", "smimesign", "codesign")

MAX_CA_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 16 << 20

_SIGNED_DATA_OID = bytes.fromhex("06092a864886f70d010702")
_PEM_HEADERS = (b"-----BEGIN PKCS7-----", b"-----BEGIN CMS-----")

#: Extended key usages by OID (RFC 5280, 4.2.1.12).
_EKU_NAMES = {
    "1.3.6.1.5.5.7.3.3": "codeSigning",
    "1.3.6.1.5.5.7.3.4": "emailProtection",
    "1.3.6.1.5.5.7.3.1": "serverAuth",
    "1.3.6.1.5.5.7.3.2": "clientAuth",
    "1.3.6.1.5.5.7.3.8": "timeStamping",
    "2.5.29.37.0": "anyExtendedKeyUsage",
}

# Substrings of OpenSSL's verify errors -> what to tell the user.
_CHAIN_ERRORS = (
    ("self-signed certificate", "the signer certificate is self-signed and is not in {ca}"),
    ("self signed certificate", "the signer certificate is self-signed and is not in {ca}"),
    ("unable to get local issuer certificate", "the signer certificate is not issued by {ca}"),
    ("unable to get issuer certificate", "the signer certificate is not issued by {ca}"),
    ("certificate has expired", "a certificate in the chain has EXPIRED"),
    ("certificate is not yet valid", "a certificate in the chain is not valid yet"),
    ("unsuitable certificate purpose", "the signer certificate is not for purpose '{purpose}'"),
    ("invalid CA certificate", "a certificate in the chain is not a valid CA certificate"),
    ("certificate signature failure", "a certificate in the chain has a bad signature"),
)


def looks_like(data: bytes) -> bool:
    """True for a PEM CMS/PKCS#7 block or a DER SignedData ContentInfo."""
    if data.lstrip().startswith(_PEM_HEADERS):
        return True
    return data[:1] == b"\x30" and _SIGNED_DATA_OID in data[:32]


def _signature_form(signature: Path) -> str:
    try:
        with open(signature, "rb") as f:
            head = f.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as e:
        raise SourceError(f"cannot read signature {signature}: {e.strerror or e}") from e
    if len(head) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{signature.name} is too large to be a CMS signature")
    if head.lstrip().startswith(_PEM_HEADERS):
        return "PEM"
    if looks_like(head):
        return "DER"
    raise SignatureError(
        f"{signature.name} is not a CMS/PKCS#7 signature (neither DER nor PEM)",
        hint="give the detached .p7s/.cms/.sig file that was published with the image",
    )


def load_ca(path: Path) -> list[x509.Certificate]:
    """The certificates of a CA file (PEM with one or more, or one DER); KeyFileError if none."""
    from cryptography import x509  # noqa: PLC0415 - slow to import; only for CMS

    hint = "give the CA certificate (PEM or DER) that the device trusts"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read CA file {path}: {e.strerror or e}", hint=hint) from e
    if len(data) > MAX_CA_BYTES:
        raise KeyFileError(f"CA file {path} is larger than {MAX_CA_BYTES >> 20} MiB", hint=hint)
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY-----" in data:
            raise KeyFileError(f"{path.name} holds a private key", hint=hint)
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise KeyFileError(f"{path.name} holds no usable PEM certificate", hint=hint) from e
    else:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError as e:
            raise KeyFileError(
                f"{path.name} is not an X.509 certificate (PEM or DER)", hint=hint
            ) from e
    if not certs:
        raise KeyFileError(f"{path.name} holds no certificate", hint=hint)
    return certs


def _eku(cert: x509.Certificate) -> list[str]:
    from cryptography import x509  # noqa: PLC0415 - slow to import; only for CMS

    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return []
    return [_EKU_NAMES.get(oid.dotted_string, oid.dotted_string) for oid in ext.value]


def _weak_hash(cert: x509.Certificate) -> bool:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return False
    return isinstance(algorithm, hashes.SHA1 | hashes.MD5)


def _explain(stderr: str, *, sig: str, target: str, ca: str, purpose: str) -> str:
    text = stderr
    for needle, message in _CHAIN_ERRORS:
        if needle in text:
            return message.format(ca=ca, purpose=purpose)
    if "content verify error" in text or "digest failure" in text:
        return f"BAD signature: {target} was changed or {sig} is for another file"
    if "signer certificate not found" in text:
        return f"{sig} holds no signer certificate"
    if "Error reading" in text or "unable to load" in text.lower():
        return f"{sig} could not be read as a CMS signature"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return f"openssl cms failed: {lines[-1] if lines else 'no output'}"


def verify_detached(
    signature: Path, data: Path, ca: Path, *, purpose: str = "any"
) -> SignatureResult:
    """Check a detached CMS signature over ``data`` against the CA certificates in ``ca``.

    SignatureError when it does not verify; KeyFileError for an unusable CA file; SourceError
    for unreadable files; ToolError when openssl is missing or hangs.
    """
    from cryptography import x509  # noqa: PLC0415 - slow to import; only for CMS

    if purpose not in PURPOSES:
        raise UsageError(
            f"unknown certificate purpose '{purpose}'", hint="use any, smimesign or codesign"
        )
    form = _signature_form(signature)
    ca_certs = load_ca(ca)
    try:
        size = data.stat().st_size
    except OSError as e:
        raise SourceError(f"cannot read {data}: {e.strerror or e}") from e
    with tempfile.TemporaryDirectory(prefix="unbrick-cms-") as tmp:
        ca_pem = Path(tmp, "ca.pem")
        ca_pem.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca_certs))
        signers_pem = Path(tmp, "signers.pem")
        args = [
            "cms", "-verify", "-binary",
            "-inform", form,
            "-in", str(signature.absolute()),
            "-content", str(data.absolute()),
            "-CAfile", str(ca_pem),
            "-no-CApath", "-no-CAstore",
            "-purpose", "any" if purpose == "codesign" else purpose,
            "-signer", str(signers_pem),
            "-out", os.devnull,
        ]  # fmt: skip
        result = OPENSSL.run(args, check=False, timeout_s=60.0 + size / (20 << 20))
        if result.returncode != 0:
            reason = _explain(
                result.err, sig=signature.name, target=data.name, ca=ca.name, purpose=purpose
            )
            raise SignatureError(
                f"{signature.name} does not verify {data.name}: {reason}",
                hint="do not flash this file; check that you have the right CA certificate",
            )
        try:
            signers = x509.load_pem_x509_certificates(signers_pem.read_bytes())
        except (OSError, ValueError) as e:
            raise SignatureError(f"openssl did not report the signer of {signature.name}") from e
    leaf = signers[0]
    usages = _eku(leaf)
    if purpose == "codesign" and "codeSigning" not in usages:
        raise SignatureError(
            f"{signature.name}: the signer certificate is not for code signing"
            f" (extended key usage: {', '.join(usages) or 'none'})",
            hint="the device would reject it; sign with a codeSigning certificate",
        )
    subjects = "; ".join(c.subject.rfc4514_string() for c in signers)
    if usages:
        subjects += f" (extended key usage: {', '.join(usages)})"
    weak = any(_weak_hash(c) for c in signers)
    return SignatureResult(
        kind="cms",
        key_id=leaf.fingerprint(hashes.SHA256()).hex(),
        signer=subjects,
        weak=weak,
    )
