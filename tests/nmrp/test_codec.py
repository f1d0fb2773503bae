"""NMRP codec: byte layouts, round trips, fuzzing; the server's transition table; TFTP parsing."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import TransportError, UsageError
from unbrick.sim.nmrp_client import parse_request
from unbrick.transports.nmrp import codec
from unbrick.transports.nmrp.codec import Code, Frame, Message, NmrpProtocolError, Option
from unbrick.transports.nmrp.server import (
    Action,
    NmrpConfig,
    NmrpTimeouts,
    Step,
    transition,
)

pytestmark = pytest.mark.unit

HOST = bytes.fromhex("d6a515e8d5c0")
ROUTER = bytes.fromhex("a42b8c000001")


def test_advertise_layout_matches_what_nmrpflash_sends() -> None:
    # Bytes 14.. of an ADVERTISE frame captured from nmrpflash 0.9.14 on a veth pair.
    captured = bytes.fromhex("00000100000e000100084e544752").ljust(50, b"\0")
    frame = Frame(codec.BROADCAST_MAC, HOST, codec.advertise()).encode(min_bytes=64)
    assert frame[:14] == codec.BROADCAST_MAC + HOST + b"\x09\x12"
    assert frame[14:] == captured
    decoded = codec.decode_frame(frame)
    assert decoded.message.code == Code.ADVERTISE
    assert decoded.message.magic == b"NTGR"


def test_conf_ack_layout() -> None:
    msg = codec.conf_ack("10.164.183.252", "255.255.255.0", region=codec.region_code("na"))
    raw = msg.encode()
    assert raw[:6] == struct.pack(">HBBH", 0, 3, 0, 6 + 12 + 4 + 6)
    opt_type, opt_len = struct.unpack_from(">HH", raw, 6)
    assert (opt_type, opt_len) == (0x0002, 12)
    assert raw[10:18] == bytes([10, 164, 183, 252, 255, 255, 255, 0])
    assert raw[18:22] == bytes.fromhex("01010004")
    assert raw[22:28] == bytes.fromhex("000400060001")
    back = codec.decode_message(raw)
    assert back.dev_ip == ("10.164.183.252", "255.255.255.0")
    assert back.has(codec.OptionType.FW_UP)
    assert back.region == 1
    assert codec.region_name(1) == "NA"


def test_upload_request_with_file_name_and_padding() -> None:
    frame = Frame(HOST, ROUTER, codec.tftp_ul_req("firmware")).encode()
    assert len(frame) == codec.MIN_FRAME_BYTES
    msg = codec.decode_frame(frame).message
    assert msg.code == Code.TFTP_UL_REQ
    assert msg.file_name == "firmware"
    assert codec.decode_message(codec.tftp_ul_req().encode()).file_name is None


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x00\x00\x01", "shorter than its header"),
        (struct.pack(">HBBH", 0, 1, 0, 40), "does not fit"),
        (struct.pack(">HBBH", 0, 1, 0, 5), "does not fit"),
        (struct.pack(">HBBH", 0, 1, 0, 8) + b"\x00\x01", "truncated option"),
        (struct.pack(">HBBHHH", 0, 1, 0, 10, 1, 2), "bad length 2"),
        (struct.pack(">HBBHHH", 0, 1, 0, 10, 1, 9), "bad length 9"),
    ],
)
def test_malformed_messages_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(NmrpProtocolError, match=fragment):
        codec.decode_message(data)


def test_frames_of_other_protocols_and_bad_values() -> None:
    with pytest.raises(NmrpProtocolError, match="not NMRP"):
        codec.decode_frame(b"\xff" * 12 + b"\x08\x00" + b"\0" * 46)
    with pytest.raises(NmrpProtocolError, match="shorter than an Ethernet header"):
        codec.decode_frame(b"\x00" * 10)
    with pytest.raises(NmrpProtocolError, match="not a contiguous netmask"):
        codec.conf_ack("10.0.0.2", "255.0.255.0")
    with pytest.raises(NmrpProtocolError, match="unknown NMRP region"):
        codec.region_code("XX")
    with pytest.raises(NmrpProtocolError, match="not a MAC address"):
        codec.parse_mac("00:11:22:33:44")
    with pytest.raises(NmrpProtocolError, match="DEV_IP option of 3 bytes"):
        _ = Message(Code.CONF_ACK, (Option(codec.OptionType.DEV_IP, b"abc"),)).dev_ip
    assert isinstance(NmrpProtocolError("x"), TransportError)
    assert codec.code_name(0x2A) == "0x2a"
    assert codec.format_mac(codec.parse_mac("A4-2B-8C-00-00-01")) == "a4:2b:8c:00:00:01"


_options = st.lists(
    st.builds(Option, type=st.integers(0, 0xFFFF), value=st.binary(max_size=60)), max_size=8
)
_messages = st.builds(
    Message,
    code=st.integers(0, 0xFF),
    options=_options.map(tuple),
    id=st.integers(0, 0xFF),
    reserved=st.integers(0, 0xFFFF),
)
_macs = st.binary(min_size=6, max_size=6)


@given(msg=_messages, padding=st.integers(0, 64))
@settings(max_examples=300, deadline=None)
def test_message_round_trip(msg: Message, padding: int) -> None:
    raw = msg.encode()
    assert len(raw) == msg.size_bytes
    assert codec.decode_message(raw + b"\0" * padding) == msg


@given(dst=_macs, src=_macs, msg=_messages)
@settings(max_examples=200, deadline=None)
def test_frame_round_trip(dst: bytes, src: bytes, msg: Message) -> None:
    raw = Frame(dst, src, msg).encode()
    assert len(raw) >= codec.MIN_FRAME_BYTES
    assert codec.decode_frame(raw) == Frame(dst, src, msg)


@given(
    ip=st.ip_addresses(v=4).map(str),
    prefix=st.integers(0, 32),
    region=st.none() | st.sampled_from(sorted(codec.REGIONS)),
)
@settings(max_examples=100, deadline=None)
def test_conf_ack_round_trip(ip: str, prefix: int, region: str | None) -> None:
    mask = ".".join(str(b) for b in ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF).to_bytes(4))
    code = codec.region_code(region) if region else None
    msg = codec.decode_message(codec.conf_ack(ip, mask, region=code).encode())
    assert msg.dev_ip == (ip, mask)
    assert codec.netmask_prefix(mask) == prefix
    assert msg.region == code


@given(data=st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_random_bytes_give_typed_errors_only(data: bytes) -> None:
    for decode in (codec.decode_frame, codec.decode_message):
        try:
            result = decode(data)
        except NmrpProtocolError:
            continue
        assert isinstance(result, Frame | Message)
    nmrp = b"\xff" * 12 + b"\x09\x12" + data
    try:
        frame = codec.decode_frame(nmrp)
    except NmrpProtocolError:
        return
    for read in ("magic", "file_name", "dev_ip", "region"):
        with contextlib.suppress(NmrpProtocolError):
            getattr(frame.message, read)


# -- the server's transition table ---------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "code", "next_step", "reply", "action"),
    [
        (Step.ADVERTISE, Code.CONF_REQ, Step.CONFIGURE, Code.CONF_ACK, Action.NONE),
        (Step.ADVERTISE, Code.ADVERTISE, Step.ADVERTISE, None, Action.NONE),
        (Step.CONFIGURE, Code.CONF_REQ, Step.CONFIGURE, Code.CONF_ACK, Action.NONE),
        (Step.CONFIGURE, Code.TFTP_UL_REQ, Step.UPLOAD, None, Action.UPLOAD),
        (Step.CONFIGURE, Code.KEEP_ALIVE_REQ, Step.CONFIGURE, Code.KEEP_ALIVE_ACK, Action.NONE),
        (Step.CONFIGURE, Code.CLOSE_REQ, Step.DONE, Code.CLOSE_ACK, Action.FAIL),
        (Step.FLASH, Code.KEEP_ALIVE_REQ, Step.FLASH, Code.KEEP_ALIVE_ACK, Action.NONE),
        (Step.FLASH, Code.CLOSE_REQ, Step.DONE, Code.CLOSE_ACK, Action.DONE),
        (Step.FLASH, Code.TFTP_UL_REQ, Step.UPLOAD, None, Action.UPLOAD),
        (Step.FLASH, Code.CONF_REQ, Step.CONFIGURE, Code.CONF_ACK, Action.NONE),
        (Step.FLASH, 0x42, Step.FLASH, None, Action.NONE),
        (Step.DONE, Code.CLOSE_REQ, Step.DONE, None, Action.NONE),
    ],
)
def test_transition(
    step: Step, code: int, next_step: Step, reply: Code | None, action: Action
) -> None:
    decision = transition(step, code)
    assert (decision.step, decision.reply, decision.action) == (next_step, reply, action)


def test_config_checks() -> None:
    image = Path("fw.bin")
    NmrpConfig("eth0", image).check()
    with pytest.raises(UsageError, match="share the subnet"):
        NmrpConfig("eth0", image, router_ip="10.0.0.2", host_ip="10.0.1.2").check()
    with pytest.raises(UsageError, match="must differ"):
        NmrpConfig("eth0", image, router_ip="10.0.0.2", host_ip="10.0.0.2").check()
    with pytest.raises(UsageError, match="unknown NMRP region"):
        NmrpConfig("eth0", image, region="Mars").check()
    with pytest.raises(UsageError, match="windowsize"):
        NmrpConfig("eth0", image, windowsize=0).check()
    with pytest.raises(UsageError, match="must be positive"):
        NmrpTimeouts(advertise_s=0)


# -- the sim's TFTP request parser ---------------------------------------------------------


def test_parse_write_request() -> None:
    req = b"\x00\x02fw.img\x00octet\x00blksize\x001456\x00TSIZE\x00100\x00"
    assert parse_request(req) == (2, "fw.img", "octet", {"blksize": "1456", "tsize": "100"})
    # Seen from nmrpflash 0.9.14: a stray string from its packet buffer after the options.
    stray = b"\x00\x02firmware\x00octet\x00blksize\x001456\x00#l\x00"
    assert parse_request(stray) == (2, "firmware", "octet", {"blksize": "1456"})
    garbage = b"\x00\x02fw\x00octet\x00blksize\x00512\x00#\xa2\x00x\x00\xff\x01"
    assert parse_request(garbage) == (2, "fw", "octet", {"blksize": "512"})
    for bad in (
        b"\x00\x02a\x00",
        b"\x00\x03a\x00b\x00",
        b"\x00\x02a\x00octet",
        b"\x00\x02\xe9\x00o\x00",
    ):
        with pytest.raises(ValueError):
            parse_request(bad)


@given(data=st.binary(max_size=100))
@settings(max_examples=300, deadline=None)
def test_parse_request_fuzz(data: bytes) -> None:
    try:
        opcode, _, _, options = parse_request(data)
    except ValueError:
        return
    assert opcode in (1, 2)
    assert all(k == k.lower() for k in options)
