"""Inspect, convert and verify image files."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from unbrick.errors import SourceError, UsageError
from unbrick.formats import compress, elf, ihex, sparse, srec, uf2
from unbrick.formats.base import CHUNK, HEAD_SIZE, Context, Limits, Source, Stream
from unbrick.formats.detect import detect, detect_head, inspect_source, sniff_source
from unbrick.formats.memmap import DEFAULT_MAX_SPAN, RawLayout
from unbrick.trust import digests

log = logging.getLogger(__name__)

COMPRESSED = ("gzip", "xz", "zstd", "bzip2")
#: Formats ``convert --to raw`` expands, and the targets ``convert`` writes.
TO_RAW = ("android-sparse", "ihex", "srec", "uf2", "elf", *COMPRESSED)
TARGETS = ("raw", "sparse", "ihex", "srec", "uf2")
#: Targets that place a flat image at an address.
ADDRESSED = ("ihex", "srec", "uf2")


@dataclass
class ImageReport:
    """The outcome of ``image inspect`` for one file."""

    path: str
    format: str
    size: int
    sha256: str
    problems: list[str]
    warnings: list[str]
    details: dict[str, Any]

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "valid": self.valid,
            "problems": self.problems,
            "warnings": self.warnings,
            "details": self.details,
        }


@dataclass
class ConvertReport:
    """The outcome of ``image convert``."""

    source: str
    source_format: str
    output: str
    target: str
    size: int
    #: SHA-256 of the output, when asked for (it costs a second read of the output).
    sha256: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_format": self.source_format,
            "output": self.output,
            "to": self.target,
            "size": self.size,
            "sha256": self.sha256,
            "details": self.details,
        }


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for reading, translating OS errors into SourceError."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the context manager
    except FileNotFoundError as e:
        raise SourceError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise SourceError(f"{path}: is a directory, not an image file") from e
    except OSError as e:
        raise SourceError(f"{path}: cannot open: {e.strerror}") from e
    try:
        yield f
    except OSError as e:
        raise SourceError(f"{path}: read failed: {e.strerror}") from e
    finally:
        f.close()


def companion_for(path: Path) -> Path | None:
    """The image a bmap file describes, found beside it by bmaptool's naming conventions."""
    name = path.name
    candidates: list[Path] = []
    if name.endswith(".bmap"):
        stem = name[: -len(".bmap")]
        candidates.append(path.with_name(stem))
        candidates.extend(path.with_name(stem + ext) for ext in (".img", ".raw", ".wic", ".bin"))
    return next((c for c in candidates if c.is_file()), None)


def inspect_path(
    path: Path, *, limits: Limits | None = None, companion: Path | None = None
) -> ImageReport:
    """Detect and check the image at ``path``.

    For a bmap file the image it describes is checked too: ``companion`` or the file found
    beside it.
    """
    ctx = Context(limits=limits or Limits())
    with open_image(path) as f, open_image(path) as h:
        # The digest is taken on a thread of its own (hashlib works without the GIL) while the
        # format is checked: a large image costs its hash, not its hash and its check.
        hasher = ThreadPoolExecutor(1, thread_name_prefix="unbrick-hash")
        hashing = hasher.submit(digests.hash_stream, h, ["sha256"])
        hasher.shutdown(wait=False)
        src = Source(f, name=str(path))
        spec = detect(sniff_source(src))
        if spec.name == "bmap":
            other = companion or companion_for(path)
            if other is not None:
                with open_image(other) as g:
                    ctx.companion = Source(g, name=str(other))
                    findings = inspect_source(src, ctx)
                    findings.details.setdefault("image_path", str(other))
            else:
                findings = inspect_source(src, ctx)
        else:
            findings = inspect_source(src, ctx)
        return ImageReport(
            path=str(path),
            format=findings.format,
            size=src.size,
            sha256=hashing.result()["sha256"],
            problems=list(findings.problems),
            warnings=list(findings.warnings),
            details=findings.details,
        )


