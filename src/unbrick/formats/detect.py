"""Detect a format by content and run its parser, turning parse failures into findings."""

from __future__ import annotations

import logging

from unbrick.errors import ImageError, LimitError
from unbrick.formats import raw
from unbrick.formats.base import HEAD_SIZE, TAIL_SIZE, Context, Findings, FormatSpec, Sniff, Source
from unbrick.formats.registry import FORMATS

log = logging.getLogger(__name__)


def sniff_source(src: Source) -> Sniff:
    return Sniff(head=src.head(HEAD_SIZE), tail=src.tail(TAIL_SIZE), size=src.size)


def detect(sn: Sniff) -> FormatSpec:
    """The first format whose sniff accepts these bytes; ``raw`` when none does."""
    for spec in FORMATS:
        try:
            if spec.sniff(sn):
                return spec
        except Exception:  # a sniffer bug must not stop detection; tests keep them total
            log.exception("sniffer of %s raised", spec.name)
    return raw.SPEC


def detect_head(head: bytes, size: int | None = None) -> str:
    """Format name from the first bytes of a stream whose end is unknown."""
    sn = Sniff(head=head, tail=b"", size=size if size is not None else len(head))
    return detect(sn).name


def inspect_source(src: Source, ctx: Context | None = None) -> Findings:
    """Detect and parse ``src``.

    A parse that fails on a detected format is reported as that format, invalid, with the
    error as its problem. Limit errors propagate: they are refusals, not findings.
    """
    ctx = ctx or Context()
    spec = detect(sniff_source(src))
    try:
        return spec.inspect(src, ctx)
    except LimitError:
        raise
    except ImageError as e:
        return Findings(format=spec.name, problems=[e.message])
