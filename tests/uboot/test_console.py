"""The console session against a scripted U-Boot on a simulated clock."""

from __future__ import annotations

import re

import pytest

from tests.uboot.fake import Clock, FakeUBoot
from unbrick.errors import DeviceError, TransportError, UsageError
from unbrick.transports.uboot.console import (
    Console,
    ConsoleOptions,
    ConsoleState,
    PortLink,
    transition,
)

pytestmark = pytest.mark.unit

ANSWERS = {
    "version": "U-Boot 2023.01+dfsg-2+deb12u3 (Jun 22 2026 - 08:38:07 +0000)",
    "md.b 0 4": "00000000: 0a 00 00 14                                      ....",
    "cp.b 0x40200000 0x04040000 0x100": "Copy to Flash... Can't write to protected Flash sectors",
    "cmp.b 0x1 0x2 0x8": (
        lambda _: ("byte at 0x1 (0xd0) != byte at 0x2 (0xd)\nTotal of 0 byte(s) were the same", 1)
    ),
}


def console(fake: FakeUBoot, clock: Clock, **kw: object) -> Console:
    return Console(fake, ConsoleOptions(**kw), clock=clock, name="fake")  # type: ignore[arg-type]


def test_attach_interrupts_autoboot_and_reaches_the_prompt() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, answers=dict(ANSWERS))
    con = console(fake, clock)
    log = con.attach()
    assert con.state is ConsoleState.PROMPT
    assert "Hit any key to stop autoboot" in log
    assert fake.state == "prompt"
    assert clock.now < 2.4  # stopped before the countdown ran out
    assert con.run("version").output.startswith("U-Boot 2023.01")


def test_attach_to_a_device_already_at_its_prompt_never_sends_an_empty_line() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, booting=False, answers=dict(ANSWERS))
    fake.answers["md.b 0 4"] = ANSWERS["md.b 0 4"]
    con = console(fake, clock)
    fake._last = "md.b 0 4"  # a repeatable command was the last one typed
    con.attach()
    assert con.state is ConsoleState.PROMPT
    assert fake.lines == ["echo ub-sync-1"]  # nothing repeated
    assert b"\n\n" not in fake.sent and not re.search(rb"(^|[\r\n])[\r\n]", bytes(fake.sent))


def test_a_device_powered_on_late_with_a_short_countdown_is_still_caught() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, boot_delay_s=1.5, countdown_s=0.5, answers=dict(ANSWERS))
    con = console(fake, clock)
    con.attach()
    assert fake.state == "prompt" and con.state is ConsoleState.PROMPT
    assert clock.now < 2.0


def test_keyed_autoboot_is_stopped_by_the_configured_string() -> None:
    clock = Clock()
    fake = FakeUBoot(
        clock, autoboot=b'Autobooting in 3 seconds, press "tpl" to stop\r\n', stop_string=b"tpl"
    )
    con = console(fake, clock, interrupt=b"tpl")
    con.attach()
    assert fake.state == "prompt" and con.state is ConsoleState.PROMPT


def test_a_device_that_boots_past_the_countdown_is_a_timeout() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, stop_string=b"secret")  # the default Ctrl-C does not stop it
    con = console(fake, clock, attach_timeout_s=6.0)
    with pytest.raises(TransportError, match="no U-Boot prompt '=>' on fake within 6 s"):
        con.attach()
    assert fake.state == "os"
    assert "Starting kernel" in con.attach_log


def test_commands_strip_the_echo_and_report_errors() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, booting=False, answers=dict(ANSWERS))
    con = console(fake, clock)
    con.attach()
    res = con.run("md.b 0 4")
    assert res.output == ANSWERS["md.b 0 4"] and res.ok and res.status is None
    with pytest.raises(DeviceError, match=r"'cp\.b 0x40200000 0x04040000 0x100' failed: Copy to"):
        con.run("cp.b 0x40200000 0x04040000 0x100")
    res = con.run("cmp.b 0x1 0x2 0x8", check=False, status=True)
    assert res.status == 1 and res.output.endswith("were the same")
    with pytest.raises(DeviceError, match="exit status 1"):
        con.run("cmp.b 0x1 0x2 0x8", status=True)
    with pytest.raises(DeviceError, match="Unknown command 'nosuch'"):
        con.run("nosuch")
    assert con.state is ConsoleState.PROMPT


def test_bad_command_lines_are_refused_before_sending() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, booting=False)
    con = console(fake, clock, max_line_chars=40)
    con.attach()
    sent = len(fake.sent)
    for bad, message in [
        ("", "empty command would repeat"),
        ("   ", "empty command would repeat"),
        ("version\nreset", "line break"),
        ("x" * 41, "longer than 40"),
    ]:
        with pytest.raises(UsageError, match=message):
            con.run(bad)
    assert len(fake.sent) == sent


