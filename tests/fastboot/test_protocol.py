"""The fastboot codec: responses, commands, TCP frames, UDP packets; round trips and fuzz."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import TransportError
from unbrick.transports.fastboot import protocol as p

pytestmark = pytest.mark.unit

TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


def test_usb_interface_triplet() -> None:
    assert (p.USB_INTERFACE_CLASS, p.USB_INTERFACE_SUBCLASS, p.USB_INTERFACE_PROTOCOL) == (
        0xFF,
        0x42,
        0x03,
    )


@pytest.mark.parametrize(
    ("payload", "kind", "message", "size"),
    [
        (b"OKAY0.4", p.ResponseKind.OKAY, "0.4", None),
        (b"OKAY", p.ResponseKind.OKAY, "", None),
        (b"FAILUnknown variable", p.ResponseKind.FAIL, "Unknown variable", None),
        (b"DATA00001234", p.ResponseKind.DATA, "00001234", 0x1234),
        (b"DATA0000000100000000", p.ResponseKind.DATA, "0000000100000000", 1 << 32),
        (b"INFOerasing flash", p.ResponseKind.INFO, "erasing flash", None),
        (b"TEXTpartial\0garbage", p.ResponseKind.TEXT, "partial", None),
        (b"OKAYvalue\0\0\0", p.ResponseKind.OKAY, "value", None),
    ],
)
def test_parse_response(
    payload: bytes, kind: p.ResponseKind, message: str, size: int | None
) -> None:
    r = p.parse_response(payload)
    assert (r.kind, r.message, r.size) == (kind, message, size)
    assert r.final == (kind not in (p.ResponseKind.INFO, p.ResponseKind.TEXT))


@pytest.mark.parametrize(
    "payload", [b"", b"OKA", b"HELLO", b"DATA", b"DATAxyz", b"DATA" + b"1" * 17, b"okay"]
)
def test_bad_responses(payload: bytes) -> None:
    with pytest.raises(p.FastbootProtocolError):
        p.parse_response(payload)


@given(st.sampled_from(list(p.ResponseKind)), TEXT)
def test_response_round_trip(kind: p.ResponseKind, message: str) -> None:
    if kind is p.ResponseKind.DATA:
        return
    data = p.encode_response(kind, message[:250])
    r = p.parse_response(data)
    assert r.kind is kind
    assert r.message == message[:250].rstrip("\0")


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_data_round_trip(size: int) -> None:
    r = p.parse_response(p.encode_data(size))
    assert r.kind is p.ResponseKind.DATA and r.size == size
    if size <= p.MAX_DOWNLOAD_BYTES:
        assert len(p.encode_data(size)) == 12


def test_encode_response_too_long() -> None:
    with pytest.raises(p.FastbootProtocolError):
        p.encode_response(p.ResponseKind.INFO, "x" * 253)


@pytest.mark.parametrize(
    ("text", "name", "arg"),
    [
        ("getvar:version", "getvar", "version"),
        ("getvar:partition-size:boot_a", "getvar", "partition-size:boot_a"),
        ("download:00001000", "download", "00001000"),
        ("reboot-bootloader", "reboot-bootloader", ""),
        ("oem device-info", "oem", "device-info"),
        ("oem get:thing x", "oem", "get:thing x"),
        ("flashing unlock", "flashing", "unlock"),
        ("set_active:b", "set_active", "b"),
    ],
)
def test_parse_command(text: str, name: str, arg: str) -> None:
    cmd = p.parse_command(text.encode())
    assert (cmd.name, cmd.arg) == (name, arg)
    assert cmd.encode() == text.encode()


@given(st.sampled_from(["getvar", "flash", "erase", "fetch", "oem"]), TEXT)
def test_command_round_trip(name: str, arg: str) -> None:
    arg = arg.strip()
    if name == "oem":
        arg = arg.replace(":", "")
    text = f"{name}:{arg}" if name != "oem" else f"oem {arg}"
    if not arg:
        text = name
    cmd = p.parse_command(p.encode_command(text))
    assert cmd.encode() == text.encode()


@pytest.mark.parametrize("payload", [b"", b"x" * 4097, b"getvar:\xff", b"flash:a\nb"])
def test_bad_commands(payload: bytes) -> None:
    with pytest.raises(p.FastbootProtocolError):
        p.parse_command(payload)


def test_encode_command_checks() -> None:
    assert p.getvar_command("product") == b"getvar:product"
    assert p.download_command(0x1234) == b"download:00001234"
    assert p.fetch_command("boot_a", 16, 4096) == b"fetch:boot_a:0x00000010:0x00001000"
    for bad in ("", "x" * 4097, "héllo", "a\tb"):
        with pytest.raises(p.FastbootProtocolError):
            p.encode_command(bad)
    for size in (0, 1 << 32):
        with pytest.raises(p.FastbootProtocolError):
            p.download_command(size)
    with pytest.raises(p.FastbootProtocolError):
        p.fetch_command("boot", -1, 1)


def test_fetch_arg() -> None:
    assert p.parse_fetch_arg("boot_a") == ("boot_a", None, None)
    assert p.parse_fetch_arg("boot_a:0x10") == ("boot_a", 16, None)
    assert p.parse_fetch_arg("boot_a:0x10:4096") == ("boot_a", 16, 4096)
    for bad in ("", ":1", "a:b", "a:1:2:3", "a:0x"):
        with pytest.raises(p.FastbootProtocolError):
            p.parse_fetch_arg(bad)


def test_numbers_and_flags() -> None:
    assert p.parse_number(" 0x10000000 ", "x") == 0x10000000
    assert p.parse_number("268435456", "x") == 268435456
    for bad in ("", "0x", "-1", "12ab", "0x" + "f" * 17, "١٢"):
        with pytest.raises(p.FastbootProtocolError):
            p.parse_number(bad, "x")
    assert p.parse_yes_no("yes") is True and p.parse_yes_no(" NO ") is False
    assert p.parse_yes_no(None) is None and p.parse_yes_no("maybe") is None


def test_getvar_all_lines() -> None:
    lines = [
        "version: 0.4",
        "partition-size:boot_a: 0x4000000",
        "max-download-size:0x10000000",
        "is-logical:system_a:no",
        "banner without variable",
        "   ",
        "has-slot:boot: yes",
    ]
    assert p.parse_getvar_all(lines) == {
        "version": "0.4",
        "partition-size:boot_a": "0x4000000",
        "max-download-size": "0x10000000",
        "is-logical:system_a": "no",
        "has-slot:boot": "yes",
    }
    variables = {"product": "x", "partition-size:boot_a": "0x1000", "secure": "yes"}
    assert p.parse_getvar_all(p.format_getvar_all(variables)) == variables


def test_tcp_framing() -> None:
    assert p.parse_handshake(b"FB01") == 1
    assert p.parse_handshake(b"FB02") == 2
    for bad in (b"FB00", b"XX01", b"FB1", b"FBab"):
        with pytest.raises(p.FastbootProtocolError):
            p.parse_handshake(bad)
    frame = p.encode_frame(b"getvar:version")
    assert frame[:8] == b"\0\0\0\0\0\0\0\x0e"
    dec = p.FrameDecoder()
    out: list[bytes] = []
    for i in range(len(frame) * 2):
        out += dec.feed((frame + p.encode_frame(b"OKAY"))[i : i + 1])
    assert out == [b"getvar:version", b"OKAY"] and dec.pending == 0
    with pytest.raises(p.FastbootProtocolError):
        p.FrameDecoder(max_frame=4).feed(p.encode_frame(b"12345"))
    with pytest.raises(p.FastbootProtocolError):
        p.parse_frame_header(b"123")


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=50))
def test_frames_round_trip(messages: list[bytes], step: int) -> None:
    stream = b"".join(p.encode_frame(m) for m in messages)
    dec = p.FrameDecoder()
    got: list[bytes] = []
    for i in range(0, len(stream), step):
        got += dec.feed(stream[i : i + step])
    assert got == messages


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=2000))
def test_udp_round_trip(ident: int, flags: int, seq: int, data: bytes) -> None:
    pkt = p.UdpPacket(ident, flags, seq, data)
    back = p.decode_packet(pkt.encode())
    assert back == pkt
    assert back.continuation == bool(flags & 1)


def test_udp_values() -> None:
    assert p.parse_init(p.encode_init(1, 2048)) == (1, 2048)
    assert p.parse_query(p.encode_seq(0x55AA)) == 0x55AA
    request = p.UdpPacket(p.PacketId.FASTBOOT, 0, 7, b"getvar:x")
    assert p.UdpPacket(p.PacketId.FASTBOOT, 0, 7).answers(request)
    assert p.UdpPacket(p.PacketId.ERROR, 0, 7, b"bad").answers(request)
    assert not p.UdpPacket(p.PacketId.FASTBOOT, 0, 8).answers(request)
    assert not p.UdpPacket(p.PacketId.INIT, 0, 7).answers(request)
    for bad in (b"", b"\0\x01\x02", p.encode_init(0, 1024), p.encode_init(1, 511)):
        with pytest.raises(p.FastbootProtocolError):
            p.parse_init(bad)
    with pytest.raises(p.FastbootProtocolError):
        p.parse_query(b"\x01")
    with pytest.raises(p.FastbootProtocolError):
        p.decode_packet(b"\x03\x00")
    with pytest.raises(p.FastbootProtocolError):
        p.UdpPacket(1, 0, 1 << 16).encode()


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
def test_split_payload(data: bytes, max_data: int) -> None:
    pieces = list(p.split_payload(data, max_data))
    assert b"".join(bytes(piece) for _, piece in pieces) == data
    assert all(len(piece) <= max_data for _, piece in pieces)
    assert [flags for flags, _ in pieces] == [1] * (len(pieces) - 1) + [0]


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_fuzz_decoders_raise_only_typed_errors(data: bytes) -> None:
    decoders = (
        p.parse_response,
        p.parse_command,
        p.decode_packet,
        p.parse_handshake,
        p.parse_init,
        p.parse_query,
        lambda d: p.FrameDecoder(max_frame=256).feed(d),
        lambda d: p.parse_fetch_arg(d.decode("latin-1")),
        lambda d: p.parse_number(d.decode("latin-1"), "x"),
        lambda d: p.parse_var_line(d.decode("latin-1")),
    )
    for decode in decoders:
        with contextlib.suppress(TransportError):
            decode(data)
