"""The streaming block writer: one image, read once, written to one or more targets.

The calling thread reads the image (:meth:`Image.produce`: ``pread`` of a file, or a
decompressor) and hands each piece (``chunk_bytes``, 4 MiB by default) to every target. Each
target has a writer thread: ``pwrite``, and every ``writeback_bytes`` a
``posix_fadvise(DONTNEED)`` that starts the kernel's writeback at once, so that the final
``fsync`` does not wait for a card's worth of dirty pages (without read-back the writer also
waits for an older batch: a few batches at most are dirty). Success is reported after ``fsync``.

When verifying, verifier threads read each written piece back, bypassing the page cache, and
compare it with the bytes it was written from (kept until then: ``verify_window_bytes`` per
target, beyond which the writer waits, which also bounds memory):

- ``O_DIRECT`` into an aligned buffer (the default). A direct read first makes the kernel write
  the range out, so the verifiers trail the writer by ``verify_lag_bytes``. On a regular file a
  direct read holds the inode lock that buffered writes need, so there the verifiers run in
  bursts while the writer waits; on a block device they run alongside it.
- ``drop-cache`` (chosen, or where ``O_DIRECT`` is refused): ``sync_file_range``, then
  ``posix_fadvise(DONTNEED)``, then ``RWF_NOWAIT`` probes that prove the range left the cache,
  then a plain read; a range still cached is read directly after all.

A piece that reads back wrong is written once more and read again; what stays wrong is named by
byte range (4 KiB precision) and, with a bmap, by block range.

A target that fails (I/O error, verification) does not stop the others: each has its own
progress and :class:`TargetResult`. A bad image stops all of them; :meth:`Image.precheck` runs
first so that a bad bmap range or an image that does not fit is refused before anything is
written.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unbrick.errors import (
    DeviceError,
    JobError,
    PreflightError,
    SourceError,
    UnbrickError,
    UsageError,
    VerifyError,
)
from unbrick.formats.base import KiB, Limits, MiB
from unbrick.safety.results import CheckResult
from unbrick.transports.block.image import FLASH_LIMITS, Image, ImageInfo
from unbrick.transports.block.target import (
    CHECK_SIZE,
    BlockTarget,
    System,
    open_reader,
    open_target,
)

log = logging.getLogger(__name__)

#: Alignment of direct reads (covers 512- and 4096-byte logical sectors).
ALIGN = 4096
#: Granularity with which a bad range is reported.
REPORT_BLOCK = 4 * KiB
#: Batches of ``writeback_bytes`` in flight before the writer (without read-back) waits.
_DIRTY_BATCHES = 3
#: Distance between the RWF_NOWAIT probes that check a range left the page cache.
_PROBE_STEP = 128 * KiB
_MAX_REPORTED = 64


@dataclass(frozen=True)
class WriteProgress:
    """One progress report. ``target`` is None for phases of the image (check, count)."""

    target: str | None
    #: "check" (bmap checksums), "count" (size of a stream), "write", "verify", "sync",
    #: "done" or "failed".
    phase: str
    done_bytes: int
    #: 0 when not known.
    total_bytes: int


ProgressFn = Callable[[WriteProgress], None]
#: Called with (target path, offset, length) after a piece is written and before it is read
#: back: fault injection for tests and demonstrations.
VerifyHook = Callable[[str, int, int], None]


@dataclass(frozen=True)
class WriteOptions:
    """How images are written. Sizes in bytes."""

    #: Read every written piece back (bypassing the page cache) and compare.
    verify: bool = True
    chunk_bytes: int = 4 * MiB
    #: Pieces queued between the image reader and each target's writer.
    queue_pieces: int = 4
    #: Bytes written but not yet verified, per target (the writer waits beyond this).
    verify_window_bytes: int = 64 * MiB
    #: Threads reading back each target (several direct reads in flight keep the device busy).
    verify_threads: int = 2
    #: Verifying alongside the writer, a piece is read back once this many bytes were written
    #: after it (None: half the window): the kernel has begun writing it out by then.
    verify_lag_bytes: int | None = None
    #: How a piece is read back: "direct" (O_DIRECT) or "drop-cache" (write the range out,
    #: drop it from the page cache, check with RWF_NOWAIT reads that it is gone, read it; a
    #: range still cached is read directly). Where O_DIRECT is refused, drop-cache is used.
    verify_read: Literal["direct", "drop-cache"] = "direct"
    #: "alongside" (verify while writing), "bursts" (the writer waits while the window is
    #: verified) or "auto": bursts for direct reads of regular files (a direct read holds the
    #: file's inode lock, which would stall each buffered write meanwhile), alongside otherwise.
    verify_schedule: Literal["auto", "alongside", "bursts"] = "auto"
    #: Start the kernel's writeback after this many bytes (0: leave it to the kernel).
    writeback_bytes: int = 32 * MiB
    #: Check bmap checksums and count an unknown size before writing anything.
    precheck: bool = True
    #: Mapped data of at most this size read for the bmap check is kept for writing (no
    #: second read of the image).
    retain_bytes: int = 128 * MiB
    #: Write a piece that read back wrong once more before failing.
    rewrite_bad: bool = True
    limits: Limits = FLASH_LIMITS
    #: The member of a zip archive to write (when the archive holds several files).
    zip_member: str | None = None
    #: Least time between two progress reports of one target (completion is always reported).
    progress_interval_s: float = 0.2
    before_verify: VerifyHook | None = None

    def __post_init__(self) -> None:
        if self.chunk_bytes < ALIGN or self.chunk_bytes % ALIGN:
            raise UsageError(f"chunk_bytes {self.chunk_bytes} must be a multiple of {ALIGN}")
        if min(self.queue_pieces, self.verify_threads) < 1:
            raise UsageError("queue_pieces and verify_threads must be at least 1")
        if self.verify_window_bytes < self.chunk_bytes:
            raise UsageError("verify_window_bytes must be at least chunk_bytes")
        if self.verify_lag_bytes is not None and not (
            0 <= self.verify_lag_bytes < self.verify_window_bytes
        ):
            raise UsageError("verify_lag_bytes must be smaller than verify_window_bytes")


@dataclass(frozen=True)
class TargetResult:
    """What happened to one target."""

    target: str
    ok: bool
    written_bytes: int
    verified_bytes: int
    #: "o-direct", "fadvise" (page cache dropped before reading back) or "none".
    verify_method: str
    #: (offset, length) ranges that read back wrong once and were good after a rewrite.
    rewritten: tuple[tuple[int, int], ...]
    #: (offset, length) ranges that stayed wrong.
    bad_ranges: tuple[tuple[int, int], ...]
    error: UnbrickError | None
    elapsed_s: float
    checks: tuple[CheckResult, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "ok": self.ok,
            "written_bytes": self.written_bytes,
            "verified_bytes": self.verified_bytes,
            "verify_method": self.verify_method,
            "rewritten": [list(r) for r in self.rewritten],
            "bad_ranges": [list(r) for r in self.bad_ranges],
            "error": self.error.one_line() if self.error else None,
            "error_type": type(self.error).__name__ if self.error else None,
            "elapsed_s": round(self.elapsed_s, 3),
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class WriteResult:
    """The image and every target's outcome."""

    image: ImageInfo
    targets: tuple[TargetResult, ...]
    elapsed_s: float
    #: An error of the image itself (it stopped every target).
    source_error: UnbrickError | None = None

    @property
    def ok(self) -> bool:
        return self.source_error is None and all(t.ok for t in self.targets)

    def raise_for_failure(self) -> None:
        """Raise the image's error, or the first target's error; nothing when all went well."""
        if self.source_error is not None:
            raise self.source_error
        for t in self.targets:
            if t.error is not None:
                raise t.error

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "image": self.image.to_dict(),
            "targets": [t.to_dict() for t in self.targets],
            "elapsed_s": round(self.elapsed_s, 3),
            "source_error": self.source_error.one_line() if self.source_error else None,
        }


