"""A model of U-Boot's xyzModem receiver (``loadx``/``loady``), for tests without QEMU.

Written from the behaviour of U-Boot's common/xyzModem.c as documented in
docs/transports/xymodem.md: it opens with one ``C``; waits 2 s for each character; after a
silent header wait it reads until the line has been quiet for 2 s, pauses 0.25 s and sends
``C`` again (``C``, not NAK, is its retransmission request in CRC mode); it ACKs YMODEM block 0
without the ``C`` the protocol asks for; it ACKs the first EOT, then sends ACK and (YMODEM)
``C`` again, reads the final block 0 and ACKs it; it drops trailing 0x1A from a block that ends
in three of them unless block 0 gave a size; three CAN cancel it.
"""

from __future__ import annotations

import enum

from unbrick.transports.xymodem import (
    ACK,
    CAN,
    EOT,
    SOH,
    STX,
    Action,
    crc16_xmodem,
    parse_header,
)

CHAR_TIMEOUT_S = 2.0


class _S(enum.Enum):
    HUNT = 1
    BODY = 2
    FLUSH = 3
    PAUSE = 4
    DONE = 5


class UBootReceiver:
    def __init__(self, ymodem: bool, *, retries: int = 20) -> None:
        self.ymodem = ymodem
        self.retries = retries
        self.state = _S.HUNT
        self.next_blk = 0 if ymodem else 1
        self.in_header = ymodem
        self.final_header = False
        self.file_length = 0
        self.stored = bytearray()
        self.error: str | None = None
        self.cans = 0
        self.hdr_chars = 0
        self.buf = bytearray()
        self.need = 0
        self.deadline = 0.0
        self.tries = 0
        self.c_sent = 0

    @property
    def finished(self) -> bool:
        return self.state is _S.DONE

    def _act(self, send: bytes = b"") -> Action:
        if self.state is _S.DONE:
            return Action(send=send, deadline_s=None)
        return Action(send=send, deadline_s=self.deadline, want_bytes=2048)

    def start(self, now_s: float) -> Action:
        self.deadline = now_s + CHAR_TIMEOUT_S
        self.c_sent += 1
        return self._act(b"C")

    def receive(self, data: bytes, now_s: float) -> Action:
        out = bytearray()
        for byte in data:
            if self.state is _S.DONE:
                break
            if self.state in (_S.FLUSH, _S.PAUSE):
                self.state = _S.FLUSH
                self.deadline = now_s + CHAR_TIMEOUT_S
                continue
            if self.state is _S.BODY:
                self.buf.append(byte)
                self.deadline = now_s + CHAR_TIMEOUT_S
                if len(self.buf) == self.need:
                    out += self._block(now_s)
                continue
            # HUNT: an EOT counts only as the first character of a header hunt
            self.hdr_chars += 1
            if byte in (SOH, STX):
                self.need = 2 + (128 if byte == SOH else 1024) + 2
                self.buf.clear()
                self.state = _S.BODY
                self.deadline = now_s + CHAR_TIMEOUT_S
            elif byte == CAN:
                self.cans += 1
                if self.cans >= 3:
                    self.error = "Cancelled"
                    self.state = _S.DONE
            elif byte == EOT and not self.in_header and self.hdr_chars == 1:
                out += bytes((ACK, ACK))
                if self.ymodem:
                    out += b"C"
                    self.c_sent += 1
                    self.in_header = True
                    self.final_header = True
                    self.deadline = now_s + CHAR_TIMEOUT_S
                else:
                    self.state = _S.DONE
        return self._act(bytes(out))

    def _retry(self, now_s: float) -> bytes:
        self.tries += 1
        if self.tries > self.retries:
            self.error = "Timed out"
            self.state = _S.DONE
            return b""
        self.state = _S.HUNT
        self.hdr_chars = 0
        self.deadline = now_s + CHAR_TIMEOUT_S
        self.c_sent += 1
        return b"C"

    def _block(self, now_s: float) -> bytes:
        buf = self.buf
        size = self.need - 4
        blk, cblk = buf[0], buf[1]
        payload = bytes(buf[2 : 2 + size])
        if blk ^ cblk != 0xFF:
            self.state = _S.FLUSH
            self.deadline = now_s + CHAR_TIMEOUT_S
            return b""
        if crc16_xmodem(payload) != int.from_bytes(buf[2 + size :], "big"):
            return self._retry(now_s)
        self.state = _S.HUNT
        self.hdr_chars = 0
        self.deadline = now_s + CHAR_TIMEOUT_S
        if self.in_header:
            if self.final_header:
                self.state = _S.DONE
                return bytes((ACK,))
            info = parse_header(payload)
            self.file_length = (info.size_bytes or 0) if info else 0
            self.in_header = False
            self.next_blk = 1
            self.tries = 0
            return bytes((ACK,))  # deferred in U-Boot; no C follows
        if blk == self.next_blk:
            self.tries = 0
            self.next_blk = (self.next_blk + 1) & 0xFF
            data = payload
            if (not self.ymodem or self.file_length == 0) and data.endswith(b"\x1a\x1a\x1a"):
                data = data.rstrip(b"\x1a")
            if self.ymodem and self.file_length:
                data = data[: max(self.file_length - len(self.stored), 0)]
            self.stored += data
            return bytes((ACK,))
        if blk == (self.next_blk - 1) & 0xFF:
            return bytes((ACK,))
        return self._retry(now_s)  # sequence error: U-Boot asks again

    def timeout(self, now_s: float) -> Action:
        if self.state is _S.DONE or now_s < self.deadline:
            return self._act()
        if self.state is _S.HUNT and self.final_header:
            # The final header never came: loady still ends (its result is not checked).
            self.state = _S.DONE
            return self._act(bytes((ACK,)))
        if self.state is _S.BODY:
            return self._act(self._retry(now_s))  # mid-block: no flush, C at once
        if self.state is _S.HUNT:
            self.state = _S.FLUSH
            self.deadline = now_s + CHAR_TIMEOUT_S
            return self._act()
        if self.state is _S.FLUSH:
            self.state = _S.PAUSE
            self.deadline = now_s + 0.25
            return self._act()
        return self._act(self._retry(now_s))
