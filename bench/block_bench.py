"""Block writer benchmark: unbrick's writer vs bmaptool, dd and zstd | dd, side by side.

    .venv/bin/python bench/block_bench.py [--size-mib 1024] [--repeat 5] [--workdir DIR]

Every target is a regular file on the same filesystem as the images (as in the issue); each run
starts from a deleted target and a ``sync``, and the runs of the two sides alternate. The peer's
time is its whole command. Ours is the time of the ``write_image`` call, which is what each
write costs the workbench and a flash station (both run the library in a process started once;
several targets of one command share it too); it is measured in a fresh process per run,
``python -c 'write_image(...)'``, whose whole time (interpreter start-up and imports included,
about 0.1 s) is printed beside it. The targets are judged on the call. The median of
``--repeat`` runs is compared. Every target is compared with the image afterwards, so that a
fast wrong answer cannot win.

1. bmap: a 1 GiB image with 6% mapped (1 MiB extents scattered), written with its bmap
   (made by ``bmaptool create``) vs ``bmaptool copy --bmap``. bmaptool checks each range's
   SHA-256 as it copies; unbrick checks them all before writing anything (so that a bad range
   leaves the target untouched) and then reads every written range back with O_DIRECT.
   Target: ratio <= 1.0 with verification on. Printed as well: unbrick without the read-back
   (the same checks bmaptool makes).
2. raw: a fully mapped 1 GiB image (random data), no bmap, vs ``dd bs=4M conv=fsync``.
   Target: ratio <= 1.05 (no read-back on either side; with read-back printed for information).
3. zstd: the same kind of disk image compressed with ``zstd`` vs ``zstd -dc IMG | dd bs=4M
   iflag=fullblock conv=fsync``. Target: ratio <= 1.0 (no read-back on either side). The image
   is a realistic mix (a quarter random, a quarter text, half zeros); an incompressible image is
   printed for information.

Ratios are ours / theirs: below 1.0 means unbrick is faster.
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
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
MiB = 1 << 20

#: The child that runs our writer; prints the seconds the library call took.
OURS = """
import sys, time
from unbrick.transports.block.writer import WriteOptions, write_image
image, target, bmap, verify = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t0 = time.perf_counter()
result = write_image(image, [target], bmap=None if bmap == "-" else bmap,
                     options=WriteOptions(verify=verify))
elapsed = time.perf_counter() - t0
if not result.ok:
    result.raise_for_failure()
