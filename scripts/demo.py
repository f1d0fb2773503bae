"""`make demo`: rescue a router bricked by an interrupted update, then check some images.

1. A simulated router (`unbrick sim router`) takes an update that a power cut interrupts: the
   firmware region is half written and the router stops in its bootloader (a soft brick).
2. The technician diagnoses it (`unbrick diagnose`), rescues it (`unbrick rescue`: probe,
   verified backup, image checks, flash, verify, reboot, validate) and reads the repair log.
3. A second router, whose firmware is corrupt, is repaired the way most real routers are: on
   its serial console, at the U-Boot prompt (`uboot+tcp://`), with the image pulled by the
   router's `tftpboot` from unbrick's own TFTP server and checked with U-Boot's `crc32`.
4. A third router, held in recovery, takes the image from unbrick's TFTP client (`unbrick tftp
   put`) through its bootloader's TFTP server, checks it, writes it and boots it.
5. A few firmware files are inspected, verified and converted.

Everything runs through the real `unbrick` command line, with its state in demo-out/. The demo
stops with a non-zero status if any outcome differs from the expected one.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from unbrick.sim.firmware import build_firmware, manifest_for_image

ROOT = Path(__file__).resolve().parents[1]
UNBRICK = str(ROOT / ".venv" / "bin" / "unbrick")
OUT = ROOT / "demo-out"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


ENV = dict(os.environ)


def unbrick(*args: str, expect: int) -> None:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ unbrick {shown}", flush=True)
    proc = subprocess.run([UNBRICK, *args], check=False, env=ENV, stdin=subprocess.DEVNULL)
    verdict = "as expected" if proc.returncode == expect else "UNEXPECTED"
    print(f"  -> exit {proc.returncode} ({verdict})", flush=True)
    if proc.returncode != expect:
        raise SystemExit(f"demo: expected exit {expect}, got {proc.returncode}")


def firmware_payload(size: int) -> bytes:
    """Deterministic data that looks like a kernel: a header, code-like bytes, padding."""
    body = hashlib.shake_256(b"unbrick demo kernel").digest(size - 4096)
    return b"\x00" * 64 + b"DEMO-KERNEL v2.1.0\x00" + bytes(4096 - 83) + body


def uimage(payload: bytes, name: str) -> bytes:
    """A U-Boot legacy image: ARM Linux kernel, uncompressed, load/entry 0x80008000."""
    dcrc = zlib.crc32(payload)
    fields = [
        0x27051956,
        0,
        int(time.time()),
        len(payload),
        0x80008000,
        0x80008000,
        dcrc,
        5,
        2,
        2,
        0,
    ]  # os linux, arch arm, type kernel, compression none
    hdr = struct.pack(">7I4B32s", *fields, name.encode()[:32])
    hcrc = zlib.crc32(hdr)
    return hdr[:4] + struct.pack(">I", hcrc) + hdr[8:] + payload


def disk_image(path: Path) -> None:
    """A 16 MiB SD-card-like image: a partition table sector, a boot area, a rootfs, holes."""
    with open(path, "wb") as f:
        f.truncate(16 << 20)
        f.write(b"\x00" * 446 + bytes.fromhex("0c") + b"\x00" * 15 + b"\x00" * 48 + b"\x55\xaa")
        f.seek(1 << 20)
        f.write(hashlib.shake_256(b"boot").digest(2 << 20))
        f.seek(8 << 20)
        f.write(b"\xff" * (1 << 20))
        f.write(hashlib.shake_256(b"rootfs").digest(3 << 20))


def minisign_keypair(directory: Path) -> tuple[Ed25519PrivateKey, bytes, Path]:
    key = Ed25519PrivateKey.generate()
    key_id = os.urandom(8)
    pk = key.public_key().public_bytes_raw()
    pub = directory / "vendor.pub"
    pub.write_text(
        f"untrusted comment: minisign public key {key_id[::-1].hex().upper()}\n"
        + base64.b64encode(b"Ed" + key_id + pk).decode()
        + "\n"
    )
    return key, key_id, pub


def minisign_sign(key: Ed25519PrivateKey, key_id: bytes, file: Path) -> Path:
    """A prehashed minisign signature (the format `minisign -S` writes)."""
    digest = hashlib.blake2b(file.read_bytes(), digest_size=64).digest()
    sig = key.sign(digest)
    trusted = f"timestamp:{int(time.time())}\tfile:{file.name}\thashed"
    global_sig = key.sign(sig + trusted.encode())
    out = file.with_name(file.name + ".minisig")
    out.write_text(
        "untrusted comment: signature from the demo vendor key\n"
        + base64.b64encode(b"ED" + key_id + sig).decode()
        + "\n"
        + f"trusted comment: {trusted}\n"
        + base64.b64encode(global_sig).decode()
        + "\n"
    )
    return out


def start_sim(
    name: str, registry: Path, *faults: str, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a simulated router; returns the process and its console's HOST:PORT."""
    args = [UNBRICK, "sim", "router", "--name", name, "--registry", str(registry), *extra]
    for fault in faults:
        args += ["--fault", fault]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    print(f"  {line}", flush=True)
    if "listening" not in line or "console " not in line:
        raise SystemExit("demo: the simulator did not start")
    return proc, line.rsplit("console ", 1)[1].split()[0].rstrip(",")


