"""The sim protocol codec: round trips, incremental decoding, bounds, fuzzing."""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import TransportError
from unbrick.transports import simproto as sp

pytestmark = pytest.mark.unit

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_headers = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in ("len", "crc")), _json, max_size=6
)


@given(header=_headers, payload=st.binary(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_frame_round_trip(header: dict[str, Any], payload: bytes) -> None:
    frame = sp.decode_frame(sp.encode_frame(header, payload))
    assert frame.header == header
    assert frame.payload == payload


@given(
    frames=st.lists(st.tuples(_headers, st.binary(max_size=500)), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
)
@settings(max_examples=150, deadline=None)
def test_incremental_decoding_in_any_pieces(
    frames: list[tuple[dict[str, Any], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(sp.encode_frame(h, p) for h, p in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = sp.FrameDecoder()
    got: list[sp.Frame] = []
    for a, b in itertools.pairwise(points):
        got += decoder.feed(stream[a:b])
    assert [(f.header, f.payload) for f in got] == frames
    assert decoder.buffered == 0


def test_a_corrupt_payload_is_detected_and_the_stream_stays_in_step() -> None:
    first = bytearray(sp.encode_frame({"id": 1}, b"payload bytes"))
    first[-3] ^= 0x20
    second = sp.encode_frame({"id": 2}, b"fine")
    decoder = sp.FrameDecoder()
    with pytest.raises(sp.ProtocolError, match="CRC mismatch") as info:
        decoder.feed(bytes(first) + second)
    assert info.value.recoverable
    assert isinstance(info.value, TransportError)
    assert decoder.feed(b"")[0].header == {"id": 2}


def test_good_frames_before_an_error_are_returned_first() -> None:
    good = sp.encode_frame({"id": 1}, b"ok")
    decoder = sp.FrameDecoder()
    frames = decoder.feed(good + b"\x00\x00\x00\x00")
    assert [f.header for f in frames] == [{"id": 1}]
    with pytest.raises(sp.ProtocolError, match="out of bounds"):
        decoder.feed(b"")
    with pytest.raises(sp.ProtocolError, match="out of step"):
        decoder.feed(good)


def _raw(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(header)) + header + payload


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack(">I", sp.MAX_HEADER_BYTES + 1), "out of bounds"),
        (struct.pack(">I", 0), "out of bounds"),
        (_raw(b"[1, 2]"), "not a JSON object"),
        (_raw(b"\xff\xfe"), "not UTF-8 JSON"),
        (_raw(b'{"len": NaN, "crc": 0}'), "not UTF-8 JSON"),
        (_raw(b"[" * 5000 + b"]" * 5000), "not UTF-8 JSON"),
        (_raw(b'{"len": -1, "crc": 0}'), "bad payload length"),
        (_raw(b'{"len": true, "crc": 0}'), "bad payload length"),
        (_raw(json.dumps({"len": sp.MAX_PAYLOAD_BYTES + 1, "crc": 0}).encode()), "payload length"),
        (_raw(b'{"len": 0, "crc": 4294967296}'), "bad payload CRC"),
        (_raw(b'{"len": 0}'), "bad payload CRC"),
    ],
)
def test_malformed_frames_are_typed_errors(data: bytes, message: str) -> None:
    with pytest.raises(sp.ProtocolError, match=message):
        sp.FrameDecoder().feed(data)


def test_encoder_bounds() -> None:
    with pytest.raises(sp.ProtocolError, match="must not set"):
        sp.encode_frame({"len": 1})
    with pytest.raises(sp.ProtocolError, match="exceeds"):
        sp.encode_frame({}, bytes(sp.MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(sp.ProtocolError, match="exceeds"):
        sp.encode_frame({"x": "a" * sp.MAX_HEADER_BYTES})
    with pytest.raises(sp.ProtocolError, match="cannot be encoded"):
        sp.encode_frame({"x": float("nan")})
    with pytest.raises(sp.ProtocolError, match="expected one complete frame"):
        sp.decode_frame(sp.encode_frame({}) * 2)


# -- requests and responses ---------------------------------------------------------------------

_requests = st.one_of(
    st.builds(sp.Request, st.just("hello"), st.integers(0, 2**40), st.just({"version": 1})),
    st.builds(
        sp.Request,
        st.sampled_from(["read", "erase"]),
        st.integers(0, 2**40),
        st.fixed_dictionaries({"offset": st.integers(0, 2**40), "length": st.integers(0, 2**30)}),
    ),
    st.builds(
        sp.Request,
        st.just("program"),
        st.integers(0, 2**40),
        st.fixed_dictionaries({"offset": st.integers(0, 2**40)}),
        st.binary(max_size=300),
    ),
    st.builds(
        sp.Request,
        st.just("hash"),
        st.integers(0, 2**40),
        st.fixed_dictionaries(
            {"offset": st.integers(0, 99), "length": st.integers(0, 99)},
            optional={"algorithm": st.sampled_from(["sha256", "md5"])},
        ),
    ),
    st.builds(
        sp.Request,
        st.sampled_from(["set_trial", "commit"]),
        st.integers(0, 9),
        st.fixed_dictionaries({"slot": st.text(max_size=3)}),
    ),
    st.builds(
        sp.Request,
        st.sampled_from(["identify", "state", "bootlog", "reboot", "enter_recovery", "chip"]),
        st.integers(0, 2**40),
    ),
)


@given(_requests)
@settings(max_examples=200, deadline=None)
def test_request_round_trip(req: sp.Request) -> None:
    assert sp.decode_request(sp.decode_frame(sp.encode_request(req))) == req


@given(
    rid=st.integers(0, 2**40),
    ok=st.booleans(),
    fields=_headers.map(
        lambda d: {k: v for k, v in d.items() if k not in ("id", "ok", "error", "hint")}
    ),
    payload=st.binary(max_size=300),
    error=st.text(max_size=30),
    hint=st.one_of(st.none(), st.text(min_size=1, max_size=30)),
)
@settings(max_examples=150, deadline=None)
def test_response_round_trip(
    rid: int, ok: bool, fields: dict[str, Any], payload: bytes, error: str, hint: str | None
) -> None:
    resp = sp.Response(rid, ok, fields, payload, None if ok else error, None if ok else hint)
    back = sp.decode_response(sp.decode_frame(sp.encode_response(resp)))
    want_error = None if ok else (error or "request failed")
    assert back == sp.Response(rid, ok, fields, payload, want_error, None if ok else hint)


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        ({"op": "format_disk", "id": 1}, b"", "unknown op"),
        ({"op": "read", "id": 1, "offset": 0}, b"", "needs length"),
        ({"op": "read", "id": 1, "offset": True, "length": 1}, b"", "non-negative integer"),
        ({"op": "read", "id": 1, "offset": -5, "length": 1}, b"", "non-negative integer"),
        ({"op": "read", "id": 1, "offset": 0, "length": 1, "x": 1}, b"", "no argument 'x'"),
        ({"op": "commit", "id": 1, "slot": 3}, b"", "must be a string"),
        ({"op": "erase", "id": 1, "offset": 0, "length": 1}, b"data", "carries no payload"),
        ({"id": 1}, b"", "no op"),
        ({"op": "state", "id": "7"}, b"", "no valid id"),
    ],
)
def test_malformed_requests_are_refused(
    header: dict[str, Any], payload: bytes, message: str
) -> None:
    with pytest.raises(sp.ProtocolError, match=message):
        sp.decode_request(sp.Frame(header, payload))


def test_malformed_responses_are_refused() -> None:
    for header, message in (
        ({"ok": True}, "no valid id"),
        ({"id": 1}, "no ok flag"),
        ({"id": 1, "ok": False, "error": 5}, "error is not a string"),
    ):
        with pytest.raises(sp.ProtocolError, match=message):
            sp.decode_response(sp.Frame(header))
    assert sp.request_id(sp.Frame({"id": 4, "op": "?"})) == 4
    assert sp.request_id(sp.Frame({"id": -4})) is None


# -- fuzzing ---------------------------------------------------------------------------------


def _decode_everything(data: bytes) -> None:
    decoder = sp.FrameDecoder()
    try:
        for frame in decoder.feed(data):
            for decode in (sp.decode_request, sp.decode_response):
                with contextlib.suppress(sp.ProtocolError):
                    decode(frame)
    except sp.ProtocolError:
        pass


@given(st.binary(max_size=600))
@settings(max_examples=500, deadline=None)
def test_random_bytes_give_frames_or_typed_errors(data: bytes) -> None:
    _decode_everything(data)


@given(
    req=_requests,
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), min_size=1, max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_mutated_frames_give_frames_or_typed_errors(
    req: sp.Request, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(sp.encode_request(req))
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    _decode_everything(bytes(data))


def test_payload_crc_is_crc32() -> None:
    frame = sp.encode_frame({"id": 1}, b"abc")
    (hlen,) = struct.unpack(">I", frame[:4])
    header = json.loads(frame[4 : 4 + hlen])
    assert header["len"] == 3 and header["crc"] == zlib.crc32(b"abc")
