"""flashrom wrapper benchmark: unbrick's FlashromDriver vs bare flashrom, side by side.

    .venv/bin/python bench/flashrom_bench.py [--repeat 7] [--workdir DIR]

Both write a 16 MiB image to flashrom's dummy programmer emulating a W25Q128FV and have flashrom
verify it (``flashrom -p dummy:emulate=W25Q128FV,image=CHIP -w IMAGE``, which reads the chip,
erases and writes what differs, then reads it all back). Two different random images are written
in turn, so that every run changes the whole chip (never the "identical content" shortcut), and
the runs alternate between bare flashrom and unbrick. After every run the chip file is checked
against the image written, so that a fast wrong answer cannot win.

1. ``FlashromDriver.write_region(0, IMAGE)`` on an open driver (the chip probed once when it was
   opened, as the engine does before it writes) vs one bare ``flashrom -w``:
   target time ratio (unbrick / flashrom, medians) <= 1.05.

For information: opening the driver (one probe with ``--wp-status``) plus the write, and the
engine's way (``erase`` + ``program`` of the whole chip, then reading it back for verification).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from unbrick.model.uri import parse_device_uri
from unbrick.transports.flashrom import FlashromOptions, open_flashrom

MiB = 1 << 20
SIZE = 16 * MiB
TARGET = 1.05


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bare_write(chip: Path, image: Path) -> float:
    argv = ["flashrom", "-p", f"dummy:emulate=W25Q128FV,image={chip}", "-w", str(image)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, timeout=300)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or b"VERIFIED." not in proc.stdout:
        raise SystemExit(f"bench: bare flashrom failed (exit {proc.returncode})")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if shutil.which("flashrom") is None:
        print("bench: flashrom is needed (./scripts/install-deps)", file=sys.stderr)
        return 2
    shm = Path("/dev/shm")
    base = args.workdir or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    with tempfile.TemporaryDirectory(dir=base, prefix="unbrick-flashrom-bench-") as tmp:
        t = Path(tmp)
        images = [t / "a.bin", t / "b.bin"]
        for i, path in enumerate(images):
            path.write_bytes(random.Random(i).randbytes(SIZE))
        digests = [sha256(p) for p in images]
        chip = t / "chip.bin"
        chip.write_bytes(bytes(SIZE))
        uri = f"flashrom://dummy?emulate=W25Q128FV&image={chip}"
        options = FlashromOptions(workdir=t / "work")
        turn = 0

        def next_image() -> tuple[Path, str]:
            nonlocal turn
            turn += 1
            return images[turn % 2], digests[turn % 2]

        def checked(run: Callable[[Path], float]) -> float:
            image, digest = next_image()
            elapsed = run(image)
            if sha256(chip) != digest:
                raise SystemExit("bench: the chip does not hold the image just written")
            return elapsed

        driver = open_flashrom(parse_device_uri(uri), options=options)

        def ours(image: Path) -> float:
            t0 = time.perf_counter()
            result = driver.write_region(0, image)
            elapsed = time.perf_counter() - t0
            if not result.verified or result.identical:
                raise SystemExit("bench: unbrick's write was not a verified full write")
            return elapsed

        def ours_with_open(image: Path) -> float:
            t0 = time.perf_counter()
            with open_flashrom(parse_device_uri(uri), options=options) as dev:
                dev.write_region(0, image)
            return time.perf_counter() - t0

        def engine_way(image: Path) -> float:
            data = image.read_bytes()
            t0 = time.perf_counter()
            driver.erase(0, SIZE)
            driver.program(0, data)
            if hashlib.sha256(driver.read(0, SIZE)).hexdigest() != hashlib.sha256(data).hexdigest():
                raise SystemExit("bench: read-back differs")
            return time.perf_counter() - t0

        bare: list[float] = []
        mine: list[float] = []
        try:
            checked(lambda image: bare_write(chip, image))  # warm the page cache
            for i in range(args.repeat):
                order = [("bare", bare), ("ours", mine)]
                if i % 2:
                    order.reverse()
                for name, times in order:
                    if name == "bare":
                        times.append(checked(lambda image: bare_write(chip, image)))
                    else:
                        times.append(checked(ours))
            extra_open = [checked(ours_with_open) for _ in range(3)]
            extra_engine = [checked(engine_way) for _ in range(3)]
        finally:
            driver.close()

    med_bare, med_ours = statistics.median(bare), statistics.median(mine)
    ratio = med_ours / med_bare
    best_ratio = min(mine) / min(bare)
    verdict = "ok" if ratio <= TARGET else "ABOVE TARGET"
    print(f"16 MiB write+verify, dummy W25Q128FV, {args.repeat} runs each, alternating")
    print(f"  bare flashrom -w        median {med_bare:6.3f} s   best {min(bare):6.3f} s")
    print(f"  unbrick write_region    median {med_ours:6.3f} s   best {min(mine):6.3f} s")
    print(
        f"  time ratio unbrick/flashrom: median {ratio:5.3f}, best {best_ratio:5.3f} "
        f"(target <= {TARGET}) {verdict}"
    )
    print("for information (best of 3):")
    print(f"  open (probe + --wp-status) + write_region   {min(extra_open):6.3f} s")
    print(f"  engine way: erase + program + read back      {min(extra_engine):6.3f} s")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