def rescue_story() -> None:
    home = OUT / "workbench"
    registry = OUT / "sims"
    ENV["UNBRICK_HOME"] = str(home)
    ENV["UNBRICK_SIM_DIR"] = str(registry)
    say("A router, and the vendor's new firmware 2.1.0")
    fw = OUT / "simrouter-2.1.0.bin"
    image = build_firmware(
        "SimRouter",
        "2.1.0",
        security_version=1,
        hw_revisions=("B1", "B2"),
        regions=("EU", "US"),
        size_bytes=600_000,
    )
    fw.write_bytes(image)
    fw.with_name(fw.name + ".manifest.toml").write_text(
        manifest_for_image(image, target="firmware", min_bootloader="2023.01")
    )
    print(f"  {fw.name}: {len(image)} bytes, with its manifest {fw.name}.manifest.toml")
    # The second flash operation of the update loses power half-way.
    sim, _ = start_sim("lab-router", registry, "power-cut-after=2", "power-on-delay=3")
    try:
        unbrick("device", "probe", "sim://lab-router", expect=0)

        say("The update: power is lost half-way through writing the firmware")
        unbrick("flash", "sim://lab-router", str(fw), "--yes", expect=5)
        time.sleep(3.5)  # the router comes back on by itself, in its bootloader
        unbrick("device", "probe", "sim://lab-router", expect=0)

        say("The technician: what kind of brick is it?")
        symptoms = [
            "power=yes",
            "damage=no",
            "cause=during_update",
            "behaviour=dark",
            "mode=uboot",
            "usb=no_port",
            "network=link_only",
            "serial=prompt",
        ]
        args = [a for s in symptoms for a in ("--symptom", s)]
        unbrick("diagnose", "--family", "router", *args, expect=0)

        say("The rescue: probe, verified backup, checks, flash, verify, reboot, validate")
        unbrick(
            "rescue",
            "sim://lab-router",
            str(fw),
            "--family",
            "router",
            *args,
            "--yes",
            "--wait",
            "20",
            expect=0,
        )
        unbrick("device", "probe", "sim://lab-router", expect=0)

        say("The jobs and backups on this workbench")
        unbrick("log", expect=0)
        unbrick("backups", "list", expect=0)
    finally:
        sim.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(timeout=10)
    console_story(fw)


def console_story(fw: Path) -> None:
    say("Another router: its firmware is corrupt; a serial cable goes on its UART")
    sim, console = start_sim(
        "shop-router", OUT / "sims", extra=("--brick", "soft", "--autoboot-delay", "1")
    )
    # The router reaches this computer's TFTP server at serverip; U-Boot pulls each piece
    # of the image with tftpboot (unbrick's own server, for this session only).
    # (The profile supplies the rest: the firmware shares the boot flash at address 0, and
    # the backup covers what is overwritten.)
    net = "serverip=127.0.0.1&ipaddr=127.0.0.1&tftp_listen=127.0.0.1:0"
    uri = f"uboot+tcp://{console}?{net}"
    try:
        unbrick("device", "probe", uri, "--profile", "sim-router", expect=0)
        say("The repair at the U-Boot prompt: tftpboot, crc32, erase, cp.b, cmp, reset")
        unbrick(
            "flash",
            uri,
            str(fw),
            "--profile",
            "sim-router",
            "--partition",
            "firmware",
            "--yes",
            expect=0,
        )
        unbrick("log", expect=0)
    finally:
        sim.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(timeout=10)
    recovery_server_story(fw)