# ---------------------------------------------------------------------------------------------
# One target


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= off:
            end = max(out[-1][0] + out[-1][1], off + n)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, n))
    return out


def _differing(off: int, got: bytes, want: bytes) -> list[tuple[int, int]]:
    """(offset, length) runs of REPORT_BLOCK-sized blocks where ``got`` differs from ``want``."""
    runs: list[tuple[int, int]] = []
    n = len(want)
    for i in range(0, n, REPORT_BLOCK):
        j = min(n, i + REPORT_BLOCK)
        if got[i:j] != want[i:j]:
            if runs and runs[-1][0] + runs[-1][1] == off + i:
                runs[-1] = (runs[-1][0], runs[-1][1] + j - i)
            else:
                runs.append((off + i, j - i))
    return runs


class _Throttle:
    def __init__(self, fn: ProgressFn | None, interval_s: float) -> None:
        self.fn = fn
        self.interval_s = interval_s
        self.last = 0.0

    def __call__(self, p: WriteProgress, force: bool = False) -> None:
        if self.fn is None:
            return
        now = time.monotonic()
        if force or now - self.last >= self.interval_s:
            self.last = now
            try:
                self.fn(p)
            except Exception:  # a broken progress display must not break the write
                log.exception("progress callback failed")


class _Worker:
    """A target's writer thread and verifier threads.

    Written pieces wait in ``_pending`` until a verifier takes them; ``_unverified`` counts
    their bytes against ``verify_window_bytes``. On a block device the verifiers run alongside
    the writer. On a regular file they run in bursts while the writer waits: a direct read
    holds the file's inode lock, which would stall every buffered write meanwhile.
    """

    def __init__(
        self,
        target: BlockTarget,
        opts: WriteOptions,
        total_bytes: int,
        image_size: int | None,
        progress: ProgressFn | None,
        describe: Callable[[int, int], str],
    ) -> None:
        self.t = target
        self.opts = opts
        self.total = total_bytes
        self.image_size = image_size
        self.describe = describe
        self.pieces: queue.Queue[tuple[int, bytes] | None] = queue.Queue(opts.queue_pieces)
        self.failed = threading.Event()
        self.error: UnbrickError | None = None
        self.written = 0
        self.verified = 0
        self.rewritten: list[tuple[int, int]] = []
        self.bad: list[tuple[int, int]] = []
        self.method = "none"
        self.started = time.monotonic()
        self.elapsed = 0.0
        self._wprog = _Throttle(progress, opts.progress_interval_s)
        self._vprog = _Throttle(progress, opts.progress_interval_s)
        self._progress = progress
        self._lock = threading.Lock()
        self._limit = target.size_bytes if target.is_block else None
        # Verification queue, guarded by _cv.
        self._cv = threading.Condition()
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque()
        self._unverified = 0
        #: Bytes in ``_pending`` (not yet taken by a verifier).
        self._queued = 0
        #: The writer has written everything: verify without waiting for the lag.
        self._draining = False
        self._drop = opts.verify_read == "drop-cache"
        mode = opts.verify_schedule
        self._bursts = mode == "bursts" or (
            mode == "auto" and not target.is_block and not self._drop
        )
        self._release = not self._bursts
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_loop, name=f"unbrick-write-{target.path}", daemon=True
        )
        self._verifiers = [
            threading.Thread(
                target=self._verify_loop, name=f"unbrick-verify-{i}-{target.path}", daemon=True
            )
            for i in range(opts.verify_threads if opts.verify else 0)
        ]

    def start(self) -> None:
        self._writer.start()
        for v in self._verifiers:
            v.start()

    def fail(self, err: UnbrickError) -> None:
        with self._lock:
            if self.error is None:
                self.error = err
                log.error("%s: %s", self.t.path, err.one_line())
        self.failed.set()
        with self._cv:
            self._cv.notify_all()

    def put(self, piece: tuple[int, bytes] | None) -> None:
        self.pieces.put(piece)

    def join(self) -> None:
        self._writer.join()
        for v in self._verifiers:
            v.join()
        if self.bad and not self.failed.is_set():
            self.fail(self._verify_error())
        self.elapsed = time.monotonic() - self.started
        phase = "failed" if self.error else "done"
        _Throttle(self._progress, 0)(
            WriteProgress(self.t.path, phase, self.written, self.total), force=True
        )

    # -- writing -----------------------------------------------------------------------------

    def _pwrite(self, off: int, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        fd = self.t.fd
        while done < len(view):
            try:
                n = os.pwrite(fd, view[done:], off + done)
            except OSError as e:
                raise _io_error(self.t.path, "write", off + done, e) from e
            if n <= 0:
                raise DeviceError(
                    f"{self.t.path}: write at offset {off + done} wrote nothing "
                    "(end of the device?)"
                )
            done += n

    def _hand_to_verifiers(self, off: int, data: bytes) -> None:
        window = self.opts.verify_window_bytes
        with self._cv:
            self._pending.append((off, data))
            self._queued += len(data)
            self._unverified += len(data)
            self._cv.notify_all()
            if self._bursts:
                if self._unverified >= window:
                    self._burst()
            else:
                self._cv.wait_for(lambda: self._unverified < window or self.failed.is_set())

    def _burst(self) -> None:
        """Let the verifiers empty the queue while the writer waits (holding ``_cv``)."""
        self._release = True
        self._cv.notify_all()
        self._cv.wait_for(lambda: self._unverified == 0 or self.failed.is_set())
        self._release = False

    def _write_loop(self) -> None:
        kicked = settled = 0
        batches: list[int] = []
        pending = 0
        wp = self._wprog
        try:
            while True:
                item = self.pieces.get()
                if item is None:
                    break
                if self.failed.is_set():
                    continue
                off, data = item
                end = off + len(data)
                if self._limit is not None and end > self._limit:
                    self.fail(
                        PreflightError(
                            f"the image does not fit {self.t.path}: it goes on past the "
                            f"target's end ({self._limit} bytes); writing stopped at offset {off}",
                            check_id=CHECK_SIZE,
                            hint="the target was written up to that offset; use a larger card",
                        )
                    )
                    continue
                try:
                    self._pwrite(off, data)
                except UnbrickError as e:
                    self.fail(e)
                    continue
                self.written += len(data)
                pending += len(data)
                if self.opts.writeback_bytes and pending >= self.opts.writeback_bytes:
                    # Start writeback now (DONTNEED writes dirty pages out, then drops
                    # the clean ones) rather than leave it all to the final fsync; then wait
                    # for an older batch, so that only a few batches are ever dirty and the
                    # progress follows the device, not the page cache.
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(self.t.fd, kicked, end - kicked, os.POSIX_FADV_DONTNEED)
                        batches.append(end)
                        if not self._verifiers and len(batches) > _DIRTY_BATCHES:
                            upto = batches.pop(0)
                            _sync_range(self.t.fd, settled, upto - settled)
                            settled = upto
                    kicked, pending = end, 0
                wp(WriteProgress(self.t.path, "write", self.written, self.total))
                if self._verifiers:
                    self._hand_to_verifiers(off, data)
            # The verifiers may now empty the queue: their direct reads write each range
            # out first, which overlaps the final fsync.
            with self._cv:
                self._release = True
                self._draining = True
                self._cv.notify_all()
            if not self.failed.is_set():
                wp(WriteProgress(self.t.path, "sync", self.written, self.total), force=True)
                self._finish_file()
                try:
                    os.fsync(self.t.fd)
                except OSError as e:
                    self.fail(_io_error(self.t.path, "flush (fsync)", 0, e))
        except BaseException as e:  # never leave the reader blocked on a dead thread
            self.fail(DeviceError(f"{self.t.path}: writer stopped: {e!r}"))
            while self.pieces.get() is not None:
                pass
        finally:
            with self._cv:
                self._closed = True
                self._release = True
                self._cv.notify_all()

    def _finish_file(self) -> None:
        """Extend a regular file to the image size (a bmap's last blocks may be holes)."""
        if self.t.is_block or self.image_size is None:
            return
        try:
            if os.fstat(self.t.fd).st_size < self.image_size:
                os.ftruncate(self.t.fd, self.image_size)
        except OSError as e:
            self.fail(_io_error(self.t.path, "resize", self.image_size, e))

    # -- verifying ---------------------------------------------------------------------------

    def _next_to_verify(self) -> tuple[int, bytes] | None:
        lag = self.opts.verify_lag_bytes
        if lag is None:
            lag = self.opts.verify_window_bytes // 2

        def ready() -> bool:
            if self._closed:
                return True
            if not (self._release and self._pending):
                return False
            return self._bursts or self._draining or self._queued >= lag

        with self._cv:
            self._cv.wait_for(ready)
            if self._pending:
                item = self._pending.popleft()
                self._queued -= len(item[1])
                return item
            return None

    def _verified_one(self, n: int) -> None:
        with self._cv:
            self._unverified -= n
            self._cv.notify_all()

    def _verify_loop(self) -> None:
        dfd = open_reader(self.t.path)
        buf = mmap.mmap(-1, self.opts.chunk_bytes + 2 * ALIGN)
        try:
            while (item := self._next_to_verify()) is not None:
                off, data = item
                try:
                    if not self.failed.is_set():
                        dfd = self._verify_piece(dfd, buf, off, data)
                        with self._lock:
                            self.verified += len(data)
                            done = self.verified
                        self._vprog(WriteProgress(self.t.path, "verify", done, self.total))
                except UnbrickError as e:
                    self.fail(e)
                finally:
                    self._verified_one(len(data))
        except BaseException as e:
            self.fail(DeviceError(f"{self.t.path}: verifier stopped: {e!r}"))
        finally:
            buf.close()
            if dfd >= 0:
                os.close(dfd)

    def _verify_piece(self, dfd: int, buf: mmap.mmap, off: int, data: bytes) -> int:
        hook = self.opts.before_verify
        if hook is not None:
            hook(self.t.path, off, len(data))
        dfd, got = self._read_back(dfd, buf, off, len(data))
        if got == data:
            return dfd
        wrong = _differing(off, got, data)
        log.warning("%s: read-back differs at %s", self.t.path, wrong[:4])
        if not self.opts.rewrite_bad:
            with self._lock:
                self.bad.extend(wrong)
            return dfd
        self._pwrite(off, data)
        if hook is not None:
            hook(self.t.path, off, len(data))
        dfd, got = self._read_back(dfd, buf, off, len(data))
        with self._lock:
            if got == data:
                self.rewritten.extend(wrong)
                log.warning("%s: rewritten and good: %s", self.t.path, wrong[:4])
            else:
                self.bad.extend(_differing(off, got, data))
        return dfd

    def _read_back(self, dfd: int, buf: mmap.mmap, off: int, n: int) -> tuple[int, bytes]:
        """The device's bytes ``off``..``off+n``, from the device rather than the cache.

        Direct read (O_DIRECT), or with ``drop-cache`` (or where O_DIRECT is refused) write
        out, drop and read; a range the drop left cached is read directly after all; with
        neither, fdatasync, drop and read (reported as "fadvise").
        """
        if dfd >= 0 and not self._drop:
            got = self._direct(dfd, buf, off, n)
            if got is not None:
                return dfd, got
            log.info("%s: O_DIRECT refused; dropping the cache instead", self.t.path)
            self._drop = True
            os.close(dfd)
            dfd = -1
        dropped = self._read_dropped(off, n)
        if dropped is not None:
            self._used("drop-cache")
            return dfd, dropped
        if dfd >= 0:
            got = self._direct(dfd, buf, off, n)
            if got is not None:
                return dfd, got
        try:
            os.fdatasync(self.t.fd)
            os.posix_fadvise(self.t.fd, off, n, os.POSIX_FADV_DONTNEED)
            data = os.pread(self.t.fd, n, off)
        except OSError as e:
            raise _io_error(self.t.path, "read back", off, e) from e
        self._used("fadvise")
        return dfd, data

    def _direct(self, dfd: int, buf: mmap.mmap, off: int, n: int) -> bytes | None:
        """A direct read of ``off``..``off+n`` through aligned ``buf``; None on EINVAL."""
        start = off - off % ALIGN
        end = -(-(off + n) // ALIGN) * ALIGN
        try:
            count = self._read_direct(dfd, buf, start, end - start)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise _io_error(self.t.path, "read back", off, e) from e
        self._used("o-direct")
        skip = off - start
        with memoryview(buf) as view:
            return view[skip : max(skip, min(count, skip + n))].tobytes()

    def _used(self, method: str) -> None:
        """Record how pieces were read back (the weakest method used wins the label)."""
        order = ("none", "o-direct", "drop-cache", "fadvise")
        with self._lock:
            if order.index(method) > order.index(self.method):
                self.method = method

    def _read_dropped(self, off: int, n: int) -> bytes | None:
        """Write the range out, drop it from the page cache and read it from the device.

        None when a probe (RWF_NOWAIT reads, which fail for pages not in the cache) finds part
        of the range still cached: the caller then reads it directly.
        """
        fd = self.t.fd
        try:
            _sync_range(fd, off, n)
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            probe = bytearray(1)
            for at in [*range(off, off + n, _PROBE_STEP), off + n - 1]:
                try:
                    if os.preadv(fd, [probe], at, os.RWF_NOWAIT) > 0:
                        log.debug("%s: offset %d is still cached", self.t.path, at)
                        return None
                except BlockingIOError:
                    continue  # not in the cache: as it should be
            return os.pread(fd, n, off)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise _io_error(self.t.path, "read back", off, e) from e

    @staticmethod
    def _read_direct(dfd: int, buf: mmap.mmap, start: int, length: int) -> int:
        """Fill ``buf`` from ``start`` with direct reads; the byte count (short at the end)."""
        got = 0
        with memoryview(buf) as view:
            while got < length:
                n = os.preadv(dfd, [view[got:length]], start + got)
                if n <= 0:
                    break  # end of the file or device
                got += n
        return got

    def _verify_error(self) -> VerifyError:
        bad = _merge(self.bad)
        shown = ", ".join(self.describe(off, n) for off, n in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        again = " after a rewrite" if self.opts.rewrite_bad else ""
        return VerifyError(
            f"{self.t.path}: {len(bad)} range(s) read back different from the image{again}: "
            f"{shown}{more}",
            ranges=bad[:_MAX_REPORTED],
            hint="the card or stick may be failing or fake (smaller than it claims); "
            "try another one",
        )

    def result(self) -> TargetResult:
        return TargetResult(
            target=self.t.path,
            ok=self.error is None,
            written_bytes=self.written,
            verified_bytes=self.verified,
            verify_method=self.method if self.opts.verify else "none",
            rewritten=tuple(_merge(self.rewritten)),
            bad_ranges=tuple(_merge(self.bad)[:_MAX_REPORTED]),
            error=self.error,
            elapsed_s=self.elapsed,
            checks=self.t.checks,
        )


#: SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
_SYNC_FLAGS = 1 | 2 | 4


def _sync_range(fd: int, off: int, n: int) -> None:
    """Write ``off``..``off+n`` of ``fd`` out and wait (sync_file_range; fdatasync without)."""
    fn = _libc_sync_file_range()
    if fn is None:
        os.fdatasync(fd)
        return
    if fn(fd, off, n, _SYNC_FLAGS) != 0:
        import ctypes  # noqa: PLC0415 - only to read errno

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@functools.cache
def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (the os module has no binding), bound once."""
    try:
        import ctypes  # noqa: PLC0415 - loaded on first use only

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _io_error(path: str, what: str, off: int, e: OSError) -> DeviceError:
    gone = e.errno in (errno.ENODEV, errno.ENXIO, errno.ENOMEDIUM)
    hint = (
        "the device went away: check the reader and the card, then write again"
        if gone
        else "the card or reader failed: try another port, reader or card"
    )
    if e.errno == errno.ENOSPC:
        hint = "the filesystem holding the target file is full"
    return DeviceError(f"{path}: {what} failed at offset {off}: {e.strerror}", hint=hint)


# ---------------------------------------------------------------------------------------------
# The job


def _describer(img: Image) -> Callable[[int, int], str]:
    bm = img.bmap

    def describe(off: int, n: int) -> str:
        text = f"bytes {off}..{off + n - 1}"
        if bm is not None:
            bs = bm.block_size
            first, last = off // bs, (off + n - 1) // bs
            blocks = f"{first}-{last}" if first != last else f"{first}"
            text += f" (blocks {blocks})"
        return text

    return describe


def write_to_targets(
    img: Image,
    targets: Sequence[BlockTarget],
    *,
    options: WriteOptions | None = None,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> WriteResult:
    """Write the opened image ``img`` to the opened, checked ``targets``.

    Runs :meth:`Image.precheck` (unless ``options.precheck`` is off) and the size check of every
    target first; a refusal there raises (PreflightError, IntegrityError, ImageError) with
    nothing written. Failures while writing are reported per target in the result.
    """
    opts = options or WriteOptions()
    began = time.monotonic()
    if not targets:
        raise UsageError("no target to write to")
    stop = cancelled or (lambda: False)
    if opts.precheck and img.needs_precheck():
        limits = [t.size_bytes for t in targets if t.is_block]
        img_progress = _Throttle(progress, opts.progress_interval_s)
        img.precheck(
            max_size=max(limits) if limits and len(limits) == len(targets) else None,
            progress=lambda phase, done, total: img_progress(
                WriteProgress(None, phase, done, total)
            ),
            cancelled=stop,
            chunk_bytes=opts.chunk_bytes,
            retain_bytes=opts.retain_bytes,
        )
    size = img.info.size_bytes
    if size is not None:
        for t in targets:
            t.check_size(size)
    total = img.info.mapped_bytes or 0
    workers = [_Worker(t, opts, total, size, progress, _describer(img)) for t in targets]
    for w in workers:
        w.start()
    source_error: UnbrickError | None = None

    def emit(off: int, data: bytes) -> None:
        for w in workers:
            if not w.failed.is_set():
                w.put((off, data))

    def all_failed() -> bool:
        return stop() or all(w.failed.is_set() for w in workers)

    try:
        img.produce(emit, opts.chunk_bytes, all_failed)
        if stop():
            source_error = JobError(
                "cancelled: the targets were written only in part",
                hint="write the image again before using the card",
            )
    except UnbrickError as e:
        source_error = e
    except OSError as e:
        source_error = SourceError(f"{img.path}: read failed: {e.strerror or e}")
    finally:
        for w in workers:
            w.put(None)
        for w in workers:
            w.join()
    if source_error is not None:
        for w in workers:
            w.fail(source_error)
    results = tuple(w.result() for w in workers)
    return WriteResult(
        image=img.info,
        targets=results,
        elapsed_s=time.monotonic() - began,
        source_error=source_error,
    )


def write_image(
    image: str | Path | Image,
    targets: Sequence[str | Path | BlockTarget],
    *,
    bmap: str | Path | Literal["auto"] | None = "auto",
    options: WriteOptions | None = None,
    forced: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    system: System | None = None,
) -> WriteResult:
    """Write ``image`` to every target in ``targets`` (paths or opened :class:`BlockTarget`).

    Paths are checked and opened here (and closed afterwards): PreflightError when any target is
    refused, with nothing written to any. ``bmap``: a bmap file, ``"auto"`` (the one beside the
    image, if any) or None. ``forced`` maps an overridable check id (``block.removable``) to the
    reason it is overridden. Every target gets its own result; see :func:`write_to_targets`.
    """
    opts = options or WriteOptions()
    own_image = not isinstance(image, Image)
    img = (
        image
        if isinstance(image, Image)
        else Image(image, bmap=bmap, limits=opts.limits, zip_member=opts.zip_member)
    )
    opened: list[BlockTarget] = []
    try:
        all_targets: list[BlockTarget] = []
        seen: set[str] = set()
        for t in targets:
            if isinstance(t, BlockTarget):
                bt = t
            else:
                bt = open_target(
                    t,
                    image_size=img.info.size_bytes,
                    image_path=img.path,
                    forced=forced,
                    system=system,
                )
                opened.append(bt)
            key = os.path.realpath(bt.path)
            if key in seen:
                raise UsageError(f"{bt.path} is named twice as a target")
            seen.add(key)
            all_targets.append(bt)
        return write_to_targets(
            img, all_targets, options=opts, progress=progress, cancelled=cancelled
        )
    except BaseException:
        # Refused before writing (a bad image, a size): leave no empty file behind.
        for bt in opened:
            if bt.created and not bt.is_block:
                with contextlib.suppress(OSError):
                    if os.fstat(bt.fd).st_size == 0:
                        os.unlink(bt.path)
        raise
    finally:
        for bt in opened:
            bt.close()
        if own_image:
            img.close()
