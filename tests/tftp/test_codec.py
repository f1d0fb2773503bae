"""The pure TFTP codec: round trips, bounds, negotiation rules, netascii, and fuzzing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.transports.tftp.codec import (
    MAX_BLKSIZE,
    Ack,
    Data,
    Error,
    ErrorCode,
    MalformedPacket,
    NetasciiDecoder,
    Opcode,
    OptionAck,
    OptionError,
    Request,
    ServerLimits,
    accept_oack,
    decode,
    encode,
    negotiate,
    netascii_encode,
    netascii_size,
    request_options,
)

pytestmark = pytest.mark.unit

# Names and values as real peers send them: printable ASCII without NUL.
text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)
blocks = st.integers(0, 0xFFFF)


def options_strategy() -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    names = st.lists(text.map(str.lower), unique=True, max_size=6)
    return names.flatmap(lambda ns: st.tuples(*[st.tuples(st.just(n), text) for n in ns]))


@given(block=blocks, data=st.binary(max_size=2048))
def test_data_round_trip(block: int, data: bytes) -> None:
    assert decode(encode(Data(block, data))) == Data(block, data)


@given(block=blocks)
def test_ack_round_trip(block: int) -> None:
    wire = encode(Ack(block))
    assert len(wire) == 4
    assert decode(wire) == Ack(block)


@given(code=st.integers(0, 8), message=st.text(max_size=100).filter(lambda t: "\0" not in t))
def test_error_round_trip(code: int, message: str) -> None:
    assert decode(encode(Error(code, message))) == Error(code, message)


@given(
    opcode=st.sampled_from([Opcode.RRQ, Opcode.WRQ]),
    filename=text,
    mode=st.sampled_from(["octet", "netascii"]),
    options=options_strategy(),
)
def test_request_round_trip(
    opcode: Opcode, filename: str, mode: str, options: tuple[tuple[str, str], ...]
) -> None:
    request = Request(opcode, filename, mode, options)
    assert decode(encode(request)) == request


@given(options=options_strategy())
def test_oack_round_trip(options: tuple[tuple[str, str], ...]) -> None:
    assert decode(encode(OptionAck(options))) == OptionAck(options)


def test_wire_format_of_a_request_matches_rfc_1350_and_2347() -> None:
    wire = encode(Request(Opcode.RRQ, "u-boot.bin", "octet", (("blksize", "1468"),)))
    assert wire == b"\0\1u-boot.bin\0octet\0blksize\0" + b"1468\0"
    assert encode(Data(0xFFFF, b"ab")) == b"\0\3\xff\xffab"
    assert encode(Error(2, "no")) == b"\0\5\0\2no\0"


def test_request_names_and_mode_are_case_insensitive() -> None:
    packet = decode(b"\0\2File.BIN\0OCTET\0BlkSize\0" + b"1024\0TSIZE\0" + b"9\0")
    assert packet == Request(Opcode.WRQ, "File.BIN", "octet", (("blksize", "1024"), ("tsize", "9")))


def test_trailing_padding_and_a_dangling_option_name_are_ignored() -> None:
    assert decode(b"\0\1f\0octet\0\0\0") == Request(Opcode.RRQ, "f", "octet")
    assert decode(b"\0\1f\0octet\0blksize\0") == Request(Opcode.RRQ, "f", "octet")


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"", "too short"),
        (b"\0", "too short"),
        (b"\0\x09abc", "unknown TFTP opcode"),
        (b"\0\4\0", "ACK packet of 3"),
        (b"\0\4\0\1\0", "ACK packet of 5"),
        (b"\0\3\0", "without a block"),
        (b"\0\1file\0octet", "NUL"),
        (b"\0\1file\0", "file name and a mode"),
        (b"\0\1\0octet\0", "empty file name"),
        (b"\0\1f\0binary\0", "unknown mode"),
        (b"\0\1f\xff\0octet\0", "UTF-8"),
        (b"\0\1f\0octet\0blksize\0" + b"1\0BLKSIZE\0" + b"2\0", "twice"),
        (b"\0\1" + b"a" * 1100 + b"\0octet\0", "request of"),
        (b"\0\6" + b"x\0" * 40, "more than"),
        (b"\0\3\0\1" + bytes(MAX_BLKSIZE + 1), "packet of"),
    ],
)
def test_malformed_packets_are_refused_with_a_reason(wire: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket, match=reason):
        decode(wire)


def test_encode_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(MalformedPacket):
        encode(Data(0x10000, b""))
    with pytest.raises(MalformedPacket):
        encode(Request(Opcode.RRQ, "a\0b"))
    with pytest.raises(MalformedPacket):
        encode(Data(1, bytes(MAX_BLKSIZE + 1)))


@settings(max_examples=2000)
@given(st.binary(max_size=1200))
def test_fuzz_decode_raises_only_malformed_packet(wire: bytes) -> None:
    try:
        packet = decode(wire)
    except MalformedPacket:
        return
    # Whatever decodes re-encodes to a datagram that decodes the same (up to padding).
    if isinstance(packet, Error):
        assert decode(encode(packet)).code == packet.code  # type: ignore[union-attr]
    else:
        assert decode(encode(packet)) == packet


@settings(max_examples=500)
@given(
    opcode=st.sampled_from([b"\0\1", b"\0\2", b"\0\6"]),
    fields=st.lists(st.binary(max_size=12).filter(lambda b: b"\0" not in b), max_size=12),
)
def test_fuzz_structured_requests(opcode: bytes, fields: list[bytes]) -> None:
    wire = opcode + b"".join(f + b"\0" for f in fields)
    try:
        packet = decode(wire)
    except MalformedPacket:
        return
    assert isinstance(packet, Request | OptionAck)
    assert decode(encode(packet)) == packet


def request(*options: tuple[str, str], read: bool = True) -> Request:
    return Request(Opcode.RRQ if read else Opcode.WRQ, "f", "octet", options)


def test_negotiation_grants_what_is_asked_within_limits() -> None:
    asked = request(("blksize", "1468"), ("tsize", "0"), ("timeout", "3"), ("windowsize", "8"))
    n = negotiate(asked, file_size=12345, limits=ServerLimits())
    assert n.oack == (
        ("blksize", "1468"),
        ("tsize", "12345"),
        ("timeout", "3"),
        ("windowsize", "8"),
    )
    assert (n.options.blksize, n.options.windowsize, n.options.timeout_s) == (1468, 8, 3)
    assert n.options.tsize == 12345
    assert n.error is None


def test_negotiation_lowers_blksize_and_windowsize_to_the_server_limits() -> None:
    limits = ServerLimits(blksize_max=1024, windowsize_max=4, window_bytes_max=0)
    n = negotiate(request(("blksize", "65464"), ("windowsize", "64")), file_size=1, limits=limits)
    assert n.oack == (("blksize", "1024"), ("windowsize", "4"))


def test_window_is_cut_to_the_byte_budget() -> None:
    limits = ServerLimits(window_bytes_max=64 * 1024)
    n = negotiate(request(("blksize", "8192"), ("windowsize", "64")), file_size=1, limits=limits)
    assert n.options.windowsize == 8
    assert dict(n.oack)["windowsize"] == "8"
    n = negotiate(request(("blksize", "65464"), ("windowsize", "16")), file_size=1, limits=limits)
    assert n.options.windowsize == 1


@pytest.mark.parametrize(
    "option",
    [
        ("blksize", "7"),
        ("blksize", "65465"),
        ("blksize", "-512"),
        ("blksize", " 512"),
        ("blksize", "0x200"),
        ("timeout", "0"),
        ("timeout", "256"),
        ("windowsize", "0"),
        ("windowsize", "65536"),
        ("tsize", "-1"),
        ("tsize", "9" * 30),
        ("multicast", ""),
        ("rollover", "0"),
    ],
)
def test_invalid_values_and_unknown_options_are_ignored(option: tuple[str, str]) -> None:
    n = negotiate(request(option), file_size=10, limits=ServerLimits())
    assert n.oack == ()
    assert n.options.blksize == 512
    assert n.options.windowsize == 1


def test_tsize_of_a_write_over_the_upload_limit_is_an_error_3() -> None:
    limits = ServerLimits(max_upload_bytes=1000)
    n = negotiate(request(("tsize", "1001"), read=False), file_size=None, limits=limits)
    assert n.error is not None
    assert n.error.code == ErrorCode.DISK_FULL
    ok = negotiate(request(("tsize", "1000"), read=False), file_size=None, limits=limits)
    assert ok.oack == (("tsize", "1000"),)
    assert ok.options.tsize == 1000


def test_tsize_of_a_read_is_omitted_when_the_size_is_unknown() -> None:
    assert negotiate(request(("tsize", "0")), file_size=None, limits=ServerLimits()).oack == ()


def test_client_asks_only_for_non_default_options() -> None:
    assert request_options(blksize=512, windowsize=1, timeout_s=None, tsize=None) == ()
    assert request_options(blksize=1468, windowsize=16, timeout_s=2, tsize=0) == (
        ("blksize", "1468"),
        ("timeout", "2"),
        ("tsize", "0"),
        ("windowsize", "16"),
    )
    with pytest.raises(OptionError):
        request_options(blksize=7, windowsize=1, timeout_s=None, tsize=None)
    with pytest.raises(OptionError):
        request_options(blksize=512, windowsize=0, timeout_s=None, tsize=None)


def test_client_accepts_lowered_values_and_refuses_raised_or_unasked_ones() -> None:
    asked = (("blksize", "1468"), ("windowsize", "16"), ("tsize", "0"), ("timeout", "2"))
    got = accept_oack(
        OptionAck((("blksize", "1024"), ("windowsize", "4"), ("tsize", "99"), ("timeout", "2"))),
        asked,
        is_read=True,
    )
    assert (got.blksize, got.windowsize, got.tsize, got.timeout_s) == (1024, 4, 99, 2)
    for bad in (
        (("blksize", "2048"),),
        (("windowsize", "17"),),
        (("timeout", "3"),),
        (("tsize", "x"),),
        (("rollover", "0"),),
    ):
        with pytest.raises(OptionError):
            accept_oack(OptionAck(bad), asked, is_read=True)
    with pytest.raises(OptionError, match="tsize"):
        accept_oack(OptionAck((("tsize", "5"),)), (("tsize", "6"),), is_read=False)


def test_netascii_encoding() -> None:
    assert netascii_encode(b"a\nb\rc\r\n") == b"a\r\nb\r\0c\r\0\r\n"
    assert netascii_size(b"a\nb\rc\r\n") == len(netascii_encode(b"a\nb\rc\r\n"))


@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_netascii_round_trip_across_any_block_split(data: bytes, cuts: list[int]) -> None:
    wire = netascii_encode(data)
    decoder = NetasciiDecoder()
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    out = b"".join(decoder.feed(wire[a:b]) for a, b in itertools.pairwise(points))
    assert out + decoder.finish() == data


def test_netascii_decoder_keeps_a_lone_cr() -> None:
    decoder = NetasciiDecoder()
    assert decoder.feed(b"a\rb") + decoder.feed(b"\r") + decoder.finish() == b"a\rb\r"
