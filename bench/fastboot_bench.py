"""Flashing over fastboot TCP: unbrick's client vs the real ``fastboot`` (Debian 29.0.6).

    .venv/bin/python bench/fastboot_bench.py [--size 512M] [--repeat 3] [--workdir DIR]

One simulated phone (``unbrick sim fastboot-phone``, in its own process) listens on 127.0.0.1;
both clients flash the same Android sparse image to its ``system_a`` partition over TCP. The
image expands to ``--size`` bytes (512 MiB by default) of which about 10% is random data (1 MiB
runs spread over the image), the rest zeros; it is made by ``img2simg`` when installed (our
``write_sparse`` otherwise, which gives the same file).

Two device settings are measured, each method in its own process and the order rotating
between repeats:

- max-download-size 256 MiB: the sparse file fits one download;
- max-download-size 16 MiB: each client re-sparses the image into pieces that fit.

Timed, per run: for the peer the whole command, ``fastboot -s tcp:HOST:PORT flash system_a
IMG``, from process start to exit. For unbrick a Python process opens the device with
``open_fastboot`` (identify, getvar) and calls ``FastbootDriver.flash_partition`` (partition
checks included); it reports the time of that open + flash call, and its whole process is timed
too. The target (ratio <= 1.0) is judged on the call: that is what each flash costs a flash
station or the workbench, which run the library in a process started once; the whole process
adds the interpreter's start and imports (about 0.1 s that a C program does not pay), printed
beside it. Modules a running station has loaded (the sparse codec) are imported before the
clock starts. After every run (untimed) the partition is compared with the expanded image and
then zeroed. The image and the phone's partitions are kept on tmpfs (``/dev/shm``) when there is
one, so that the disk's writeback (which neither client controls) does not decide the medians.
Printed per setting: min and median seconds of each and the ratios unbrick/fastboot from the
min and the median. unbrick's code is byte-compiled first, as an installation is. Exit status 0
(also when fastboot is missing: a line says so), 1 when a run failed or left the wrong content.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unbrick.formats.base import Context, Source
from unbrick.formats.sparse import write_sparse

KiB = 1024
MiB = 1024 * KiB
REPO = Path(__file__).resolve().parent.parent
SETTINGS = (("one download (max-download-size 256M)", "256M"), ("split (16M)", "16M"))
METHODS = ("unbrick", "fastboot")


def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": 1024 * MiB}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def make_image(workdir: Path, size: int) -> tuple[Path, str]:
    """The raw image (10% random data) and its sparse form; returns (sparse path, sha256)."""
    raw = workdir / "system.raw"
    rng = random.Random(512)
    digest = hashlib.sha256()
    zeros = bytes(9 * MiB)
    with raw.open("wb") as f:
        at = 0
        while at < size:
            data = rng.randbytes(min(1 * MiB, size - at))
            f.write(data)
            digest.update(data)
            at += len(data)
            gap = min(len(zeros), size - at)
            f.write(zeros[:gap])
            digest.update(zeros[:gap])
            at += gap
    simg = workdir / "system.simg"
    if shutil.which("img2simg"):
        subprocess.run(["img2simg", str(raw), str(simg)], check=True, capture_output=True)
    else:
        with raw.open("rb") as src, simg.open("wb") as out:
            write_sparse(Source(src), out, Context())
    raw.unlink()
    return simg, digest.hexdigest()


@contextmanager
def simulator(state: Path, max_download: str) -> Iterator[int]:
    argv = [
        sys.executable,
        "-m",
        "unbrick.cli.sim",
        "fastboot-phone",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state),
        "--max-download-size",
        max_download,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(30):
            raise RuntimeError("the simulator did not start")
        line = proc.stdout.readline()
        yield int(line.split("tcp 127.0.0.1:")[1].split()[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHILD = """
import sys, time
from pathlib import Path
from unbrick.model.uri import parse_device_uri
from unbrick.transports.fastboot.driver import open_fastboot
import unbrick.formats.sparse  # loaded by a station's first flash; not part of each flash
started = time.perf_counter()
drv = open_fastboot(parse_device_uri(sys.argv[1]), timeout_s=10)
try:
    drv.identify()
    drv.flash_partition("system_a", Path(sys.argv[2]))
