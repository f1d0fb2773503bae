"""Run the integrity checks a user asked for on one file and report each of them.

:func:`verify_file` never raises for a check that fails: the report says which check failed and
why, and :attr:`VerifyReport.ok` is True only when at least one check ran and all passed. It
raises UsageError for contradictory requests and SourceError when the image itself cannot be
read. Problems with the other inputs (an unusable key, a missing signature file, gpgv not
installed) are failed checks whose ``error`` names the error class, so a front end can still
show every result at once.

Which file a signature covers: many releases sign the checksum file rather than the image
(``SHA256SUMS.gpg``, OpenWrt's ``sha256sums.sig``). When ``sums`` is given, the signature is
tried over the checksum file first (it is small) and then over the image; either way the chain
is sound, because the ``sums`` check must also pass for the report to be ok. A PGP clear-signed
checksum file (Fedora's ``CHECKSUM``) is checked with ``gpg_keyring`` and no ``signature``;
its entries are then read from the text gpgv verified.

The image is read once for every digest needed (the explicit SHA-256, the checksum file's
algorithms, and BLAKE2b-512 for a prehashed minisign signature). A legacy minisign or signify
signature maps the file; gpgv and openssl read it themselves.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unbrick.errors import (
    IntegrityError,
    KeyFileError,
    SignatureError,
    SourceError,
    ToolError,
    UsageError,
)
from unbrick.trust import SignatureResult, cms, minisign, openpgp
from unbrick.trust.digests import hash_file
from unbrick.trust.sums import SumEntry, SumsFile, lookup, parse_sums, read_sums_bytes

MAX_SIGNATURE_BYTES = 16 << 20

_CHECK_ERRORS = (IntegrityError, KeyFileError, SourceError, ToolError)
_SHA256 = re.compile(r"[0-9a-f]{64}")

_KIND_NAMES = {
    "minisign": "a minisign/signify",
    "openpgp": "an OpenPGP",
    "cms": "a CMS/PKCS#7",
}
_KEY_FLAGS = {
    "minisign": "a minisign/signify key",
    "openpgp": "an OpenPGP keyring",
    "cms": "a CA certificate",
}


@dataclass(frozen=True)
class Check:
    """One check: ``id`` is ``sha256``, ``sums``, ``sums-openpgp``, ``minisign``, ``signify``,
    ``openpgp`` or ``cms``. ``weak`` marks a pass that rests on MD5 or SHA-1. ``error`` is the
    name of the error class behind a failure (``SignatureError``, ``KeyFileError``...)."""

    id: str
    passed: bool
    detail: str
    weak: bool = False
    error: str | None = None


@dataclass
class VerifyReport:
    path: Path
    checks: list[Check] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    signature: SignatureResult | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True only if at least one check was requested and every check passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def weak(self) -> bool:
        """True when some passing check rests on a weak digest."""
        return any(c.passed and c.weak for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        sig = self.signature
        return {
            "path": str(self.path),
            "ok": self.ok,
            "checks": [
                {
                    "id": c.id,
                    "passed": c.passed,
                    "detail": c.detail,
                    "weak": c.weak,
                    "error": c.error,
                }
                for c in self.checks
            ],
            "digests": dict(self.digests),
            "signature": None
            if sig is None
            else {
                "kind": sig.kind,
                "key_id": sig.key_id,
                "signer": sig.signer,
                "trusted_comment": sig.trusted_comment,
                "weak": sig.weak,
            },
            "warnings": list(self.warnings),
        }


def _failed(check_id: str, e: Exception, *, also: str = "") -> Check:
    """A failed check from an error: its message, then ``also``, then its hint."""
    if isinstance(e, _CHECK_ERRORS):
        text = " ".join(f"{e.message}{also}".split())
        if e.hint:
            text += f"; {e.hint}"
    else:  # pragma: no cover - only the errors above are caught
        text = f"{e}{also}"
    return Check(check_id, False, text, error=type(e).__name__)


def _normalise_sha256(value: str) -> str:
    text = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(text):
        raise UsageError(
            f"'{value}' is not a SHA-256 digest", hint="give the 64 hex digits of the digest"
        )
    return text


def detect_signature_kind(data: bytes) -> str | None:
    """``minisign`` (minisign or signify), ``openpgp``, ``cms``, or None if unrecognised."""
    if minisign.looks_like(data):
        return "minisign"
    if openpgp.looks_like_signature(data):
        return "openpgp"
    if cms.looks_like(data):
        return "cms"
    return None


@dataclass
class _Signature:
    """The signature request: its file, the key kind, the loaded key (for minisign)."""

    path: Path
    key_kind: str
    key_path: Path
    check_id: str
    parsed: minisign.EdSignature | None = None
    key: minisign.PublicKey | None = None
    result: SignatureResult | None = None
    covers: str | None = None
    failure: Exception | None = None
    sums_failure: Exception | None = None

    @property
    def pending(self) -> bool:
        return self.result is None and self.failure is None

    @property
    def prehashed(self) -> bool:
        return self.parsed is not None and self.parsed.prehashed


def _prepare_signature(sig: _Signature) -> None:
    """Read the signature file, check its kind against the key's, load a minisign key."""
    try:
        with open(sig.path, "rb") as f:
            data = f.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as e:
        sig.failure = SourceError(f"cannot read signature {sig.path}: {e.strerror or e}")
        return
    kind = detect_signature_kind(data)
    if kind != sig.key_kind:
        what = (
            f"{_KIND_NAMES[kind]} signature"
            if kind
            else "not a minisign, signify, OpenPGP or CMS signature"
        )
        sig.failure = SignatureError(
            f"{sig.path.name} is {what}, but the key given is {_KEY_FLAGS[sig.key_kind]}",
            hint="give the key that matches the signature's kind",
        )
        return
    if kind == "minisign":
        try:
            sig.parsed = minisign.parse_signature(data, name=sig.path.name)
            sig.check_id = "signify" if sig.parsed.kind == minisign.KIND_SIGNIFY else "minisign"
            sig.key = minisign.load_public_key(sig.key_path)
            minisign.check_key_id(sig.parsed, sig.key)
        except _CHECK_ERRORS as e:
            sig.failure = e


