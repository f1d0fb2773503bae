"""Checksum files: the GNU coreutils format and the BSD/tagged format.

GNU (``sha256sum``, ``md5sum`` ...)::

    <hex>  <name>          text mode
    <hex> *<name>          binary mode
    <hex> <name>           "reversed BSD" form, as written by ``md5 -r``
    \\<hex>  <escaped>      the name holds a backslash, newline or CR, escaped as \\\\ \\n \\r

The algorithm is inferred from the digest length (32 md5, 40 sha1, 56 sha224, 64 sha256,
96 sha384, 128 sha512). A 128-digit digest is taken as BLAKE2b-512 instead when the checksum
file's name says so (``B2SUMS``, ``*.b2``, ``*blake2*``), as ``b2sum`` writes the same layout.

BSD/tagged (``sha256sum --tag``, BSD ``sha256``, ``cksum -a``, ``openssl dgst``)::

    SHA256 (<name>) = <hex>
    \\SHA256 (<escaped>) = <hex>
    SHA2-256(<name>)= <hex>

Blank lines and ``#`` comments are skipped. A PGP clear-signed checksum file (Fedora's
``CHECKSUM``) is read from its signed text only; checking that signature is the job of
:mod:`unbrick.trust.openpgp`. Lines that parse as neither format are collected with their line
numbers in :attr:`SumsFile.malformed`; a file in which no line parses raises IntegrityError.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

from unbrick.errors import IntegrityError, SourceError, UsageError
from unbrick.trust.digests import DIGEST_HEX_LENGTH, WEAK

MAX_SUMS_BYTES = 16 << 20
"""Largest checksum file read (a checksum line is ~100 bytes: this is >100k entries)."""

_BY_LENGTH = {
    32: "md5",
    40: "sha1",
    56: "sha224",
    64: "sha256",
    96: "sha384",
    128: "sha512",
}

_TAGS = {
    "md5": "md5",
    "sha1": "sha1",
    "sha-1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha2-224": "sha224",
    "sha2-256": "sha256",
    "sha2-384": "sha384",
    "sha2-512": "sha512",
    "blake2b": "blake2b",
    "blake2b-512": "blake2b",
}

_HEX = re.compile(r"[0-9A-Fa-f]+")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9/-]*")
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
_B2_NAME = re.compile(r"b2sum|b2sums|\.b2$|blake2", re.IGNORECASE)

_PGP_SIGNED = "-----BEGIN PGP SIGNED MESSAGE-----"
_PGP_SIGNATURE = "-----BEGIN PGP SIGNATURE-----"


@dataclass(frozen=True)
class SumEntry:
    """One checksum line: ``digest`` is lowercase hex, ``line`` counts from 1."""

    algorithm: str
    digest: str
    name: str
    line: int
    binary: bool = False
    tagged: bool = False

    @property
    def weak(self) -> bool:
        return self.algorithm in WEAK


@dataclass(frozen=True)
class SumsFile:
    """A parsed checksum file. ``name`` is how messages refer to it."""

    name: str
    entries: tuple[SumEntry, ...]
    malformed: tuple[tuple[int, str], ...] = ()
    clearsigned: bool = False

    def problems(self) -> list[str]:
        """One ``"NAME line N: reason"`` string per line that was skipped."""
        return [f"{self.name} line {n}: {reason}" for n, reason in self.malformed]


class _Malformed(Exception):
    """A line that is not a checksum line; the message says why."""


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < n else ""
        if nxt == "\\":
            out.append("\\")
        elif nxt == "n":
            out.append("\n")
        elif nxt == "r":
            out.append("\r")
        else:
            raise _Malformed(f"invalid escape '\\{nxt}' in the file name")
        i += 2
    return "".join(out)


def _escape(name: str) -> tuple[bool, str]:
    if not any(c in name for c in "\\\n\r"):
        return False, name
    return True, name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _algorithm_for_length(length: int, blake2_hint: bool) -> str:
    algorithm = _BY_LENGTH.get(length)
    if algorithm is None:
        raise _Malformed(f"a digest of {length} hex digits matches no supported algorithm")
    if algorithm == "sha512" and blake2_hint:
        return "blake2b"
    return algorithm


def _parse_tagged(text: str, escaped: bool, lineno: int) -> SumEntry | None:
    """``TAG (name) = hex``; None when the line does not have that shape at all."""
    m = _TAG.match(text)
    if m is None:
        return None
    rest = text[m.end() :]
    if rest.startswith(" ("):
        rest = rest[2:]
    elif rest.startswith("("):
        rest = rest[1:]
    else:
        return None
    eq = rest.rfind("=")
    if eq < 0:
        return None
    hexpart = rest[eq + 1 :]
    hexpart = hexpart.removeprefix(" ")
    head = rest[:eq]
    head = head.removesuffix(" ")
    if not head.endswith(")") or not hexpart or not _HEXDIGITS.issuperset(hexpart):
        return None
    tag = m.group()
    algorithm = _TAGS.get(tag.lower())
    if algorithm is None:
        raise _Malformed(f"unsupported checksum algorithm '{tag}'")
    if len(hexpart) != DIGEST_HEX_LENGTH[algorithm]:
        raise _Malformed(
            f"{tag} digest has {len(hexpart)} hex digits, expected {DIGEST_HEX_LENGTH[algorithm]}"
        )
    name = head[:-1]
    if escaped:
        name = _unescape(name)
    if not name:
        raise _Malformed("no file name")
    return SumEntry(algorithm, hexpart.lower(), name, lineno, tagged=True)


def _parse_gnu(text: str, escaped: bool, lineno: int, blake2_hint: bool) -> SumEntry:
    m = _HEX.match(text)
    if m is None:
        raise _Malformed("not a checksum line (expected 'HEX  NAME' or 'ALGO (NAME) = HEX')")
    digest = m.group()
    rest = text[m.end() :]
    if not rest or rest[0] not in " \t":
        raise _Malformed("expected a space between the digest and the file name")
    algorithm = _algorithm_for_length(len(digest), blake2_hint)
    rest = rest[1:]
    binary = False
    if len(rest) >= 2 and rest[0] in " *":
        binary = rest[0] == "*"
        rest = rest[1:]
    name = _unescape(rest) if escaped else rest
    if not name:
        raise _Malformed("no file name after the digest")
    return SumEntry(algorithm, digest.lower(), name, lineno, binary=binary)


def _parse_line(text: str, lineno: int, blake2_hint: bool) -> SumEntry:
    text = text.lstrip(" \t")
    escaped = text.startswith("\\")
    if escaped:
        text = text[1:]
    entry = _parse_tagged(text, escaped, lineno)
    if entry is not None:
        return entry
    return _parse_gnu(text, escaped, lineno, blake2_hint)


def _signed_region(lines: list[str]) -> tuple[list[tuple[int, str]], bool]:
    """The numbered lines to parse: all of them, or the signed text of a clear-signed file."""
    numbered = list(enumerate(lines, start=1))
    first = next((t for _, t in numbered if t.strip()), "")
    if first.strip() != _PGP_SIGNED:
        return numbered, False
    out: list[tuple[int, str]] = []
    state = "before"
    for lineno, text in numbered:
        if state == "before":
            if text.strip() == _PGP_SIGNED:
                state = "headers"
        elif state == "headers":
            if not text.strip():
                state = "body"
        elif text.strip() == _PGP_SIGNATURE:
            break
        else:
            out.append((lineno, text[2:] if text.startswith("- ") else text))
    return out, True


def parse_sums(data: bytes, *, name: str = "checksum file") -> SumsFile:
    """Parse a checksum file's bytes. IntegrityError when it holds no checksum line at all."""
    blake2_hint = bool(_B2_NAME.search(os.path.basename(name)))
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    region, clearsigned = _signed_region(lines)
    entries: list[SumEntry] = []
    malformed: list[tuple[int, str]] = []
    for lineno, raw in region:
        line = raw.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            entries.append(_parse_line(line, lineno, blake2_hint))
        except _Malformed as e:
            malformed.append((lineno, str(e)))
    if not entries:
        hint = "check that this is a checksum file (sha256sum or BSD format); download it again"
        if malformed:
            lineno, reason = malformed[0]
            raise IntegrityError(
                f"{name} has no valid checksum line (line {lineno}: {reason})", hint=hint
            )
        raise IntegrityError(f"{name} lists no checksums", hint=hint)
    return SumsFile(name, tuple(entries), tuple(malformed), clearsigned)


