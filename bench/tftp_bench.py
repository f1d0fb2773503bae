"""TFTP server benchmark: unbrick's server vs tftpd-hpa, serving one file to atftp, side by side.

    .venv/bin/python bench/tftp_bench.py [--size-mib 64] [--repeat 5] [--workdir DIR]

Both servers serve the same file from the same directory on 127.0.0.1; atftp (the client)
fetches it into a tmpfs when there is one. The runs alternate between the servers and the best
of ``--repeat`` is compared; every download is checked against the file's SHA-256, so that a
fast wrong answer cannot win.

1. blksize 1468 (the largest block that fits an Ethernet frame; U-Boot's cap), lock-step:
   target speed ratio (tftpd-hpa time / unbrick time) >= 1.0.
2. blksize 1468 + windowsize 16: tftpd-hpa ignores windowsize (it answers without it and the
   transfer stays lock-step); target >= 2.0.

Then, for information: a windowsize sweep of unbrick's server, atftpd (a C server with
windowsize) as a reference point, and what happens to windows that are too large for the
receiver's socket buffer (they collapse on loopback; unbrick's server cuts windows to 128 KiB,
the sweep also shows the uncut case through a server started with ``--window-bytes-max 0``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
MiB = 1 << 20
#: A run slower than this is a collapse: it is stopped and reported as such.
RUN_TIMEOUT_S = 60.0


def in_tftpd() -> str | None:
    unpacked = ROOT / ".peers" / "usr" / "sbin" / "in.tftpd"
    if unpacked.is_file() and os.access(unpacked, os.X_OK):
        return str(unpacked)
    found = shutil.which("in.tftpd")
    # atftpd installs in.tftpd as a link to itself.
    if found and Path(found).resolve().name != "atftpd":
        return found
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    return any(len(f := line.split()) > 1 and f[1] == want for line in lines)


@contextmanager
def process(argv: Sequence[str], port: int | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if port is not None:
            deadline = time.monotonic() + 10
            while not listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: {argv[0]} did not start (exit {proc.poll()})")
                time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def unbrick_server(root: Path, *extra: str) -> Iterator[int]:
    # python -m: independent of where the CLI registers its command groups.
    argv = [PYTHON, "-m", "unbrick.cli.tftp", "serve", "--root", str(root), "--listen",
            "127.0.0.1:0", "--windowsize-max", "64", *extra]  # fmt: skip
    with process(argv) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not match:
            raise SystemExit(f"bench: unbrick tftp serve did not start: {line!r}")
        yield int(match.group(1))


@contextmanager
def tftpd_hpa(root: Path, binary: str) -> Iterator[int]:
    port = free_port()
    argv = [binary, "-L", "-4", "-a", f"127.0.0.1:{port}", "-s", "-c", "-u", "root",
            "-B", "65464", str(root)]  # fmt: skip
    with process(argv, port):
        yield port


@contextmanager
def atftpd(root: Path) -> Iterator[int]:
    port = free_port()
    argv = ["atftpd", "--daemon", "--no-fork", "--port", str(port), "--bind-address",
            "127.0.0.1", "--user", "root.root", "--logfile", "/dev/null", str(root)]  # fmt: skip
    with process(argv, port):
        yield port


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(4 * MiB):
            h.update(data)
    return h.hexdigest()


def fetch(
    port: int,
    out: Path,
    blksize: int,
    windowsize: int,
    digest: str,
    timeout_s: float = RUN_TIMEOUT_S,
) -> float | None:
    """Seconds for atftp to fetch the file; None when it collapsed (timed out or failed)."""
    out.unlink(missing_ok=True)
    argv = ["atftp", "--get", "-r", "bench.bin", "-l", str(out), "--option", f"blksize {blksize}"]
    if windowsize > 1:
        argv += ["--option", f"windowsize {windowsize}"]
    argv += ["127.0.0.1", str(port)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return None
    if sha256_file(out) != digest:
        raise SystemExit(f"bench: the file fetched from port {port} differs from the original")
    return elapsed


def best(times: list[float | None]) -> float | None:
    good = [t for t in times if t is not None]
    return min(good) if good else None


def side_by_side(
    ports: dict[str, int], out: Path, blksize: int, windowsize: int, digest: str, repeat: int
) -> dict[str, float | None]:
    runs: dict[str, list[float | None]] = {name: [] for name in ports}
    names = list(ports)
    for i in range(repeat):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            runs[name].append(fetch(ports[name], out, blksize, windowsize, digest))
    return {name: best(times) for name, times in runs.items()}


def rate(size: int, seconds: float | None) -> str:
    if seconds is None:
        return "collapsed (timed out or failed)"
    return f"{seconds:6.3f} s {size / seconds / MiB:6.1f} MiB/s"


def report(name: str, ours: float | None, peer: float | None, target: float, size: int) -> bool:
    if ours is None or peer is None:
        print(f"{name:34} unbrick {rate(size, ours)}   tftpd-hpa {rate(size, peer)}   FAILED")
        return False
    ratio = peer / ours
    verdict = "ok" if ratio >= target else "BELOW TARGET"
    print(
        f"{name:34} unbrick {rate(size, ours)}   tftpd-hpa {rate(size, peer)}   "
        f"speed ratio {ratio:4.2f} (target >= {target:.1f}) {verdict}"
    )
    return ratio >= target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-sweep", action="store_true", help="only the two targets")
    args = ap.parse_args()
    binary = in_tftpd()
    if binary is None or shutil.which("atftp") is None:
        print("bench: tftpd-hpa (in.tftpd) and atftp are needed (./scripts/install-deps)",
              file=sys.stderr)  # fmt: skip
        return 2
    shm = Path("/dev/shm")
    scratch_dir = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    size = args.size_mib * MiB
    all_ok = True
    with (
        tempfile.TemporaryDirectory(dir=args.workdir, prefix="unbrick-tftp-bench-") as tmp,
        tempfile.TemporaryDirectory(dir=scratch_dir, prefix="unbrick-tftp-out-") as out_tmp,
    ):
        root = Path(tmp)
        data = root / "bench.bin"
        with open(data, "wb") as f:
            for i in range(args.size_mib):
                f.write(hashlib.shake_256(i.to_bytes(4, "little")).digest(MiB))
        digest = sha256_file(data)
        out = Path(out_tmp) / "fetched.bin"
        print(f"file: {args.size_mib} MiB, sha256 {digest}; client: atftp; best of {args.repeat}")
        with unbrick_server(root) as ours, tftpd_hpa(root, binary) as peer:
            ports = {"unbrick": ours, "tftpd-hpa": peer}
            lock = side_by_side(ports, out, 1468, 1, digest, args.repeat)
            all_ok &= report("blksize 1468", lock["unbrick"], lock["tftpd-hpa"], 1.0, size)
            win = side_by_side(ports, out, 1468, 16, digest, args.repeat)
            all_ok &= report(
                "blksize 1468, windowsize 16", win["unbrick"], win["tftpd-hpa"], 2.0, size
            )
            if not args.no_sweep:
                print("\nfor information (best of 3):")
                sweep = [(1468, 4), (1468, 64), (8192, 1), (8192, 16), (65464, 1), (65464, 2)]
                for blksize, windowsize in sweep:
                    t = best([fetch(ours, out, blksize, windowsize, digest) for _ in range(3)])
                    print(f"  unbrick   blksize {blksize:5} windowsize {windowsize:2}: "
                          f"{rate(size, t)}")  # fmt: skip
        if not args.no_sweep:
            if shutil.which("atftpd"):
                with atftpd(root) as port:
                    for blksize, windowsize in [(1468, 1), (1468, 16)]:
                        t = best([fetch(port, out, blksize, windowsize, digest) for _ in range(3)])
                        print(f"  atftpd    blksize {blksize:5} windowsize {windowsize:2}: "
                              f"{rate(size, t)}")  # fmt: skip
            print("\nwindows beyond the receiver's socket buffer (unbrick, windows not cut):")
            with unbrick_server(root, "--window-bytes-max", "0") as uncut:
                for blksize, windowsize in [(8192, 16), (8192, 32), (65464, 4)]:
                    t = fetch(uncut, out, blksize, windowsize, digest, timeout_s=15.0)
                    print(f"  unbrick   blksize {blksize:5} windowsize {windowsize:2}: "
                          f"{rate(size, t)}")  # fmt: skip
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