print(f"{elapsed:.6f}")
"""


def child_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    return env


def fresh(target: Path) -> None:
    target.unlink(missing_ok=True)
    os.sync()


def timed(argv: Sequence[str], env: dict[str, str], shell: bool = False) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv if not shell else argv[0],
        shell=shell,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {argv}\n{proc.stdout}\n{proc.stderr}")
    return took, proc.stdout


def digest(path: Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while True:
            chunk = f.read(8 * MiB if left is None else min(8 * MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def checker(target: Path, want: str, what: str) -> Callable[[], None]:
    """Fails the benchmark when ``target`` does not hold the image (SHA-256 ``want``)."""

    def check() -> None:
        if digest(target) != want:
            sys.exit(f"{what}: the target differs from the image")

    return check


def make_sparse(path: Path, size: int, fraction: float, seed: int = 6) -> None:
    """``fraction`` of ``size`` in random 1 MiB extents, the rest holes."""
    rng = random.Random(seed)
    count = int(size * fraction) // MiB
    chunks = sorted(rng.sample(range(size // MiB), count))
    with open(path, "wb") as f:
        f.truncate(size)
        for c in chunks:
            f.seek(c * MiB)
            f.write(rng.randbytes(MiB))


def make_full(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))


def make_mixed(path: Path, size: int, seed: int = 7) -> None:
    """A disk-like image: per 4 MiB, 1 MiB random, 1 MiB text, 2 MiB zeros."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(2, 9)).hex().encode() for _ in range(512)]
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(rng.randbytes(MiB))
            text = b" ".join(rng.choice(words) for _ in range(MiB // 8))
            f.write(text[:MiB].ljust(MiB, b"\n"))
            f.write(bytes(2 * MiB))


class Pair:
    """Alternating runs of two commands; medians and the ratio."""

    def __init__(self, name: str, target: Path, check: Callable[[], None]) -> None:
        self.name = name
        self.target = target
        self.check = check
        self.ours: list[float] = []
        self.calls: list[float] = []
        self.theirs: list[float] = []

    def run(
        self,
        ours: Sequence[str],
        theirs: Sequence[str],
        env: dict[str, str],
        repeat: int,
        shell: bool = False,
    ) -> None:
        # A first, untimed run of each: byte-code compiled, files in the page cache.
        for argv, sh in ((ours, False), (theirs, shell)):
            fresh(self.target)
            timed(argv, env, sh)
            self.check()
        for _ in range(repeat):
            fresh(self.target)
            took, out = timed(ours, env)
            self.check()
            self.ours.append(took)
            self.calls.append(float(out.strip().splitlines()[-1]))
            fresh(self.target)
            took, _ = timed(theirs, env, shell)
            self.check()
            self.theirs.append(took)

    def report(self, label: str, target: float | None) -> float:
        """Prints the medians and ratios; returns the ratio of our call to their command."""
        ours, theirs = statistics.median(self.ours), statistics.median(self.theirs)
        call = statistics.median(self.calls)
        ratio, call_ratio = ours / theirs, call / theirs
        verdict = ""
        if target is not None:
            verdict = (
                f"  [meets <= {target:.2f}]" if call_ratio <= target else f"  [MISSES {target:.2f}]"
            )
        print(
            f"{label}\n"
            f"    unbrick call {call:7.3f} s (its whole process {ours:.3f} s)   {self.name} "
            f"{theirs:7.3f} s\n"
            f"    ratio {call_ratio:.2f} per write{verdict}; {ratio:.2f} whole process\n"
            f"    runs: unbrick calls {[round(x, 3) for x in self.calls]}, processes "
            f"{[round(x, 3) for x in self.ours]}, {self.name} "
            f"{[round(x, 3) for x in self.theirs]}"
        )
        return call_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["bmap", "raw", "zstd"])
    args = ap.parse_args()
    for prog in ("bmaptool", "dd", "zstd"):
        if shutil.which(prog) is None:
            sys.exit(f"{prog} is not installed (./scripts/install-deps)")
    size = args.size_mib * MiB
    base = args.workdir or Path(tempfile.mkdtemp(prefix="unbrick-block-bench-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    env = child_env(base)
    target = base / "target.img"
    ours_cmd = [PYTHON, "-c", OURS]
    print(
        f"block writer benchmark: {args.size_mib} MiB images in {base}, "
        f"median of {args.repeat} runs, {os.cpu_count()} CPUs"
    )
    failures = []
    try:
        if "bmap" not in args.skip:
            img = base / "sparse6.img"
            make_sparse(img, size, 0.06)
            bmap = base / "sparse6.bmap"
            subprocess.run(["bmaptool", "-q", "create", "-o", str(bmap), str(img)], check=True)
            check = checker(target, digest(img), "bmap")
            theirs = ["bmaptool", "-q", "copy", "--bmap", str(bmap), str(img), str(target)]
            p = Pair("bmaptool copy", target, check)
            p.run([*ours_cmd, str(img), str(target), str(bmap), "1"], theirs, env, args.repeat)
            if p.report("1. bmap, 6% mapped, verification on (read-back)", 1.0) > 1.0:
                failures.append("bmap")
            q = Pair("bmaptool copy", target, check)
            q.run([*ours_cmd, str(img), str(target), str(bmap), "0"], theirs, env, args.repeat)
            q.report("   bmap, 6% mapped, bmap checksums only (what bmaptool checks)", None)
            img.unlink()
        if "raw" not in args.skip:
            img = base / "full.img"
            make_full(img, size)
            check = checker(target, digest(img), "raw")
            theirs = ["dd", f"if={img}", f"of={target}", "bs=4M", "conv=fsync", "status=none"]
            p = Pair("dd bs=4M conv=fsync", target, check)
            p.run([*ours_cmd, str(img), str(target), "-", "0"], theirs, env, args.repeat)
            if p.report("2. raw, fully mapped, no read-back", 1.05) > 1.05:
                failures.append("raw")
            q = Pair("dd bs=4M conv=fsync", target, check)
            q.run(
                [*ours_cmd, str(img), str(target), "-", "1"], theirs, env, max(2, args.repeat // 2)
            )
            q.report("   raw, fully mapped, unbrick with read-back (dd has none)", None)
            img.unlink()
        if "zstd" not in args.skip:
            for label, make, goal in (
                ("3. zstd, disk-like image (1/4 random, 1/4 text, 1/2 zeros)", make_mixed, 1.0),
                ("   zstd, incompressible image", make_full, None),
            ):
                raw = base / "z.img"
                make(raw, size)
                check = checker(target, digest(raw), "zstd")
                zst = base / "z.img.zst"
                subprocess.run(["zstd", "-q", "-f", "-3", str(raw), "-o", str(zst)], check=True)
                raw.unlink()
                shell = (
                    f"zstd -dc '{zst}' | dd of='{target}' bs=4M iflag=fullblock "
                    "conv=fsync status=none"
                )
                p = Pair("zstd -dc | dd", target, check)
                p.run(
                    [*ours_cmd, str(zst), str(target), "-", "0"],
                    [shell],
                    env,
                    args.repeat,
                    shell=True,
                )
                if p.report(label, goal) > (goal or float("inf")):
                    failures.append("zstd")
                zst.unlink()
    finally:
        target.unlink(missing_ok=True)
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    if failures:
        print(f"targets missed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