def _verify_signature_over(
    sig: _Signature, target: Path, *, purpose: str, data: bytes | None = None
) -> SignatureResult:
    """One attempt: the signature over ``target`` (``data`` holds its bytes when small)."""
    if sig.key_kind == "minisign":
        assert sig.parsed is not None and sig.key is not None
        if data is not None:
            return minisign.verify_message(sig.parsed, sig.key, data, target=target.name)
        return minisign.verify_file(sig.parsed, sig.key, target)
    if sig.key_kind == "openpgp":
        return openpgp.verify_detached(sig.path, target, sig.key_path)
    return cms.verify_detached(sig.path, target, sig.key_path, purpose=purpose)


def _try_signature(
    sig: _Signature, target: Path, *, purpose: str, data: bytes | None = None, sums: bool
) -> None:
    try:
        sig.result = _verify_signature_over(sig, target, purpose=purpose, data=data)
        sig.covers = "sums" if sums else "image"
    except _CHECK_ERRORS as e:
        if sums:
            sig.sums_failure = e
        else:
            sig.failure = e


def _signature_check(sig: _Signature, image: Path, sums_path: Path | None) -> Check:
    if sig.result is None:
        err = sig.failure or sig.sums_failure
        assert err is not None
        also = ""
        if sig.sums_failure is not None and sig.failure is not None and sums_path is not None:
            also = f" (nor is it a valid signature of {sums_path.name})"
        return _failed(sig.check_id, err, also=also)
    res = sig.result
    target = sums_path.name if sig.covers == "sums" and sums_path is not None else image.name
    detail = f"good {res.kind} signature of {target} by {res.signer or res.key_id}"
    if res.trusted_comment is not None:
        detail += f"; trusted comment: {res.trusted_comment}"
    if sig.covers == "sums":
        detail += f" (it covers the checksum file, which must list {image.name})"
    if res.weak:
        detail += "; WEAK: the signature uses SHA-1 or MD5"
    return Check(sig.check_id, True, detail, weak=res.weak)


def _sums_check(
    sums: SumsFile | None, failure: Exception | None, entries: tuple[SumEntry, ...],
    digests: dict[str, str],
) -> Check:  # fmt: skip
    if failure is not None:
        return _failed("sums", failure)
    assert sums is not None
    good: list[str] = []
    for e in entries:
        got = digests[e.algorithm]
        if not hmac.compare_digest(got, e.digest):
            return Check(
                "sums",
                False,
                f"{e.algorithm} MISMATCH with {sums.name} line {e.line}: expected {e.digest},"
                f" got {got}",
                weak=e.weak,
                error=IntegrityError.__name__,
            )
        good.append(f"{e.algorithm} ({sums.name} line {e.line})")
    weak = all(e.weak for e in entries)
    detail = "matches " + ", ".join(good)
    if weak:
        detail += (
            "; WEAK: "
            + "/".join(sorted({e.algorithm.upper() for e in entries}))
            + " does not protect against deliberate tampering"
        )
    return Check("sums", True, detail, weak=weak)


