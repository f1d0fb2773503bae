"""The fallback: bytes with no recognised structure, checked for blank and erased images."""

from __future__ import annotations

import math
from collections import Counter

from unbrick.formats.base import CHUNK, Context, Findings, FormatSpec, Source

_ZERO = bytes(CHUNK)
_FF = b"\xff" * CHUNK
#: Chunks sampled for the entropy estimate.
_SAMPLES = 256


def _entropy(counts: list[int], total: int) -> float:
    if total == 0:
        return 0.0
    ent = 0.0
    for c in counts:
        if c:
            p = c / total
            ent -= p * math.log2(p)
    return ent


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format="raw")
    counts = [0] * 256
    all_ff = True
    all_00 = True
    # Entropy from 4 KiB samples of at most _SAMPLES chunks spread over the image keeps this
    # pass at the speed of reading.
    every = max(1, -(-src.size // CHUNK) // _SAMPLES)
    for i, data in enumerate(src.chunks()):
        ctx.check_time()
        n = len(data)
        if all_ff:
            all_ff = data == (_FF if n == CHUNK else b"\xff" * n)
        if all_00:
            all_00 = data == (_ZERO if n == CHUNK else bytes(n))
        if i % every == 0:
            for value, c in Counter(data[:4096]).items():
                counts[value] += c
    sampled = sum(counts)
    ent = _entropy(counts, sampled)
    f.details["entropy_bits_per_byte"] = round(ent, 3)
    f.details["entropy_sampled_bytes"] = sampled
    if src.size == 0:
        f.problem("file is empty")
    elif all_ff:
        f.problem("every byte is 0xFF: this is an erased flash, not a firmware image")
    elif all_00:
        f.problem("every byte is 0x00: this is a blank image, not a firmware image")
    elif ent > 7.99 and src.size >= 1 << 20:
        f.warnings.append(
            "entropy is near 8 bits/byte: the data is compressed or encrypted as a whole"
        )
    f.details["all_ff"] = all_ff and src.size > 0
    f.details["all_00"] = all_00 and src.size > 0
    return f


SPEC = FormatSpec(
    name="raw",
    sniff=lambda sn: True,
    inspect=inspect,
    priority=1000,
    summary="anything else: raw bytes, checked for erased (0xFF) and blank (0x00) images",
)