def read_sums_bytes(path: Path) -> bytes:
    """The bytes of a checksum file, at most :data:`MAX_SUMS_BYTES`; SourceError otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SUMS_BYTES + 1)
    except OSError as e:
        raise SourceError(f"cannot read checksum file {path}: {e.strerror or e}") from e
    if len(data) > MAX_SUMS_BYTES:
        raise SourceError(
            f"checksum file {path} is larger than {MAX_SUMS_BYTES >> 20} MiB",
            hint="give the checksum file, not the image, as --sums",
        )
    return data


def load_sums(path: Path) -> SumsFile:
    """Read and parse a checksum file (SourceError if unreadable, IntegrityError if empty)."""
    return parse_sums(read_sums_bytes(path), name=path.name)


def _parts(name: str) -> tuple[str, ...]:
    # Entries are POSIX paths; "./a" and "a" are the same file, "//" collapses.
    return tuple(p for p in name.replace(os.sep, "/").split("/") if p not in ("", "."))


def lookup(sums: SumsFile, filename: str | os.PathLike[str]) -> tuple[SumEntry, ...]:
    """The entries for ``filename``: one per algorithm, strong algorithms first.

    An entry matches when its path is a trailing part of ``filename``'s path (``fw.bin`` and
    ``out/fw.bin`` both match ``/home/me/out/fw.bin``); failing that, when its base name is the
    file's base name. Raises IntegrityError when the file is not listed, or listed twice with
    different digests of one algorithm.
    """
    target = _parts(os.fspath(filename))
    base = PurePath(os.fspath(filename)).name or os.fspath(filename)
    if not target:
        raise IntegrityError(f"'{base}' is not a file name", hint="give the image file")

    def suffix_match(entry: SumEntry) -> bool:
        parts = _parts(entry.name)
        return bool(parts) and len(parts) <= len(target) and target[-len(parts) :] == parts

    found = [e for e in sums.entries if suffix_match(e)]
    if not found:
        found = [e for e in sums.entries if _parts(e.name)[-1:] == target[-1:]]
    if not found:
        raise IntegrityError(
            f"{base} is not listed in {sums.name}",
            hint="check that this checksum file belongs to this image (file names must match)",
        )
    by_algorithm: dict[str, SumEntry] = {}
    for entry in found:
        seen = by_algorithm.get(entry.algorithm)
        if seen is None:
            by_algorithm[entry.algorithm] = entry
        elif seen.digest != entry.digest:
            raise IntegrityError(
                f"{sums.name} lists {base} twice with different {entry.algorithm} digests"
                f" (lines {seen.line} and {entry.line})",
                hint="the checksum file is inconsistent; download it again from the official"
                " source",
            )
    return tuple(sorted(by_algorithm.values(), key=lambda e: (e.weak, e.line)))


def format_entry(
    algorithm: str, digest: str, name: str, *, tagged: bool = False, binary: bool = False
) -> str:
    """One checksum line (without newline) exactly as coreutils writes it.

    ``tagged`` gives the ``--tag`` (BSD) form, ``binary`` the ``*name`` GNU form. Names holding
    a backslash, newline or CR are escaped and the line starts with a backslash.
    """
    if algorithm not in DIGEST_HEX_LENGTH:
        raise UsageError(f"unknown digest algorithm {algorithm!r}")
    escaped, text = _escape(name)
    prefix = "\\" if escaped else ""
    if tagged:
        tag = "BLAKE2b" if algorithm == "blake2b" else algorithm.upper()
        return f"{prefix}{tag} ({text}) = {digest.lower()}"
    return f"{prefix}{digest.lower()} {'*' if binary else ' '}{text}"