def recovery_server_story(fw: Path) -> None:
    say("A third router: held in recovery, its bootloader runs a TFTP server")
    sim, _ = start_sim("desk-router", OUT / "sims", extra=("--brick", "soft"))
    tftp = sim_line_port(OUT / "sims" / "desk-router.json", "tftp_port")
    try:
        # The router checks the image (CRCs, model, anti-rollback) before its last ACK,
        # writes it and boots it.
        unbrick("tftp", "put", f"127.0.0.1:{tftp}", str(fw), "firmware.bin", expect=0)
        time.sleep(2.0)
        unbrick("device", "probe", "sim://desk-router", expect=0)
    finally:
        sim.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(timeout=10)


def sim_line_port(registry_entry: Path, key: str) -> int:
    return int(json.loads(registry_entry.read_text())[key])


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    started = time.monotonic()
    rescue_story()
    images_story()
    say(f"Demo finished in {time.monotonic() - started:.1f} s: every outcome as expected")
    return 0


def images_story() -> None:
    say(f"Generating sample images in {OUT.relative_to(ROOT)}/")
    kernel = firmware_payload(1 << 20)
    good = OUT / "router-fw.uimg"
    good.write_bytes(uimage(kernel, "DemoRouter 2.1.0"))
    truncated = OUT / "router-fw-truncated.uimg"
    truncated.write_bytes(good.read_bytes()[:700_000])
    (OUT / "router-fw.uimg.gz").write_bytes(gzip.compress(good.read_bytes(), mtime=0))
    (OUT / "erased-flash.bin").write_bytes(b"\xff" * (256 << 10))
    disk = OUT / "sdcard.img"
    disk_image(disk)
    for p in sorted(OUT.iterdir()):
        print(f"  {p.name:28} {p.stat().st_size:>10} bytes")

    say("Is this the right file, and is it intact? Inspect by content")
    unbrick("image", "inspect", str(good), expect=0)
    unbrick("image", "inspect", str(truncated), expect=1)
    unbrick("image", "inspect", str(OUT / "router-fw.uimg.gz"), expect=0)
    unbrick("image", "inspect", str(OUT / "erased-flash.bin"), expect=1)

    say("Checksums and signatures: only keys you give are trusted")
    sums = OUT / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(good.read_bytes()).hexdigest()}  {good.name}\n")
    key, key_id, pub = minisign_keypair(OUT)
    sig = minisign_sign(key, key_id, good)
    unbrick(
        "image",
        "verify",
        str(good),
        "--sums",
        str(sums),
        "--sig",
        str(sig),
        "--minisign-key",
        str(pub),
        expect=0,
    )
    tampered = OUT / "router-fw-tampered.uimg"
    data = bytearray(good.read_bytes())
    data[200_000] ^= 0x01
    tampered.write_bytes(bytes(data))
    shutil.copy(sig, tampered.with_name(tampered.name + ".minisig"))
    unbrick(
        "image",
        "verify",
        str(tampered),
        "--sig",
        str(tampered.with_name(tampered.name + ".minisig")),
        "--minisign-key",
        str(pub),
        expect=4,
    )
    unbrick(
        "image",
        "verify",
        str(tampered),
        "--sha256",
        hashlib.sha256(good.read_bytes()).hexdigest(),
        expect=4,
    )

    say("Android sparse: convert a disk image and back, byte for byte")
    simg = OUT / "sdcard.simg"
    back = OUT / "sdcard-roundtrip.img"
    unbrick("image", "convert", str(disk), "-o", str(simg), "--to", "sparse", expect=0)
    unbrick("image", "inspect", str(simg), expect=0)
    unbrick("image", "convert", str(simg), "-o", str(back), "--to", "raw", expect=0)
    same = hashlib.sha256(disk.read_bytes()).digest() == hashlib.sha256(back.read_bytes()).digest()
    print(f"  round trip identical: {same}")
    if not same:
        raise SystemExit("demo: the sparse round trip changed the image")


if __name__ == "__main__":
    sys.exit(main())
