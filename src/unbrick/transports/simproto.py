"""The sim recovery protocol: a pure frame codec (no I/O), shared by the simulator and driver.

A frame is::

    u32 big-endian header length | UTF-8 JSON object (the header) | binary payload

The header carries the payload's length and CRC-32 (``"len"``, ``"crc"``), so a corrupted
payload is detected and the stream stays in step. Requests are ``{"op": ..., "id": n, ...}``,
responses ``{"id": n, "ok": true|false, "error": "...", "hint": "...", ...}``. Every bound is
checked before anything is allocated; anything malformed raises :class:`ProtocolError`.

Ops of the generic face (request arguments -> answer fields; payloads in brackets):

* ``hello`` version -> protocol, face, kind, model, ab, max_transfer, state, boot_id,
  firmware_version, booted_slot
* ``identify`` -> identity (``DeviceIdentity.to_dict()``)
* ``state`` -> state, boot_id, firmware_version, booted_slot
* ``bootlog`` -> the state fields, [the boot log as UTF-8]
* ``read`` offset, length -> [data];  ``erase`` offset, length;  ``program`` offset, [data]
* ``hash`` offset, length, algorithm -> digest, algorithm
* ``reboot`` -> reset (true; the link drops once the answer is sent)
* ``enter_recovery`` -> reset (true when the device had to restart into its bootloader)
* ``boot_state`` -> active_slot, trial_slot, bootcount, bootlimit, extra
* ``set_trial`` slot;  ``commit`` slot

The SPI face (a clip-on programmer on the chip) answers ``hello``, ``chip`` (-> chip,
jedec_id, unique_id, storage), ``read``, ``erase`` and ``program``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from unbrick.errors import TransportError

PROTOCOL_VERSION = 1
PREFIX_BYTES = 4
MAX_HEADER_BYTES = 64 * 1024
#: Largest payload: a 4 MiB transfer plus a margin.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024 + 64 * 1024
MAX_STRING_CHARS = 4096
_MAX_UINT = 1 << 62
_RESERVED = frozenset({"len", "crc"})

#: op -> {argument: (type, required)}; types: "uint", "str".
OP_ARGS: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {"version": ("uint", False), "face": ("str", False)},
    "identify": {},
    "state": {},
    "bootlog": {},
    "read": {"offset": ("uint", True), "length": ("uint", True)},
    "erase": {"offset": ("uint", True), "length": ("uint", True)},
    "program": {"offset": ("uint", True)},
    "hash": {"offset": ("uint", True), "length": ("uint", True), "algorithm": ("str", False)},
    "reboot": {},
    "enter_recovery": {},
    "boot_state": {},
    "set_trial": {"slot": ("str", True)},
    "commit": {"slot": ("str", True)},
    "chip": {},
}
#: Ops whose request carries a payload.
PAYLOAD_OPS = frozenset({"program"})


class ProtocolError(TransportError):
    """A frame could not be decoded (corrupt, truncated, out of bounds, not this protocol)."""

    default_hint = "the link corrupted a frame or the peer does not speak the sim protocol"

    def __init__(self, message: str, *, recoverable: bool = False, hint: str | None = None):
        super().__init__(message, hint=hint)
        #: True when the stream is still in step (only that one frame was bad).
        self.recoverable = recoverable


@dataclass(frozen=True)
class Frame:
    """A decoded frame: the header without its ``len``/``crc`` fields, and the payload."""

    header: dict[str, Any]
    payload: bytes = b""


@dataclass(frozen=True)
class Request:
    op: str
    id: int
    args: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


@dataclass(frozen=True)
class Response:
    id: int
    ok: bool
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""
    error: str | None = None
    hint: str | None = None


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_UINT


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _dump(header: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(dict(header), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"frame header cannot be encoded: {e}") from e
    return text.encode("utf-8")


def encode_frame(header: Mapping[str, Any], payload: bytes = b"") -> bytes:
    """Encode one frame; ``len`` and ``crc`` are added here and must not be in ``header``."""
    if _RESERVED & header.keys():
        raise ProtocolError("frame header must not set 'len' or 'crc' (the codec does)")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    raw = _dump({**header, "len": len(payload), "crc": zlib.crc32(payload)})
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return len(raw).to_bytes(PREFIX_BYTES, "big") + raw + bytes(payload)


def _parse_header(raw: bytes) -> tuple[dict[str, Any], int, int]:
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"frame header is not UTF-8 JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError("frame header is not a JSON object")
    length, crc = obj.pop("len", None), obj.pop("crc", None)
    if not _is_uint(length) or length > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"frame header has a bad payload length {length!r}")
    if not _is_uint(crc) or crc > 0xFFFFFFFF:
        raise ProtocolError(f"frame header has a bad payload CRC {crc!r}")
    return obj, length, crc


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get the complete frames back.

    A payload whose CRC does not match raises a recoverable ProtocolError (the frame is
    dropped, the stream stays in step); any other error leaves the decoder broken (every
    later feed raises), since the stream can no longer be framed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pending: ProtocolError | None = None
        self._broken: ProtocolError | None = None
        self._head: tuple[dict[str, Any], int, int, int] | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken is not None:
            raise ProtocolError(f"stream out of step after an earlier error: {self._broken}")
        if self._pending is not None:
            err, self._pending = self._pending, None
            self._buf += data
            raise err
        self._buf += data
        frames: list[Frame] = []
        while True:
            try:
                frame = self._next()
            except ProtocolError as e:
                if not e.recoverable:
                    self._broken = e
                if frames:
                    self._pending = e
                    return frames
                raise
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buf = self._buf
        if self._head is None:
            if len(buf) < PREFIX_BYTES:
                return None
            hlen = int.from_bytes(buf[:PREFIX_BYTES], "big")
            if hlen == 0 or hlen > MAX_HEADER_BYTES:
                raise ProtocolError(f"frame header length {hlen} is out of bounds")
            if len(buf) < PREFIX_BYTES + hlen:
                return None
            header, plen, crc = _parse_header(bytes(buf[PREFIX_BYTES : PREFIX_BYTES + hlen]))
            self._head = (header, plen, crc, PREFIX_BYTES + hlen)
        header, plen, crc, start = self._head
        if len(buf) < start + plen:
            return None
        payload = bytes(buf[start : start + plen])
        del buf[: start + plen]
        self._head = None
        if zlib.crc32(payload) != crc:
            raise ProtocolError(f"payload CRC mismatch in a {plen}-byte frame", recoverable=True)
        return Frame(header, payload)


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one frame from ``data`` (no bytes missing, none left over)."""
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    if len(frames) != 1 or decoder.buffered:
        raise ProtocolError(
            f"expected one complete frame, got {len(frames)} and {decoder.buffered} bytes more"
        )
    return frames[0]


