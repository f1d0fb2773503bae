"""Several block targets that take the same image in one command: the image is read (and
decompressed, and its bmap checked) once, and every piece goes to all of them.

Each target still runs its own job (identify, checks, write, verify, result). When a job
reaches its write it joins the group and waits; when every member has joined, or left (a job
refused before writing, or one that failed before it opened its device), the last to arrive
writes the image to all the members with :func:`write_to_targets` and each job gets its own
target's result. A member that leaves lets the others go on without it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unbrick.errors import UnbrickError, UsageError
from unbrick.transports.block.image import Image
from unbrick.transports.block.target import BlockTarget
from unbrick.transports.block.writer import (
    ProgressFn,
    TargetResult,
    WriteOptions,
    WriteProgress,
    write_to_targets,
)

log = logging.getLogger(__name__)


@dataclass
class _Member:
    target: BlockTarget
    progress: ProgressFn | None
    result: TargetResult | None = None
    error: BaseException | None = None


class WriteGroup:
    """A rendezvous of ``expected`` jobs writing the same image to their own block targets.

    Members are named by a key each job chooses (its device URI). Thread-safe.
    """

    def __init__(self, expected: int, *, options: WriteOptions | None = None) -> None:
        if expected < 1:
            raise UsageError("a write group needs at least one member")
        self.options = options or WriteOptions()
        self._cv = threading.Condition()
        self._expected = expected
        self._members: dict[str, _Member] = {}
        self._left: set[str] = set()
        self._image: tuple[str, str | None] | None = None
        #: A member is writing for the group (no one joins or leaves any more).
        self._started = False
        self._done = False
        #: How many times the image was read (one write for the whole group).
        self.writes = 0

    def write(
        self,
        key: str,
        target: BlockTarget,
        image: str | Path,
        *,
        bmap: str | Path | Literal["auto"] | None = "auto",
        progress: ProgressFn | None = None,
    ) -> TargetResult:
        """Join with ``target`` and wait until the group has written; this target's result.

        Raises what stopped this target: the image's error (for every member), or this
        target's own (a size refusal, an I/O error, a verification failure).
        """
        member = _Member(target, progress)
        which = (str(Path(image).resolve()), None if bmap is None else str(bmap))
        with self._cv:
            if self._started:
                raise UsageError(f"{key}: the group has already written its image")
            if key in self._members or key in self._left:
                raise UsageError(f"{key} joined the write group twice")
            if self._image is None:
                self._image = which
            if self._image != which:
                mismatch = True
                self._left.add(key)  # refused: the others do not wait for it
                leader = bool(self._members) and self._take_lead()
            else:
                mismatch = False
                self._members[key] = member
                leader = self._take_lead()
                if not leader:
                    self._cv.wait_for(lambda: self._done)
            first = self._image
        if mismatch:
            if leader:
                self._write_all(first[0], first[1])
            raise UsageError(f"{key}: a write group takes one image (and bmap) for all its targets")
        if leader:
            self._write_all(image, bmap)
        if member.error is not None:
            raise member.error
        assert member.result is not None
        if member.result.error is not None:
            raise member.result.error
        return member.result

    def leave(self, key: str) -> None:
        """``key`` will not write (refused, failed, or finished): the others need not wait."""
        with self._cv:
            if key in self._members or key in self._left or self._started:
                return
            self._left.add(key)
            leader = bool(self._members) and self._take_lead()
            image = self._image
        if leader:
            assert image is not None
            self._write_all(image[0], image[1])

    def _take_lead(self) -> bool:
        """(Under the lock.) True when every member has joined or left and no one writes yet:
        the caller writes for the group."""
        if self._started or len(self._members) + len(self._left) < self._expected:
            return False
        self._started = True
        return True

    def _write_all(self, image: str | Path, bmap: str | Path | None) -> None:
        """Write the image to every member (outside the lock), then wake them all."""
        members = dict(self._members)
        try:
            self._write(members, image, bmap)
        except BaseException as e:  # the image's error: every member gets it
            for m in members.values():
                m.error = e
        finally:
            with self._cv:
                self._done = True
                self._cv.notify_all()

    def _write(
        self, members: dict[str, _Member], image: str | Path, bmap: str | Path | None
    ) -> None:
        by_path = {m.target.path: m for m in members.values()}

        def progress(p: WriteProgress) -> None:
            chosen = [by_path[p.target]] if p.target in by_path else list(by_path.values())
            for m in chosen:
                if m.progress is not None:
                    m.progress(p)

        opts = self.options
        img = Image(image, bmap=bmap, limits=opts.limits, zip_member=opts.zip_member)
        try:
            size = img.info.size_bytes
            fitting: list[_Member] = []
            for m in members.values():
                if size is not None:
                    try:
                        m.target.check_size(size)
                    except UnbrickError as e:  # this card is too small; the others go on
                        m.error = e
                        continue
                fitting.append(m)
            if not fitting:
                return
            self.writes += 1
            log.info("writing %s to %d targets at once", img.path, len(fitting))
            result = write_to_targets(
                img,
                [m.target for m in fitting],
                options=opts,
                progress=progress,
            )
        finally:
            img.close()
        for m, r in zip(fitting, result.targets, strict=True):
            if result.source_error is not None:
                m.error = result.source_error
            m.result = r


__all__ = ["WriteGroup"]
