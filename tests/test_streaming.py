"""Streaming: an 8 GiB image is inspected, hashed and converted in bounded memory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

GiB = 1 << 30
MiB = 1 << 20
RSS_LIMIT_KIB = 150 * 1024


# Linux keeps the peak RSS across fork and exec, so a child forked straight from a large
# test worker would report the worker's size. A small intermediate Python process forks the
# measured command and reports that grandchild's own peak.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_kib(argv: list[str]) -> tuple[int, int]:
    """Run ``argv``; return its exit status and its own peak resident set size in KiB."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *argv], capture_output=True, check=False, timeout=900
    )
    assert proc.returncode == 0, proc.stderr.decode()
    code, rss = (int(x) for x in proc.stdout.split())
    assert code == 0, proc.stderr.decode()
    return code, rss


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "disk-8g.img"
    with open(path, "wb") as f:
        f.truncate(8 * GiB)
        for i in range(8):
            f.seek(i * GiB + 17 * MiB)
            f.write(hashlib.shake_256(bytes([i])).digest(4 * MiB))
    return path


CLI = [sys.executable, "-m", "unbrick"]


def test_inspect_8gib_in_bounded_memory(big_image: Path) -> None:
    _, rss = peak_rss_kib([*CLI, "image", "inspect", str(big_image), "--json"])
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss} KiB"


def test_hash_8gib_in_bounded_memory(big_image: Path) -> None:
    h = hashlib.sha256()
    with open(big_image, "rb") as f:
        while data := f.read(8 * MiB):
            h.update(data)
    _, rss = peak_rss_kib([*CLI, "image", "verify", str(big_image), "--sha256", h.hexdigest()])
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss} KiB"


def test_convert_8gib_both_ways_in_bounded_memory(big_image: Path, tmp_path: Path) -> None:
    simg = tmp_path / "disk.simg"
    back = tmp_path / "back.img"
    _, rss1 = peak_rss_kib(
        [*CLI, "image", "convert", str(big_image), "-o", str(simg), "--to", "sparse"]
    )
    _, rss2 = peak_rss_kib([*CLI, "image", "convert", str(simg), "-o", str(back), "--to", "raw"])
    assert rss1 < RSS_LIMIT_KIB, f"raw->sparse peak RSS {rss1} KiB"
    assert rss2 < RSS_LIMIT_KIB, f"sparse->raw peak RSS {rss2} KiB"
    assert simg.stat().st_size < 64 * MiB
    assert back.stat().st_size == 8 * GiB
    # Same content where the data is, and holes read as zeros.
    with open(big_image, "rb") as a, open(back, "rb") as b:
        for i in range(8):
            a.seek(i * GiB + 16 * MiB)
            b.seek(i * GiB + 16 * MiB)
            assert a.read(6 * MiB) == b.read(6 * MiB)
