"""A scripted U-Boot console on a simulated clock, for console tests without QEMU.

It boots (banner, autoboot countdown, then "boots the kernel" and goes silent unless a key
stops it), echoes what is typed, answers commands from a table, prints ``<INTERRUPT>`` on
Ctrl-C, repeats the last command on an empty line (as U-Boot does), and can hang on a command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

BANNER = (
    b"\r\n\r\nU-Boot 2023.01+dfsg-2+deb12u3 (Jun 22 2026 - 08:38:07 +0000)\r\n\r\n"
    b"DRAM:  512 MiB\r\nIn:    pl011@9000000\r\nNet:   No ethernet found.\r\n"
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeUBoot:
    """A ByteLink whose other end behaves like U-Boot's console."""

    def __init__(
        self,
        clock: Clock,
        *,
        booting: bool = True,
        boot_delay_s: float = 0.4,
        countdown_s: float = 2.0,
        autoboot: bytes = b"Hit any key to stop autoboot:  2 ",
        stop_string: bytes | None = None,
        prompt: bytes = b"=> ",
        answers: dict[str, str | Callable[[str], tuple[str, int]]] | None = None,
    ) -> None:
        self.clock = clock
        self.prompt = prompt
        self.answers = answers or {}
        self.stop_string = stop_string
        self.autoboot = autoboot
        self.countdown_s = countdown_s
        #: What happens when the countdown runs out: "kernel", "bad-crc", "loop", "silent".
        self.boot_outcome = "kernel"
        self.out = bytearray()
        self.sent = bytearray()
        self.lines: list[str] = []
        self.hang_on: str | None = None
        self.hung = False
        self._line = bytearray()
        self._last = ""
        self._stop_buf = b""
        self._reset_pending = False
        # Boot timeline: (time, bytes) still to be printed.
        self._pending: list[tuple[float, bytes]] = []
        self.state = "prompt"
        if booting:
            self.state = "booting"
            self._pending = [(boot_delay_s, BANNER + autoboot)]
            self._countdown_at = boot_delay_s
            self._boot_at = boot_delay_s + countdown_s
        else:
            self._countdown_at = self._boot_at = 0.0

    # -- time -------------------------------------------------------------------------------

    def _advance(self) -> None:
        now = self.clock.now
        while self._pending and self._pending[0][0] <= now:
            self.out += self._pending.pop(0)[1]
        if self.state == "countdown" and now >= self._boot_at:
            self._boot(now)
        if self.state == "booting" and now >= self._countdown_at:
            self.state = "countdown"

    def _boot(self, now: float) -> None:
        """The countdown ran out: boot as ``boot_outcome`` says."""
        outcome = self.boot_outcome
        self.out += b"\b\b\b 0 \r\n"
        if outcome == "kernel":
            self.state = "os"
            self.out += b"## Booting kernel from Legacy Image at 40400000 ...\r\n"
            self.out += b"Starting kernel ...\r\n\r\n[    0.000000] Booting Linux on CPU 0\r\n"
            self._pending.append((now + 1.0, b"[    1.200000] Run /sbin/init\r\nlogin: "))
        elif outcome == "bad-crc":
            self.state = "prompt"
            self.out += b"## Booting kernel ...\r\n   Verifying Checksum ... Bad Data CRC\r\n"
            self.out += b"ERROR: can't get kernel image!\r\n" + self.prompt
        elif outcome == "loop":
            self.out += b"Starting kernel ...\r\n[    0.000000] Kernel panic - not syncing\r\n"
            self._restart(now + 0.5)
        else:  # silent: hangs after the countdown
            self.state = "os"

    def _restart(self, at: float) -> None:
        self.state = "booting"
        self._pending.append((at, BANNER + self.autoboot))
        self._countdown_at = at
        self._boot_at = at + self.countdown_s

    # -- ByteLink ---------------------------------------------------------------------------

    def read(self, n: int, timeout_s: float) -> bytes:
        self._advance()
        if not self.out:
            step = min(timeout_s, 0.05) if timeout_s > 0 else 0.0
            self.clock.now += step
            self._advance()
            if not self.out:
                self.clock.now += max(0.0, timeout_s - step)
                self._advance()
        data = bytes(self.out[:n])
        del self.out[:n]
        return data

    def write(self, data: bytes) -> None:
        self._advance()
        self.sent += data
        for byte in data:
            self._key(bytes([byte]))

    # -- the console ------------------------------------------------------------------------

    def _key(self, key: bytes) -> None:
        if self.hung or self.state in ("os", "booting"):
            return
        if self.state == "countdown":
            if self.stop_string is None:
                self.state = "prompt"
                self.out += b"\b\b\b 0 \r\n" + self.prompt
            else:
                self._stop_buf = (self._stop_buf + key)[-len(self.stop_string) :]
                if self._stop_buf == self.stop_string:
                    self.state = "prompt"
                    self.out += b"\r\n" + self.prompt
            return
        if key == b"\x03":
            self._line.clear()
            self.out += b"<INTERRUPT>\r\n" + self.prompt
            self._last = ""
            return
        if key in (b"\r", b"\n"):
            self.out += b"\r\n"
            line = self._line.decode()
            self._line.clear()
            if not line:
                line = self._last  # U-Boot repeats the last command
            self._reset_pending = False
            if line:
                self._execute(line)
            if not self.hung and not self._reset_pending:
                self.out += self.prompt
            return
        self._line += key
        self.out += key

    def _execute(self, line: str) -> None:
        self.lines.append(line)
        self._last = line
        if self.hang_on is not None and self.hang_on in line:
            self.hung = True
            return
        rc = 0
        if line.strip() == "reset":
            self.out += b"resetting ...\r\n"
            self.hung = False
            self._restart(self.clock.now + 0.3)
            self._reset_pending = True
            return
        for part in (p.strip() for p in line.split(";")):
            if part.startswith("echo "):
                text = part[5:].strip('"')
                if text == "<rc=$?>":
                    text = f"<rc={rc}>"
                self.out += text.encode() + b"\r\n"
                continue
            answer = self.answers.get(part)
            if answer is None:
                name = part.split()[0] if part else ""
                self.out += f"Unknown command '{name}' - try 'help'\r\n".encode()
                rc = 1
                continue
            if callable(answer):
                text, rc = answer(part)
            else:
                text, rc = answer, 0
            if text:
                self.out += text.replace("\n", "\r\n").encode() + b"\r\n"