def test_a_console_that_stops_answering_times_out_naming_the_command() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, booting=False, answers=dict(ANSWERS))
    con = console(fake, clock, command_timeout_s=3.0)
    con.attach()
    fake.hang_on = "virtio write"
    fake.answers["virtio write 0x40200000 0x800 0x200"] = ""
    start = clock.now
    with pytest.raises(TransportError, match=r"did not answer 'virtio write 0x40200000 .*3\.0 s"):
        con.run("virtio write 0x40200000 0x800 0x200")
    assert 3.0 <= clock.now - start < 4.0
    assert con.state is ConsoleState.LOST
    # Still hung: the next command first tries to synchronise, and says so.
    with pytest.raises(TransportError, match="prompt on fake did not come back"):
        con.run("version")
    # The device recovers (say, a power cycle back to the prompt): synchronised again.
    fake.hung = False
    fake.hang_on = None
    assert con.run("version").ok
    assert con.state is ConsoleState.PROMPT


def test_timeouts_grow_with_the_data_moved() -> None:
    opts = ConsoleOptions(command_timeout_s=5.0, min_rate_bytes_s=1000.0)
    assert opts.timeout_for() == 5.0
    assert opts.timeout_for(10_000) == 15.0
    assert opts.timeout_for(10_000, factor=0.5) == 10.0


def test_a_garbled_echo_is_not_trusted() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, booting=False, answers=dict(ANSWERS))
    con = console(fake, clock)
    con.attach()
    real_key = fake._key

    def noisy(key: bytes) -> None:
        real_key(b"#" if key == b"v" else key)

    fake._key = noisy  # type: ignore[method-assign]
    with pytest.raises(TransportError, match="echoed '#ersion'"):
        con.run("version")
    assert con.state is ConsoleState.LOST


def test_capture_ends_on_pattern_quiet_or_timeout() -> None:
    clock = Clock()
    fake = FakeUBoot(clock, booting=False, answers=dict(ANSWERS))
    con = console(fake, clock)
    con.attach()
    fake.out += b"resetting ...\r\nU-Boot 2023.01\r\nHit any key to stop autoboot:  2 "
    text, why = con.capture(timeout_s=5, stop=re.compile(rb"Hit any key to stop autoboot"))
    assert why == "stop" and text.endswith("Hit any key to stop autoboot")
    fake.out += b"Starting kernel ...\r\n"
    text, why = con.capture(timeout_s=30, quiet_s=2.0)
    assert why == "quiet" and "Starting kernel" in text
    assert con.capture(timeout_s=1.0, quiet_s=0.5) == ("", "silent")


def test_state_transitions_are_checked() -> None:
    assert transition(ConsoleState.PROMPT, ConsoleState.COMMAND) is ConsoleState.COMMAND
    assert transition(ConsoleState.TRANSFER, ConsoleState.CLOSED) is ConsoleState.CLOSED
    with pytest.raises(UsageError, match="from detached to transfer"):
        transition(ConsoleState.DETACHED, ConsoleState.TRANSFER)


class _Port:
    """The pyserial surface PortLink uses."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.timeout: float | None = None
        self.timeouts_set = 0
        self.written = bytearray()

    @property
    def in_waiting(self) -> int:
        return len(self.data)

    def read(self, n: int = 1) -> bytes:
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def write(self, data: bytes) -> int:
        self.written += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __setattr__(self, name: str, value: object) -> None:
        if name == "timeout":
            object.__setattr__(self, "timeouts_set", getattr(self, "timeouts_set", 0) + 1)
        object.__setattr__(self, name, value)


def test_port_link_reads_what_is_there_and_takes_bytes_back() -> None:
    port = _Port(b"## Ready for binary (xmodem) download\r\nCC")
    link = PortLink(port, name="p")
    assert link.read(100, 1.0) == b"## Ready for binary (xmodem) download\r\nCC"
    link.unread(b"CC")
    assert link.read(1, 1.0) == b"C"
    assert link.read(5, 1.0) == b"C"
    assert link.read(5, 1.0) == b""
    # pyserial re-applies settings on each change of timeout: only set when it changes.
    before = port.timeouts_set
    link.read(1, 1.0)
    link.read(1, 1.0)
    assert port.timeouts_set == before
    link.write(b"loadx\n")
    assert bytes(port.written) == b"loadx\n"


def test_opening_a_port_that_is_not_there_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match=r"cannot open the console socket://127\.0\.0\.1:1"):
        PortLink.open("socket://127.0.0.1:1", timeout_s=1.0)