# -- requests and responses ---------------------------------------------------------------


def _check_args(op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    spec = OP_ARGS.get(op)
    if spec is None:
        raise ProtocolError(f"unknown op {op!r}", hint=f"ops: {', '.join(sorted(OP_ARGS))}")
    out: dict[str, Any] = {}
    for key, value in args.items():
        if key not in spec:
            raise ProtocolError(f"op {op!r} takes no argument {key!r}")
        typ, _ = spec[key]
        if typ == "uint" and not _is_uint(value):
            raise ProtocolError(f"op {op!r}: {key} must be a non-negative integer")
        if typ == "str" and not (isinstance(value, str) and len(value) <= MAX_STRING_CHARS):
            raise ProtocolError(f"op {op!r}: {key} must be a string")
        out[key] = value
    missing = [k for k, (_, required) in spec.items() if required and k not in out]
    if missing:
        raise ProtocolError(f"op {op!r} needs {', '.join(missing)}")
    return out


def encode_request(req: Request) -> bytes:
    args = _check_args(req.op, req.args)
    if req.payload and req.op not in PAYLOAD_OPS:
        raise ProtocolError(f"op {req.op!r} carries no payload")
    if not _is_uint(req.id):
        raise ProtocolError("request id must be a non-negative integer")
    return encode_frame({"op": req.op, "id": req.id, **args}, req.payload)


def decode_request(frame: Frame) -> Request:
    header = dict(frame.header)
    op, rid = header.pop("op", None), header.pop("id", None)
    if not isinstance(op, str):
        raise ProtocolError("request has no op")
    if not _is_uint(rid):
        raise ProtocolError("request has no valid id")
    args = _check_args(op, header)
    if frame.payload and op not in PAYLOAD_OPS:
        raise ProtocolError(f"op {op!r} carries no payload")
    return Request(op=op, id=rid, args=args, payload=frame.payload)


def request_id(frame: Frame) -> int | None:
    """The id of a request frame, if it has a valid one (to answer a malformed request)."""
    rid = frame.header.get("id")
    return rid if _is_uint(rid) else None


def encode_response(resp: Response) -> bytes:
    if not _is_uint(resp.id):
        raise ProtocolError("response id must be a non-negative integer")
    reserved = {"id", "ok", "error", "hint"} & resp.fields.keys()
    if reserved:
        raise ProtocolError(f"response fields must not set {sorted(reserved)}")
    header: dict[str, Any] = {"id": resp.id, "ok": resp.ok, **resp.fields}
    if not resp.ok:
        header["error"] = resp.error or "request failed"
        if resp.hint:
            header["hint"] = resp.hint
    return encode_frame(header, resp.payload)


def decode_response(frame: Frame) -> Response:
    header = dict(frame.header)
    rid, ok = header.pop("id", None), header.pop("ok", None)
    error, hint = header.pop("error", None), header.pop("hint", None)
    if not _is_uint(rid):
        raise ProtocolError("response has no valid id")
    if not isinstance(ok, bool):
        raise ProtocolError("response has no ok flag")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("response error is not a string")
    if hint is not None and not isinstance(hint, str):
        raise ProtocolError("response hint is not a string")
    if not ok and error is None:
        error = "request failed"
    return Response(id=rid, ok=ok, fields=header, payload=frame.payload, error=error, hint=hint)