class ReportCache:
    """Image reports shared by the jobs of one command: each image is inspected (hashed,
    decompressed to be checked) once however many targets take it.

    An entry is known by the file's path, device, inode, size and change times, so an image
    changed meanwhile is inspected again. Thread-safe: a caller asking for an image another is
    inspecting waits for that report.
    """

    def __init__(self, *, limits: Limits | None = None) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._entries: dict[tuple[object, ...], _CacheEntry] = {}
        #: Images inspected (not found in the cache).
        self.inspected = 0

    def inspect(self, path: Path) -> ImageReport:
        try:
            st = os.stat(path)
        except OSError:
            return inspect_path(path, limits=self.limits)  # says what is wrong with it
        key: tuple[object, ...] = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size)
        key += (st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            entry = self._entries.setdefault(key, _CacheEntry(threading.Lock()))
        with entry.lock:
            if entry.report is None:
                entry.report = inspect_path(path, limits=self.limits)
                self.inspected += 1
            return entry.report


@dataclass
class _CacheEntry:
    lock: threading.Lock
    report: ImageReport | None = None


class _Peeked:
    """A forward-only stream with its first bytes already read (for detection)."""

    def __init__(self, head: bytes, rest: Stream) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                data, self._head = self._head, b""
                more = self._rest.read(-1 if n < 0 else n - len(data))
                return data + more
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._rest.read(n)


def _read_head(stream: Stream, n: int = HEAD_SIZE) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _copy(stream: Stream, out: IO[bytes]) -> int:
    total = 0
    while True:
        data = stream.read(CHUNK)
        if not data:
            return total
        out.write(data)
        total += len(data)


def _layout_details(layout: RawLayout) -> dict[str, Any]:
    return {
        "base_address": layout.base_address,
        "segments": [list(s) for s in layout.segments],
    }


@dataclass(frozen=True)
class RawOptions:
    """How address-based formats (HEX, S-record, UF2, ELF) become a flat image."""

    #: Byte written into gaps between segments.
    fill: int = 0xFF
    #: Largest address span written; a HEX file spanning 4 GiB is refused, not written.
    max_span: int = DEFAULT_MAX_SPAN
    #: UF2 family to extract when a file holds several, or to write into a UF2 output.
    family_id: int | None = None
    #: Address of the first byte when writing HEX/S-record/UF2 (default: the input's own
    #: lowest address, or 0 for a raw input).
    base_address: int | None = None
    #: Entry point written into a HEX/S-record output.
    entry: int | None = None


def _to_raw(
    src: Source, fmt: str, out: BinaryIO, ctx: Context, opts: RawOptions, workdir: Path
) -> dict[str, Any]:
    """Write the raw image that ``src`` (of format ``fmt``) describes into ``out``."""
    if fmt == "android-sparse":
        sparse.expand(_SourceStream(src), out, ctx)
        return {}
    if fmt == "ihex":
        layout = ihex.to_raw(src, out, ctx, fill=opts.fill, max_span=opts.max_span)
        return _layout_details(layout)
    if fmt == "srec":
        layout = srec.to_raw(src, out, ctx, fill=opts.fill, max_span=opts.max_span)
        return _layout_details(layout)
    if fmt == "uf2":
        layout = uf2.to_raw(
            src, out, ctx, fill=opts.fill, max_span=opts.max_span, family_id=opts.family_id
        )
        return _layout_details(layout)
    if fmt == "elf":
        layout = elf.to_raw(src, out, ctx, fill=opts.fill, max_span=opts.max_span)
        return _layout_details(layout)
    if fmt in COMPRESSED:
        inner = compress.open_decompressor(fmt, _SourceStream(src), ctx, compressed_size=src.size)
        head = _read_head(inner)
        inner_fmt = detect_head(head)
        stream = _Peeked(head, inner)
        if inner_fmt == "android-sparse":
            sparse.expand(stream, out, ctx)
        elif inner_fmt in TO_RAW:
            # Random-access formats inside a stream: spool the inner file, then convert it.
            with tempfile.TemporaryFile(dir=workdir) as spool:
                _copy(stream, spool)
                spool.flush()
                inner_src = Source(spool, name=f"{src.name} ({fmt} content)")
                details = _to_raw(inner_src, inner_fmt, out, ctx.nested(), opts, workdir)
                return {"inner_format": inner_fmt, **details}
        else:
            _copy(stream, out)
        return {"inner_format": inner_fmt}
    if fmt == "raw":
        _copy(_SourceStream(src), out)
        return {}
    raise UsageError(
        f"cannot convert a {fmt} image to raw",
        hint=f"convert --to raw accepts: {', '.join(TO_RAW)}",
    )


class _SourceStream:
    """Forward-only reading over a Source."""

    def __init__(self, src: Source) -> None:
        self._src = src
        self._pos = 0

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = self._src.size - self._pos
        data = self._src.read_upto(self._pos, n)
        self._pos += len(data)
        return data


def _write_addressed(raw: Source, target: str, out: BinaryIO, base: int, opts: RawOptions) -> int:
    if target == "ihex":
        return ihex.write_ihex(raw, out, base, opts.entry)
    if target == "srec":
        return srec.write_srec(raw, out, base, opts.entry)
    return uf2.write_uf2(raw, out, base_address=base, family_id=opts.family_id)


def _to_addressed(
    src: Source,
    fmt: str,
    target: str,
    out: BinaryIO,
    ctx: Context,
    opts: RawOptions,
    workdir: Path,
) -> dict[str, Any]:
    """Write ``src`` as Intel HEX, S-records or UF2, going through a raw image if needed."""
    if fmt == "raw":
        base = opts.base_address if opts.base_address is not None else 0
        records = _write_addressed(src, target, out, base, opts)
        return {"base_address": base, "records": records}
    with tempfile.TemporaryFile(dir=workdir) as tmp:
        details = _to_raw(src, fmt, tmp, ctx, opts, workdir)
        tmp.flush()
        at = opts.base_address
        if at is None:
            at = int(details.get("base_address", 0))
        records = _write_addressed(Source(tmp), target, out, at, opts)
    return {**details, "base_address": at, "records": records}


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A temp file beside ``path``, fsynced and renamed over it only on success."""
    directory = path.parent if str(path.parent) else Path()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    except OSError as e:
        raise SourceError(f"{path}: cannot create output: {e.strerror}") from e
    ok = False
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        ok = True
    except OSError as e:
        raise SourceError(f"{path}: write failed: {e.strerror}") from e
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def convert_path(
    src_path: Path,
    out_path: Path,
    target: str,
    *,
    limits: Limits | None = None,
    block_size: int = 4096,
    raw_options: RawOptions | None = None,
    hash_output: bool = False,
) -> ConvertReport:
    """Convert ``src_path`` to ``target`` (one of TARGETS); ``out_path`` is written atomically.

    ``raw`` expands any format of ``TO_RAW``; ``sparse`` writes an Android sparse image;
    ``ihex``, ``srec`` and ``uf2`` place the (expanded) image at an address.
    """
    if target not in TARGETS:
        raise UsageError(f"unknown target '{target}'", hint=f"use one of: {', '.join(TARGETS)}")
    if out_path.exists() and out_path.resolve() == src_path.resolve():
        raise UsageError("output would overwrite the input", hint="choose another -o path")
    ctx = Context(limits=limits or Limits())
    opts = raw_options or RawOptions()
    workdir = out_path.parent if str(out_path.parent) else Path()
    with open_image(src_path) as f:
        src = Source(f, name=str(src_path))
        fmt = detect(sniff_source(src)).name
        details: dict[str, Any]
        with _atomic_output(out_path) as out:
            if target == "raw":
                details = _to_raw(src, fmt, out, ctx, opts, workdir)
            elif target in ADDRESSED:
                details = _to_addressed(src, fmt, target, out, ctx, opts, workdir)
            elif fmt == "raw":
                stats = sparse.write_sparse(src, out, ctx, block_size=block_size)
                details = stats.to_dict()
            elif fmt == "android-sparse":
                raise UsageError(f"{src_path} is already an Android sparse image")
            else:
                with tempfile.TemporaryFile(dir=workdir) as tmp:
                    details = _to_raw(src, fmt, tmp, ctx, opts, workdir)
                    tmp.flush()
                    stats = sparse.write_sparse(Source(tmp), out, ctx, block_size=block_size)
                    details.update(stats.to_dict())
            size = out.seek(0, os.SEEK_END)
            sha: str | None = None
            if hash_output:
                out.seek(0)
                sha = digests.hash_stream(out, ["sha256"])["sha256"]
    return ConvertReport(
        source=str(src_path),
        source_format=fmt,
        output=str(out_path),
        target=target,
        size=size,
        sha256=sha,
        details=details,
    )


__all__ = [
    "ADDRESSED",
    "COMPRESSED",
    "TARGETS",
    "TO_RAW",
    "ConvertReport",
    "ImageReport",
    "RawOptions",
    "companion_for",
    "convert_path",
    "inspect_path",
]
