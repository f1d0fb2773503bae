"""A guest's Ethernet for tests: QEMU's ``-netdev dgram`` over unix sockets, with a small IPv4
host on the other end that forwards UDP to 127.0.0.1.

QEMU sends each Ethernet frame of the guest's NIC as one datagram to a unix socket this module
owns, and takes frames from its own unix socket. :class:`GuestNet` plays one host on that wire
(``HOST_IP``, a made-up MAC): it answers ARP and ping for it, and forwards UDP that the guest
sends to it to the same port on 127.0.0.1 (port 69 to the port of the TFTP server under test),
like a one-host NAT: each guest port gets its own local socket, so a TFTP server's session
ports (its transfer IDs) reach the guest unchanged. Nothing leaves the test: the guest sees one
host, and the host side is 127.0.0.1 only.

``loss`` drops that fraction of UDP frames in both directions (seeded, repeatable).
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
from contextlib import suppress
from pathlib import Path

HOST_IP = "10.0.2.2"
GUEST_IP = "10.0.2.15"
HOST_MAC = bytes.fromhex("525400ab0001")
_ARP = 0x0806
_IPV4 = 0x0800
_UDP = 17
_ICMP = 1


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class GuestNet:
    """The host end of a QEMU dgram netdev (see the module's docstring)."""

    def __init__(
        self,
        sockdir: Path,
        *,
        port_map: dict[int, int] | None = None,
        loss: float = 0.0,
        seed: int = 1,
    ) -> None:
        self.host_path = sockdir / "net-host"
        self.qemu_path = sockdir / "net-qemu"
        self.port_map = dict(port_map or {})
        self.loss = loss
        self._rng = random.Random(seed)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.host_path))
        self._sock.setblocking(False)
        # Sends block (briefly) when QEMU's queue is full: a unix datagram queue holds only
        # net.unix.max_dgram_qlen (10) frames, fewer than a TFTP window.
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.settimeout(2.0)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        #: guest (ip, port) -> local socket, and back.
        self._nat: dict[tuple[bytes, int], socket.socket] = {}
        self._guest_mac: bytes | None = None
        self._ip_id = 0
        self._stop = threading.Event()
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name="guest-net", daemon=True)
        self._thread.start()

    def qemu_args(self, device: str = "virtio-net-device") -> list[str]:
        return [
            "-netdev",
            f"dgram,id=n0,local.type=unix,local.path={self.qemu_path},"
            f"remote.type=unix,remote.path={self.host_path}",
            "-device",
            f"{device},netdev=n0,mac=52:54:00:12:34:56",
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in [self._sock, self._out, *self._nat.values()]:
            with suppress(OSError):
                s.close()
        self._sel.close()

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.1):
                if key.data is None:
                    self._from_guest()
                else:
                    self._from_host(key.fileobj, key.data)  # type: ignore[arg-type]

    def _drop(self) -> bool:
        if self.loss and self._rng.random() < self.loss:
            self.dropped += 1
            return True
        return False

    def _send_frame(self, frame: bytes) -> None:
        self.frames_out += 1
        with suppress(OSError):
            self._out.sendto(frame, str(self.qemu_path))

    def _from_guest(self) -> None:
        try:
            frame = self._sock.recv(65536)
        except BlockingIOError:
            return
        self.frames_in += 1
        if len(frame) < 14:
            return
        dst, src, ethertype = frame[:6], frame[6:12], int.from_bytes(frame[12:14], "big")
        self._guest_mac = src
        if ethertype == _ARP:
            self._arp(frame[14:], src)
        elif ethertype == _IPV4 and dst in (HOST_MAC, b"\xff" * 6):
            self._ipv4(frame[14:])

    def _arp(self, arp: bytes, src_mac: bytes) -> None:
        if len(arp) < 28 or int.from_bytes(arp[6:8], "big") != 1:
            return
        sender_ip, target_ip = arp[14:18], arp[24:28]
        if target_ip != socket.inet_aton(HOST_IP):
            return
        reply = (
            struct.pack("!HHBBH", 1, _IPV4, 6, 4, 2) + HOST_MAC + target_ip + arp[8:14] + sender_ip
        )
        self._send_frame(src_mac + HOST_MAC + struct.pack("!H", _ARP) + reply)

    def _ipv4(self, packet: bytes) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return
        ihl = (packet[0] & 0xF) * 4
        total = int.from_bytes(packet[2:4], "big")
        proto, src, dst = packet[9], packet[12:16], packet[16:20]
        if dst != socket.inet_aton(HOST_IP) or int.from_bytes(packet[6:8], "big") & 0x3FFF:
            return  # not for us, or a fragment (U-Boot sends none at blksize <= 1468)
        body = packet[ihl:total]
        if proto == _ICMP and len(body) >= 8 and body[0] == 8:
            echo = b"\0\0" + body[2:4] + body[4:]
            echo = echo[:2] + struct.pack("!H", _checksum(b"\0\0\0\0" + echo[4:])) + echo[4:]
            self._send_ip(src, _ICMP, echo)
        elif proto == _UDP and len(body) >= 8:
            sport, dport, length = struct.unpack("!HHH", body[:6])
            if self._drop():
                return
            key = (src, sport)
            sock = self._nat.get(key)
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
                self._nat[key] = sock
                self._sel.register(sock, selectors.EVENT_READ, key)
            with suppress(OSError):
                sock.sendto(body[8:length], ("127.0.0.1", self.port_map.get(dport, dport)))

    def _from_host(self, sock: socket.socket, key: tuple[bytes, int]) -> None:
        try:
            data, (_, sport) = sock.recvfrom(65536)
        except (BlockingIOError, OSError):
            return
        if self._drop():
            return
        back = {v: k for k, v in self.port_map.items()}
        sport = back.get(sport, sport)
        guest_ip, guest_port = key
        udp = struct.pack("!HHHH", sport, guest_port, 8 + len(data), 0) + data
        pseudo = socket.inet_aton(HOST_IP) + guest_ip + struct.pack("!BBH", 0, _UDP, len(udp))
        csum = _checksum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        self._send_ip(guest_ip, _UDP, udp)

    def _send_ip(self, dst_ip: bytes, proto: int, body: bytes) -> None:
        if self._guest_mac is None:
            return
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(body),
            self._ip_id,
            0x4000,
            64,
            proto,
            0,
            socket.inet_aton(HOST_IP),
            dst_ip,
        )
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        self._send_frame(self._guest_mac + HOST_MAC + struct.pack("!H", _IPV4) + header + body)