def verify_file(
    path: Path,
    *,
    sha256: str | None = None,
    sums: Path | None = None,
    signature: Path | None = None,
    minisign_key: Path | None = None,
    gpg_keyring: Path | None = None,
    cms_ca: Path | None = None,
    cms_purpose: str = "any",
) -> VerifyReport:
    """Run every requested check on ``path`` and report each (see the module docstring)."""
    keys = [
        (kind, p)
        for kind, p in (("minisign", minisign_key), ("openpgp", gpg_keyring), ("cms", cms_ca))
        if p is not None
    ]
    if len(keys) > 1:
        raise UsageError(
            "give only one kind of key: --minisign-key, --gpg-keyring or --cms-ca",
            hint="a signature is checked with the one key of its own kind",
        )
    if cms_purpose not in cms.PURPOSES:
        raise UsageError(
            f"unknown certificate purpose '{cms_purpose}'",
            hint=f"use one of: {', '.join(cms.PURPOSES)}",
        )
    expected_sha256 = _normalise_sha256(sha256) if sha256 is not None else None

    report = VerifyReport(path)

    sums_bytes: bytes | None = None
    sums_failure: Exception | None = None
    if sums is not None:
        try:
            sums_bytes = read_sums_bytes(sums)
        except SourceError as e:
            sums_failure = e
    clearsigned = sums_bytes is not None and openpgp.is_clearsigned(sums_bytes)

    if signature is not None and not keys:
        raise UsageError(
            "a signature needs a key to check it with",
            hint="add --minisign-key, --gpg-keyring or --cms-ca",
        )
    if keys and signature is None and not (gpg_keyring is not None and clearsigned):
        raise UsageError(
            f"{_KEY_FLAGS[keys[0][0]]} was given but no signature to check",
            hint="add --sig with the signature file",
        )

    # Clear-signed checksum file: its entries come from the text gpgv verified.
    if sums is not None and sums_bytes is not None and clearsigned:
        if gpg_keyring is not None:
            try:
                res, signed_text = openpgp.verify_clearsigned(sums, gpg_keyring)
                report.checks.append(
                    Check(
                        "sums-openpgp",
                        True,
                        f"good OpenPGP signature of {sums.name} by {res.signer or res.key_id}",
                        weak=res.weak,
                    )
                )
                if signature is None:
                    report.signature = res
                sums_bytes = signed_text
            except _CHECK_ERRORS as e:
                report.checks.append(_failed("sums-openpgp", e))
        else:
            report.warnings.append(
                f"{sums.name} is clear-signed but its signature was not checked"
                " (give --gpg-keyring)"
            )

    parsed_sums: SumsFile | None = None
    entries: tuple[SumEntry, ...] = ()
    if sums is not None and sums_bytes is not None:
        try:
            parsed_sums = parse_sums(sums_bytes, name=sums.name)
            report.warnings.extend(parsed_sums.problems())
            entries = lookup(parsed_sums, path)
        except IntegrityError as e:
            sums_failure = e

    sig: _Signature | None = None
    if signature is not None:
        key_kind, key_path = keys[0]
        sig = _Signature(signature, key_kind, key_path, key_kind)
        _prepare_signature(sig)
        if sig.pending and sums is not None and sums_bytes is not None and not clearsigned:
            _try_signature(sig, sums, purpose=cms_purpose, data=sums_bytes, sums=True)

    algorithms: list[str] = []
    if expected_sha256 is not None:
        algorithms.append("sha256")
    algorithms += [e.algorithm for e in entries]
    if sig is not None and sig.pending and sig.prehashed:
        algorithms.append("blake2b")
    # One pass for every digest; with none needed this still proves the image is readable.
    # SourceError escapes: without the image there is nothing to check.
    report.digests = hash_file(path, algorithms)

    if expected_sha256 is not None:
        got = report.digests["sha256"]
        if hmac.compare_digest(got, expected_sha256):
            report.checks.append(Check("sha256", True, "sha256 matches"))
        else:
            report.checks.append(
                Check(
                    "sha256",
                    False,
                    f"sha256 MISMATCH: expected {expected_sha256}, got {got}",
                    error=IntegrityError.__name__,
                )
            )

    if sums is not None:
        report.checks.append(_sums_check(parsed_sums, sums_failure, entries, report.digests))

    if sig is not None:
        if sig.pending:
            if sig.prehashed:
                assert sig.parsed is not None and sig.key is not None
                try:
                    sig.result = minisign.verify_prehashed(
                        sig.parsed,
                        sig.key,
                        bytes.fromhex(report.digests["blake2b"]),
                        target=path.name,
                    )
                    sig.covers = "image"
                except _CHECK_ERRORS as e:
                    sig.failure = e
            else:
                _try_signature(sig, path, purpose=cms_purpose, sums=False)
        report.checks.append(_signature_check(sig, path, sums))
        if sig.result is not None:
            report.signature = sig.result
    return report
