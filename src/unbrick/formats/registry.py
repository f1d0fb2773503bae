"""The table of known formats, in detection order."""

from __future__ import annotations

from unbrick.formats import (
    android_boot,
    archive,
    bmap,
    compress,
    dfu,
    elf,
    fit,
    ihex,
    mcuboot,
    sparse,
    srec,
    trx,
    uf2,
    uimage,
)
from unbrick.formats.base import FormatSpec

#: Every format but ``raw`` (the fallback), sorted by priority.
FORMATS: tuple[FormatSpec, ...] = tuple(
    sorted(
        (
            *compress.SPECS,
            *archive.SPECS,
            *ihex.SPECS,
            *srec.SPECS,
            *uf2.SPECS,
            *elf.SPECS,
            *uimage.SPECS,
            *fit.SPECS,
            *sparse.SPECS,
            *android_boot.SPECS,
            *bmap.SPECS,
            *trx.SPECS,
            *dfu.SPECS,
            *mcuboot.SPECS,
        ),
        key=lambda s: s.priority,
    )
)

#: Names reported in ``format``, including the fallback.
FORMAT_NAMES: tuple[str, ...] = (*(s.name for s in FORMATS), "raw")
