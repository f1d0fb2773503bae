"""The XMODEM/YMODEM state machines over a simulated line (virtual clock, no I/O)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbrick.errors import TransportError
from unbrick.transports.xymodem import (
    ACK,
    CAN,
    CANCEL,
    EOT,
    NAK,
    Action,
    FileData,
    FileEnd,
    FileInfo,
    FileStart,
    OutgoingFile,
    Receiver,
    Sender,
    Variant,
    encode_block,
    encode_header,
    uboot_loadx_image,
)

from .simwire import LineFaults, Outcome, run
from .ubootmodel import UBootReceiver

pytestmark = pytest.mark.unit

SIZES = [0, 1, 127, 128, 129, 1023, 1024, 1025, 100 * 1024]


def received(outcome: Outcome) -> bytes:
    return b"".join(e.data for e in outcome.receiver.events if isinstance(e, FileData))


def xmodem_matches(got: bytes, data: bytes) -> bool:
    """XMODEM keeps the 0x1A padding: compare over the real length, padding after it."""
    return got[: len(data)] == data and set(got[len(data) :]) <= {0x1A} and len(got) % 128 == 0


def both_ok(o: Outcome) -> None:
    assert o.sender.error is None, o.sender.error
    assert o.receiver.error is None, o.receiver.error
    assert o.sender.finished and o.receiver.finished


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("block_size", [128, 1024])
def test_xmodem_round_trip(size: int, block_size: int) -> None:
    data = random.Random(size).randbytes(size)
    o = run(
        Sender(Variant.XMODEM, [OutgoingFile("", data)], block_size=block_size),
        Receiver(Variant.XMODEM),
    )
    both_ok(o)
    assert xmodem_matches(received(o), data)


@pytest.mark.parametrize("size", SIZES)
def test_xmodem_checksum_mode_uses_128_byte_blocks(size: int) -> None:
    data = random.Random(size).randbytes(size)
    sender = Sender(Variant.XMODEM, [OutgoingFile("", data)])
    o = run(sender, Receiver(Variant.XMODEM, crc=False))
    both_ok(o)
    assert not sender.crc
    got = received(o)
    assert xmodem_matches(got, data)
    assert len(got) == -(-size // 128) * 128  # no 1K blocks


@pytest.mark.parametrize("size", SIZES)
def test_ymodem_round_trip_keeps_name_and_size(size: int) -> None:
    data = random.Random(size).randbytes(size)
    sender = Sender(Variant.YMODEM, [OutgoingFile("fw-1.bin", data, mtime_s=1_700_000_000)])
    o = run(sender, Receiver(Variant.YMODEM))
    both_ok(o)
    assert received(o) == data
    starts = [e for e in o.receiver.events if isinstance(e, FileStart)]
    assert [s.info for s in starts] == [
        FileInfo("fw-1.bin", size, 1_700_000_000, 0o100644),
    ]
    assert sender.batch_end_acked
    assert sender.bytes_acked == size


def test_ymodem_batch_of_three_files() -> None:
    files = [OutgoingFile(f"f{i}.bin", random.Random(i).randbytes(i * 700)) for i in range(3)]
    o = run(Sender(Variant.YMODEM, files), Receiver(Variant.YMODEM))
    both_ok(o)
    split: list[tuple[str, bytes]] = []
    for e in o.receiver.events:
        if isinstance(e, FileStart):
            split.append((e.info.name, b""))
        elif isinstance(e, FileData):
            split[-1] = (split[-1][0], split[-1][1] + e.data)
    assert split == [(f.name, f.data) for f in files]
    assert sum(isinstance(e, FileEnd) for e in o.receiver.events) == 3


# --- U-Boot's receiver ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1024, 1025, 70_000])
def test_into_uboot_loady_without_waiting_for_its_timeout(size: int) -> None:
    data = random.Random(size).randbytes(size) + b"\x1a\x1a\x1a"  # YMODEM keeps even these
    uboot = UBootReceiver(ymodem=True)
    o = run(Sender(Variant.YMODEM, [OutgoingFile("img", data)]), uboot)
    assert o.sender.error is None and uboot.error is None
    assert bytes(uboot.stored) == data
    # U-Boot sends no C after block 0: the sender goes on after its short grace instead of
    # waiting ~4.3 s for U-Boot's timeout, as sz does; U-Boot never had to ask twice.
    assert o.time_s < 1.0 + len(data) / 11520 * 1.2
    assert uboot.c_sent == 2  # the opening C and the one before the final block 0


@pytest.mark.parametrize("size", [1, 1024, 5000])
def test_into_uboot_loadx_matches_what_uboot_stores(size: int) -> None:
    data = random.Random(size).randbytes(size)
    uboot = UBootReceiver(ymodem=False)
    o = run(Sender(Variant.XMODEM, [OutgoingFile("", data)]), uboot)
    assert o.sender.error is None and uboot.error is None
    assert bytes(uboot.stored) == uboot_loadx_image(data) == data


def test_uboot_c_is_a_retransmission_request() -> None:
    data = random.Random(5).randbytes(5000)
    sender = Sender(Variant.YMODEM, [OutgoingFile("img", data)])
    now = 0.0
    sender.start(now)
    a = sender.receive(b"C", now)
    a = sender.receive(bytes((ACK,)), now)  # block 0 ACKed, no C follows
    a = sender.timeout(a.deadline_s or 0.0)  # grace over: block 1 goes out
    block1 = a.send
    assert block1[:3] == b"\x02\x01\xfe"
    a = sender.receive(bytes((ACK,)), now)
    assert a.send[:3] == b"\x02\x02\xfd"
    block2 = a.send
    a = sender.receive(b"C", now)  # U-Boot: CRC error on block 2
    assert a.send == block2 and a.flush_input


@pytest.mark.parametrize("seed", range(8))
def test_into_uboot_over_a_noisy_line(seed: int) -> None:
    data = random.Random(seed).randbytes(20_000)
    uboot = UBootReceiver(ymodem=True)
    o = run(
        Sender(Variant.YMODEM, [OutgoingFile("img", data)]),
        uboot,
        seed=seed,
        to_receiver=LineFaults(drop=0.05, corrupt=0.1, noise=0.05),
    )
    assert o.sender.error is None and uboot.error is None
    assert bytes(uboot.stored) == data


# --- failures and their messages ------------------------------------------------------------------


class Silent:
    """A receiver that never answers."""

    def start(self, now_s: float) -> Action:
        return Action(deadline_s=1e9)

    def receive(self, data: bytes, now_s: float) -> Action:
        return Action(deadline_s=1e9)

    def timeout(self, now_s: float) -> Action:
        return Action(deadline_s=1e9)


@pytest.mark.parametrize(
    ("variant", "command"), [(Variant.XMODEM, "loadx"), (Variant.YMODEM, "loady")]
)
def test_no_receiver_names_the_command(variant: Variant, command: str) -> None:
    o = run(Sender(variant, [OutgoingFile("a", b"x")]), Silent(), max_time_s=100)
    assert isinstance(o.sender.error, TransportError)
    assert o.sender.error.message == (
        f"no 'C' or NAK from the receiver within 10 s: is `{command}` running?"
    )


def _started_sender(
    data: bytes, *, retries: int = 10, timeout_s: float = 10.0
) -> tuple[Sender, Action]:
    sender = Sender(Variant.XMODEM, [OutgoingFile("", data)], retries=retries, timeout_s=timeout_s)
    sender.start(0.0)
    return sender, sender.receive(b"C", 0.0)


def test_nak_ten_times_names_the_block() -> None:
    sender, a = _started_sender(bytes(40 * 1024), retries=10)
    for _ in range(36):
        a = sender.receive(bytes((ACK,)), 0.0)
    assert sender.describe() == "XMODEM block 37"
    sends = 0
    while a.error is None:
        a = sender.receive(bytes((NAK,)), 0.0)
        sends += bool(a.send)
    assert a.error.message == "XMODEM block 37: receiver sent NAK 10 times"
    assert a.send == CANCEL
    assert sends == 10  # nine retransmissions, then the cancel
    assert a.finished


def test_receiver_gone_after_start_times_out_naming_the_block() -> None:
    sender, a = _started_sender(b"x" * 3000, timeout_s=2.0, retries=3)
    a = sender.receive(bytes((ACK,)), 0.1)  # block 1 ACKed; then silence
    times = []
    while a.error is None:
        assert a.deadline_s is not None
        times.append(a.deadline_s)
        a = sender.timeout(a.deadline_s)
    assert a.error.message == (
        "XMODEM block 2: not acknowledged after 3 tries (0 NAK, 3 timeouts of 2 s)"
    )
    assert times == pytest.approx([2.1, 4.1, 6.1])


def test_receiver_cancel_aborts_the_sender() -> None:
    sender, a = _started_sender(b"x" * 3000)
    a = sender.receive(bytes((CAN,)), 0.0)
    assert a.error is None and not a.send  # one CAN is noise
    a = sender.receive(bytes((CAN, CAN)), 0.0)
    assert a.error is not None
    assert a.error.message == "XMODEM block 1: receiver cancelled (CAN CAN)"
    assert a.send == b"" and a.finished


def test_sender_cancel_aborts_the_receiver() -> None:
    r = Receiver(Variant.YMODEM)
    r.start(0.0)
    a = r.receive(CANCEL, 0.1)
    assert a.error is not None
    assert a.error.message == "YMODEM header block: sender cancelled (CAN CAN)"
    assert a.finished and a.send == b""


def test_repeated_c_at_the_start_sends_block_1_once() -> None:
    sender = Sender(Variant.XMODEM, [OutgoingFile("", b"y" * 2000)])
    sender.start(0.0)
    a = sender.receive(b"CCC", 0.0)  # the receiver was started early: three C queued
    assert a.send[:3] == b"\x02\x01\xfe"
    a = sender.receive(b"C", 0.01)  # one more, sent before block 1 arrived
    assert a.send == b""  # not a retransmission: wait for the ACK a moment
    a = sender.receive(bytes((ACK,)), 0.05)
    assert a.send[:3] == b"\x02\x02\xfd"


def test_receiver_repeats_c_until_the_sender_starts() -> None:
    r = Receiver(Variant.XMODEM, timeout_s=10.0, retries=4)
    sent = [r.start(0.0).send]
    a = r.timeout(3.0)
    while not a.finished:
        sent.append(a.send)
        assert a.deadline_s is not None
        a = r.timeout(a.deadline_s)
    assert sent == [b"C"] * 4
    assert a.error is not None
    assert a.error.message.startswith("XMODEM block 1: no block from the sender within 12 s")


def test_receiver_naks_a_corrupt_block_after_the_line_is_quiet() -> None:
    r = Receiver(Variant.XMODEM, purge_s=0.2)
    r.start(0.0)
    frame = bytearray(encode_block(1, bytes(1024), crc=True))
    frame[500] ^= 0x10
    a = r.receive(bytes(frame), 1.0)
    assert a.send == b"" and a.deadline_s == pytest.approx(1.2)
    a = r.receive(b"\x00\x00", 1.1)  # more garbage pushes the NAK back
    assert a.send == b"" and a.deadline_s == pytest.approx(1.3)
    a = r.timeout(1.3)
    assert a.send == b"C"  # no block accepted yet: ask with C
    a = r.receive(encode_block(1, bytes(1024), crc=True), 2.0)
    assert a.send == bytes((ACK,)) and a.events == (FileData(bytes(1024)),)
    frame2 = bytearray(encode_block(2, bytes(128), crc=True))
    frame2[2] ^= 1  # complement no longer matches
    r.receive(bytes(frame2), 3.0)
    assert r.timeout(3.3).send == bytes((NAK,))


def test_receiver_acks_a_repeated_block_once() -> None:
    r = Receiver(Variant.XMODEM)
    r.start(0.0)
    block = encode_block(1, b"a" * 128, crc=True)
    first = r.receive(block, 0.1)
    again = r.receive(block, 0.2)
    assert first.send == again.send == bytes((ACK,))
    assert [e for e in first.events + again.events if isinstance(e, FileData)] == [
        FileData(b"a" * 128)
    ]


def test_receiver_refuses_a_block_out_of_sequence() -> None:
    r = Receiver(Variant.XMODEM)
    r.start(0.0)
    r.receive(encode_block(1, bytes(128), crc=True), 0.1)
    a = r.receive(encode_block(3, bytes(128), crc=True), 0.2)
    assert a.error is not None and "XMODEM block 2: got block 3" in a.error.message
    assert a.send == CANCEL


def test_receiver_naks_the_first_eot_and_acks_the_second() -> None:
    r = Receiver(Variant.XMODEM)
    r.start(0.0)
    r.receive(encode_block(1, bytes(128), crc=True), 0.1)
    assert r.receive(bytes((EOT,)), 0.2).send == bytes((NAK,))
    a = r.receive(bytes((EOT,)), 0.3)
    assert a.send == bytes((ACK, ACK)) and a.finished and a.error is None
    assert a.events == (FileEnd(128),)


def test_ymodem_file_shorter_than_announced_is_an_error() -> None:
    r = Receiver(Variant.YMODEM)
    r.start(0.0)
    r.receive(encode_block(0, encode_header(FileInfo("a", 2000)), crc=True), 0.1)
    r.receive(encode_block(1, bytes(1024), crc=True), 0.2)
    r.receive(bytes((EOT,)), 0.3)
    a = r.receive(bytes((EOT,)), 0.4)
    assert a.error is not None
    assert a.error.message == "YMODEM file 'a': the sender ended after 1024 of 2000 bytes"
    assert not any(isinstance(e, FileEnd) for e in a.events)


def test_receiver_size_limit() -> None:
    r = Receiver(Variant.YMODEM, max_bytes=1000)
    r.start(0.0)
    a = r.receive(encode_block(0, encode_header(FileInfo("big", 5000)), crc=True), 0.1)
    assert a.error is not None and "over the limit of 1000" in a.error.message
    x = Receiver(Variant.XMODEM, max_bytes=1000)
    x.start(0.0)
    x.receive(encode_block(1, bytes(1024), crc=False), 0.1)
    x2 = Receiver(Variant.XMODEM, max_bytes=1000)
    x2.start(0.0)
    a = x2.receive(encode_block(1, bytes(1024), crc=True), 0.1)
    assert a.error is not None and "more than 1000 bytes" in a.error.message


# --- property tests ---------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=6000),
    variant=st.sampled_from(Variant),
    seed=st.integers(0, 2**32 - 1),
    rates=st.tuples(*[st.sampled_from([0.0, 0.02, 0.1, 0.3])] * 3),
    back_rates=st.tuples(*[st.sampled_from([0.0, 0.02, 0.1, 0.3])] * 3),
)
def test_round_trip_over_a_noisy_line(
    data: bytes,
    variant: Variant,
    seed: int,
    rates: tuple[float, float, float],
    back_rates: tuple[float, float, float],
) -> None:
    """Whatever the line does: no hang, only typed errors, and success means the data."""
    sender = Sender(variant, [OutgoingFile("f", data)], timeout_s=5.0)
    receiver = Receiver(variant, timeout_s=5.0)
    o = run(
        sender,
        receiver,
        seed=seed,
        to_receiver=LineFaults(*rates),
        to_sender=LineFaults(*back_rates),
        max_time_s=5_000,
    )
    assert o.sender.finished and o.receiver.finished, "a side is still waiting"
    got = received(o)
    intact = got == data if variant is Variant.YMODEM else xmodem_matches(got, data)
    if o.receiver.error is None:
        assert intact, "the receiver finished without error on wrong data"
    if o.sender.error is None:
        assert o.receiver.error is None and intact, "the sender succeeded, the receiver did not"
    if not any(rates + back_rates):
        both_ok(o)


_special = st.sampled_from([b"\x04", b"\x18", b"\x18\x18", b"C", b"\x01", b"\x02", b"\x06"])
_frames = st.builds(
    lambda n, p, crc: encode_block(n, p, crc=crc),
    st.integers(0, 300),
    st.sampled_from([bytes(128), b"\x1a" * 1024, encode_header(FileInfo("x", 100))]),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    variant=st.sampled_from(Variant),
    crc=st.booleans(),
    steps=st.lists(st.one_of(st.none(), st.binary(max_size=1100), _special, _frames), max_size=60),
)
def test_receiver_fuzz(variant: Variant, crc: bool, steps: list[bytes | None]) -> None:
    """Random input and timeouts: typed errors only, and the receiver always ends."""
    r = Receiver(variant, crc=crc, retries=3, timeout_s=1.0, max_bytes=1 << 16)
    now = 0.0
    a = r.start(now)
    for step in steps:
        if a.finished:
            break
        if step is None:
            assert a.deadline_s is not None
            now = max(now, a.deadline_s)
            a = r.timeout(now)
        else:
            now += 0.001
            a = r.receive(step, now)
        assert a.error is None or isinstance(a.error, TransportError)
    for _ in range(200):
        if a.finished:
            break
        assert a.deadline_s is not None and a.deadline_s >= now
        now = a.deadline_s
        a = r.timeout(now)
    assert a.finished, "the receiver did not give up"


@settings(max_examples=200, deadline=None)
@given(
    variant=st.sampled_from(Variant),
    steps=st.lists(st.one_of(st.none(), st.binary(max_size=64), _special), max_size=80),
)
def test_sender_fuzz(variant: Variant, steps: list[bytes | None]) -> None:
    s = Sender(variant, [OutgoingFile("f", b"z" * 3000)], retries=3, timeout_s=1.0)
    now = 0.0
    a = s.start(now)
    for step in steps:
        if a.finished:
            break
        if step is None:
            assert a.deadline_s is not None
            now = max(now, a.deadline_s)
            a = s.timeout(now)
        else:
            now += 0.001
            a = s.receive(step, now)
        assert a.error is None or isinstance(a.error, TransportError)
    for _ in range(200):
        if a.finished:
            break
        assert a.deadline_s is not None
        now = a.deadline_s
        a = s.timeout(now)
    assert a.finished