def probe_answers(data_dir: Path, *, vendor: str = "emulation") -> dict[str, str]:
    """What the driver's probe asks, answered as Debian's qemu_arm64 U-Boot does."""
    env = "\n".join(
        [
            "arch=arm",
            "board=qemu-arm",
            "board_name=qemu-arm",
            "bootcmd=run distro_bootcmd",
            "cpu=armv8",
            "loadaddr=0x40200000",
            f"vendor={vendor}",
            "",
            "Environment size: 4511/262140 bytes",
        ]
    )
    bdinfo = "\n".join(
        [
            "DRAM bank   = 0x0000000000000000",
            "-> start    = 0x0000000040000000",
            "-> size     = 0x0000000020000000",
            "relocaddr   = 0x000000005fef7000",
            "Build       = 64-bit",
            " reserved[0]\t[0x5ddb2000-0x5fffffff], 0x0224e000 bytes flags: 0",
        ]
    )
    return {
        "help": (data_dir / "help.txt").read_bytes().decode().replace("\r\n", "\n").strip(),
        "version": "U-Boot 2023.01+dfsg-2+deb12u3 (Jun 22 2026 - 08:38:07 +0000)\n\n"
        "aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0",
        "bdinfo": bdinfo,
        "printenv": env,
        "flinfo": (data_dir / "flinfo.txt").read_bytes().decode().replace("\r\n", "\n").strip(),
        "virtio info": (data_dir / "virtio-info.txt").read_bytes().decode().strip(),
        "nvme scan": "",
        "nvme info": "",
        "mtd list": (data_dir / "mtd-list.txt").read_bytes().decode().strip(),
    }
