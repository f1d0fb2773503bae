"""Benchmarks against peer tools, run side by side in one run; prints ratios (ours / peer).

    .venv/bin/python bench/run.py [--size-mib 1024] [--repeat 3] [--workdir DIR]

1. SHA-256 of a file: `unbrick image verify FILE --sha256 HEX` vs `sha256sum FILE`.
2. raw -> Android sparse: `unbrick image convert --to sparse` vs `img2simg`.
3. Android sparse -> raw: `unbrick image convert --to raw` vs `simg2img`.

Both sides are whole commands started the same way, on the same warm file; the best of
``--repeat`` runs is compared. Outputs are cross-checked so that a fast wrong answer cannot win.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNBRICK = str(ROOT / ".venv" / "bin" / "unbrick")
MiB = 1 << 20


def best_time(argv: Sequence[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def make_disk_image(path: Path, size_mib: int) -> None:
    """A disk-like image: 1/8 random data in scattered extents, some 0xFF fill, the rest zero."""
    rng = hashlib.sha256(b"unbrick-bench")
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
        for i in range(0, size_mib, 8):
            f.seek(i * MiB)
            if i % 64 == 0:
                f.write(b"\xff" * MiB)
            seed = rng.digest() + i.to_bytes(8, "little")
            f.write(hashlib.shake_256(seed).digest(MiB))
        # A final short stretch that does not end on a block boundary of the data.
        f.seek(size_mib * MiB - 3 * MiB)
        f.write(os.urandom(MiB + 123))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(4 * MiB):
            h.update(data)
    return h.hexdigest()


def report(name: str, ours: float, peer: float, peer_name: str, target: float) -> bool:
    ratio = ours / peer
    ok = ratio <= target
    verdict = "ok" if ok else "OVER TARGET"
    print(
        f"{name:32} unbrick {ours:7.3f} s   {peer_name} {peer:7.3f} s   "
        f"ratio {ratio:5.2f} (target <= {target:.2f}) {verdict}"
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    for prog in ("sha256sum", "img2simg", "simg2img"):
        if shutil.which(prog) is None:
            print(f"bench: '{prog}' is not installed (run ./scripts/install-deps)", file=sys.stderr)
            return 2
    all_ok = True
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="unbrick-bench-") as tmp:
        work = Path(tmp)
        img = work / "disk.img"
        make_disk_image(img, args.size_mib)
        digest = sha256_file(img)
        print(f"image: {args.size_mib} MiB, sha256 {digest}")

        ours = best_time([UNBRICK, "image", "verify", str(img), "--sha256", digest], args.repeat)
        peer = best_time(["sha256sum", str(img)], args.repeat)
        all_ok &= report("sha256 of the image", ours, peer, "sha256sum", 1.10)

        ours_s, peer_s = work / "ours.simg", work / "peer.simg"
        ours = best_time(
            [UNBRICK, "image", "convert", str(img), "-o", str(ours_s), "--to", "sparse"],
            args.repeat,
        )
        peer = best_time(["img2simg", str(img), str(peer_s)], args.repeat)
        all_ok &= report("raw -> sparse", ours, peer, "img2simg", 1.00)

        ours_r, peer_r = work / "ours.raw", work / "peer.raw"
        ours = best_time(
            [UNBRICK, "image", "convert", str(peer_s), "-o", str(ours_r), "--to", "raw"],
            args.repeat,
        )
        peer = best_time(["simg2img", str(peer_s), str(peer_r)], args.repeat)
        all_ok &= report("sparse -> raw", ours, peer, "simg2img", 1.00)

        # Cross-checks: both expansions equal the image; simg2img expands our sparse file too.
        check = work / "check.raw"
        subprocess.run(["simg2img", str(ours_s), str(check)], check=True)
        for produced in (ours_r, peer_r, check):
            if sha256_file(produced) != digest:
                print(f"bench: {produced.name} differs from the image", file=sys.stderr)
                return 1
        print("outputs cross-checked: identical to the image")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