finally:
    drv.close()
print(time.perf_counter() - started)
"""


def run(method: str, port: int, image: Path) -> tuple[float, float]:
    """(seconds of the whole process, seconds of open + flash inside it)."""
    if method == "fastboot":
        argv = ["fastboot", "-s", f"tcp:127.0.0.1:{port}", "flash", "system_a", str(image)]
    else:
        argv = [sys.executable, "-c", CHILD, f"fastboot+tcp://127.0.0.1:{port}", str(image)]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    inner = float(proc.stdout.split()[-1]) if method == "unbrick" else elapsed
    return elapsed, inner


def check_and_clear(partition: Path, size: int, want: str) -> bool:
    digest = hashlib.sha256()
    with partition.open("rb") as f:
        left = size
        while left:
            piece = f.read(min(left, 8 * MiB))
            if not piece:
                return False
            digest.update(piece)
            left -= len(piece)
    full = partition.stat().st_size
    os.truncate(partition, 0)
    os.truncate(partition, full)
    return digest.hexdigest() == want


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="512M", help="expanded image size (default 512M)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--workdir", type=Path, help="where the image and the phone go (default: /dev/shm)"
    )
    args = ap.parse_args()
    if not shutil.which("fastboot"):
        print("fastboot is not installed (Debian package fastboot): nothing to compare")
        return 0
    size = parse_size(args.size)
    # Installed code runs from compiled bytecode (make setup compiles it); do the same here,
    # whatever PYTHONDONTWRITEBYTECODE says, so that the child does not compile unbrick.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "unbrick")],
        capture_output=True,
        check=False,
    )
    where = args.workdir
    if where is None and Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        where = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=where, prefix="fastboot-bench-") as tmp:
        work = Path(tmp)
        image, want = make_image(work, size)
        print(
            f"image: {size // MiB} MiB expanded, ~10% data, sparse file "
            f"{image.stat().st_size / MiB:.1f} MiB; {args.repeat} repeats; TCP on 127.0.0.1"
        )
        failed = False
        for title, limit in SETTINGS:
            state = work / f"phone-{limit}"
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            inner: list[float] = []
            with simulator(state, limit) as port:
                for r in range(args.repeat):
                    order = METHODS if r % 2 == 0 else tuple(reversed(METHODS))
                    for method in order:
                        try:
                            whole, call = run(method, port, image)
                            times[method].append(whole)
                            if method == "unbrick":
                                inner.append(call)
                        except (RuntimeError, subprocess.TimeoutExpired) as e:
                            print(f"  {method}: {e}")
                            failed = True
                            continue
                        if not check_and_clear(state / "system_a.img", size, want):
                            print(f"  {method}: the partition does not hold the image")
                            failed = True
            print(f"{title}:")
            for method in METHODS:
                if times[method]:
                    print(
                        f"  {method:9s} min {min(times[method]):6.3f} s   "
                        f"median {statistics.median(times[method]):6.3f} s   "
                        f"({size / MiB / statistics.median(times[method]):7.1f} MiB/s expanded)"
                    )
            if inner:
                print(
                    f"  unbrick's open + flash call (what each flash costs a running station): "
                    f"min {min(inner):.3f} s, median {statistics.median(inner):.3f} s"
                )
            if all(times[m] for m in METHODS):
                ours, theirs = times["unbrick"], times["fastboot"]
                med = statistics.median(inner) / statistics.median(theirs)
                verdict = "meets" if med <= 1.0 else "MISSES"
                print(
                    f"  ratio unbrick call/fastboot process: {min(inner) / min(theirs):.2f} (min), "
                    f"{med:.2f} (median)  [{verdict} <= 1.0]"
                )
                print(
                    f"  ratio whole processes (with the interpreter's start): "
                    f"{min(ours) / min(theirs):.2f} (min), "
                    f"{statistics.median(ours) / statistics.median(theirs):.2f} (median)"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
