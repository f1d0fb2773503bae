"""Integrity checks for firmware images: checksums and signatures.

- :mod:`unbrick.trust.digests`: several digests of a file in one streaming pass.
- :mod:`unbrick.trust.sums`: checksum files (GNU coreutils and BSD/tagged formats).
- :mod:`unbrick.trust.minisign`: minisign and signify/usign Ed25519 signatures (pure code).
- :mod:`unbrick.trust.openpgp`: detached OpenPGP signatures, checked with ``gpgv``.
- :mod:`unbrick.trust.cms`: X.509 CMS/PKCS#7 detached signatures, checked with ``openssl cms``.
- :mod:`unbrick.trust.verify`: runs the checks a user asked for and reports each one.

This module holds only the result type shared by the signature modules; it imports none of
them, so each can be imported on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SignatureResult:
    """A signature that verified.

    ``kind`` is one of ``minisign``, ``minisign-legacy``, ``signify``, ``openpgp``, ``cms``.
    ``key_id`` identifies the key that signed (minisign key id as minisign prints it, signify
    key number in hex, OpenPGP fingerprint of the signing key, CMS: SHA-256 fingerprint of the
    signer certificate). ``trusted_comment`` is the signed comment of a minisign signature.
    ``signer`` is a human-readable name (OpenPGP user id, certificate subject). ``weak`` is set
    when the signature relies on a broken digest (SHA-1, MD5).
    """

    kind: str
    key_id: str
    trusted_comment: str | None = None
    signer: str | None = None
    weak: bool = False
