"""Capture real flashrom runs (dummy programmer) as test data for the parser tests.

    .venv/bin/python -m tests.flashrom.capture

Writes ``tests/flashrom/data/NAME.json`` (``-V`` runs as ``NAME.json.gz``): the arguments, exit
status, stdout and stderr of each scenario, run in a temporary directory whose path is replaced
by ``TMP``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

DATA = Path(__file__).parent / "data"
MiB = 1 << 20


def fmap_image(size: int, areas: list[tuple[int, int, str]], at: int) -> bytes:
    img = bytearray(b"\xff" * size)
    head = b"__FMAP__" + struct.pack("<BBQI32sH", 1, 1, 0, size, b"FLASH", len(areas))
    for offset, length, name in areas:
        head += struct.pack("<II32sH", offset, length, name.encode(), 0)
    img[at : at + len(head)] = head
    return bytes(img)


def ifd_image(size: int) -> bytes:
    """A minimal Intel flash descriptor: regions fd, bios and me (flashrom guesses Bay Trail)."""
    img = bytearray(b"\xff" * size)
    d = bytearray(b"\xff" * 4096)
    struct.pack_into("<I", d, 0x10, 0x0FF0A55A)
    flmap0 = 0x03 | (0x04 << 16) | (4 << 24)  # FCBA 0x30, FRBA 0x40, NR 4
    flmap1 = 0x06 | (0x10 << 16)  # FMBA 0x60, FPSBA 0x100, ISL 0
    flmap2 = 0x20  # FMSBA 0x200, MSL 0
    struct.pack_into("<III", d, 0x14, flmap0, flmap1, flmap2)
    struct.pack_into("<I", d, 0x30, 0x5)

    def reg(base: int, limit: int) -> int:
        return ((base >> 12) & 0x7FFF) | (((limit >> 12) & 0x7FFF) << 16)

    regs = [reg(0, 0xFFF), reg(0x400000, 0xFFFFFF), reg(0x1000, 0x3FFFFF), 0x7FFF, 0x7FFF]
    for i, r in enumerate(regs):
        struct.pack_into("<I", d, 0x40 + 4 * i, r)
    struct.pack_into("<I", d, 0xEFC, 0)  # no VSCC table
    img[:4096] = d
    return bytes(img)


def main() -> None:
    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        w = t / "w.bin"
        rand = t / "rand.bin"
        rand.write_bytes(os.urandom(16 * MiB))
        zero = t / "zero.bin"
        zero.write_bytes(bytes(16 * MiB))
        shutil.copyfile(rand, w)
        W = f"dummy:emulate=W25Q128FV,image={w}"
        layout = t / "layout.txt"
        layout.write_text("00010010:0001001f unbrick\n")
        region = t / "region.bin"
        region.write_bytes(b"0123456789abcdef")
        (t / "fmap.bin").write_bytes(
            fmap_image(
                16 * MiB,
                [(0, 0x10000, "SI_DESC"), (0x10000, 0x10000, "FMAP"), (0x20000, 0xFE0000, "RW")],
                0x10000,
            )
        )
        (t / "ifd.bin").write_bytes(ifd_image(16 * MiB))

        scenarios: list[tuple[str, list[str]]] = [
            ("probe_w25q128", ["-p", W, "--wp-status"]),
            ("probe_flash_name", ["-p", W, "--flash-name"]),
            ("probe_flash_size", ["-p", W, "--flash-size"]),
            ("probe_multiple", ["-p", f"dummy:emulate=MX25L6436,image={t}/m.bin"]),
            (
                "probe_wp_unsupported",
                ["-p", f"dummy:emulate=SST25VF032B,image={t}/s.bin", "--wp-status"],
            ),
            ("probe_wp_locked", ["-p", W + ",hwwp=yes,spi_status=0x9c", "--wp-status"]),
            ("probe_blacklist_rdid", ["-p", W + ",spi_blacklist=9f", "--wp-status"]),
            ("probe_no_chip", ["-p", W, "-c", "MX25L6405"]),
            ("probe_unknown_chip", ["-p", W, "-c", "NOSUCHCHIP"]),
            ("programmer_unknown", ["-p", "bogus"]),
            ("programmer_bad_param", ["-p", W + ",bogus=1"]),
            ("programmer_bad_emulate", ["-p", "dummy:emulate=NOPE"]),
            ("read_ok", ["-p", W, "-r", f"{t}/r.bin"]),
            ("read_blacklist", ["-p", W + ",spi_blacklist=03", "-r", f"{t}/r2.bin"]),
            ("write_verified", ["-p", W, "-w", str(zero)]),
            ("write_identical", ["-p", W, "-w", str(zero)]),
            ("verify_ok", ["-p", W, "-v", str(zero)]),
            (
                "write_region",
                ["-p", W, "-l", str(layout), "-i", f"unbrick:{region}", "-w", str(zero)],
            ),
            ("verify_failed", ["-p", W, "-v", str(rand)]),
            ("verify_blacklist", ["-p", W + ",spi_blacklist=03", "-v", str(zero)]),
            ("write_size_mismatch", ["-p", W, "-w", str(region)]),
            ("write_wp_locked", ["-p", W + ",hwwp=yes,spi_status=0x9c", "-w", str(rand)]),
            ("write_blacklist", ["-p", W + ",spi_blacklist=02", "-w", str(rand)]),
            ("write_ignorelist", ["-p", W + ",spi_ignorelist=02", "-w", str(rand)]),
            ("erase_ok", ["-p", W, "-E"]),
            ("erase_wp_locked", ["-p", W + ",hwwp=yes,spi_status=0x9c", "-E"]),
            ("fmap_missing", ["-p", W, "--fmap", "-V", "--wp-status"]),
        ]
        for name, argv in scenarios:
            save(name, argv, t, W)
        subprocess.run(["flashrom", "-p", W, "-w", str(t / "fmap.bin")], capture_output=True)
        save("fmap_layout", ["-p", W, "--fmap", "-V", "--wp-status"], t, W)
        subprocess.run(["flashrom", "-p", W, "-w", str(t / "ifd.bin")], capture_output=True)
        save("ifd_layout", ["-p", W, "--ifd", "-V", "--wp-status"], t, W)


def save(name: str, argv: list[str], tmp: Path, programmer: str) -> None:
    proc = subprocess.run(["flashrom", *argv], capture_output=True, timeout=120)
    record = {
        "argv": [a.replace(str(tmp), "TMP") for a in argv],
        "returncode": proc.returncode,
        "stdout": proc.stdout.decode("utf-8", "replace").replace(str(tmp), "TMP"),
        "stderr": proc.stderr.decode("utf-8", "replace").replace(str(tmp), "TMP"),
    }
    text = json.dumps(record, indent=1) + "\n"
    if "-V" in argv:
        (DATA / f"{name}.json.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        (DATA / f"{name}.json").write_text(text)
    print(f"{name}: exit {proc.returncode}")


if __name__ == "__main__":
    main()
