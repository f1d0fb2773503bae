"""A simulated serial line between two XMODEM/YMODEM machines, on a virtual clock.

Each direction delivers bytes in order after a latency, spread over time at a byte rate, and
can lose, corrupt or add bytes. The loop calls each machine's ``receive`` with what arrived and
``timeout`` at its deadline, exactly as the real driver does, so a round trip exercises the
machines' retry and timeout decisions without real time passing.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Protocol

from unbrick.errors import TransportError
from unbrick.transports.xymodem import Action, Event


class Machine(Protocol):
    def start(self, now_s: float) -> Action: ...
    def receive(self, data: bytes, now_s: float) -> Action: ...
    def timeout(self, now_s: float) -> Action: ...


#: One-byte answers that no check protects: noise that forges them (an ACK that was a NAK, an
#: EOT out of nowhere) defeats XMODEM by design, so the noise model does not produce them.
UNPROTECTED = frozenset((0x04, 0x06, 0x15, 0x18, 0x43))


def _garbage(rng: random.Random) -> int:
    while True:
        b = rng.randrange(256)
        if b not in UNPROTECTED:
            return b


@dataclass
class LineFaults:
    """Per chunk sent: probability to lose it (whole or a slice), flip a byte, add noise."""

    drop: float = 0.0
    corrupt: float = 0.0
    noise: float = 0.0
    #: Lose every chunk from this one on (index of the chunk; None: never).
    dead_after: int | None = None


@dataclass
class Line:
    rng: random.Random
    faults: LineFaults
    latency_s: float = 0.002
    bytes_per_s: float = 11520.0
    busy_until: float = 0.0
    sent_chunks: int = 0
    log: list[bytes] = field(default_factory=list)

    def transmit(self, data: bytes, now_s: float) -> list[tuple[float, bytes]]:
        """The pieces of ``data`` and when each arrives."""
        self.sent_chunks += 1
        self.log.append(data)
        f = self.faults
        if f.dead_after is not None and self.sent_chunks > f.dead_after:
            return []
        buf = bytearray(data)
        rng = self.rng
        if f.drop and rng.random() < f.drop:
            if rng.random() < 0.5 or len(buf) < 2:
                buf.clear()
            else:
                a = rng.randrange(len(buf))
                b = rng.randrange(a, len(buf)) + 1
                del buf[a:b]
        if buf and f.corrupt and rng.random() < f.corrupt:
            i = rng.randrange(len(buf))
            if len(buf) <= 2:
                buf[i] = _garbage(rng)  # never forge a one-byte answer (see _garbage)
            else:
                buf[i] ^= rng.randrange(1, 256)
        if f.noise and rng.random() < f.noise:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(_garbage(rng) for _ in range(rng.randrange(1, 8)))
        start = max(now_s, self.busy_until)
        pieces: list[tuple[float, bytes]] = []
        pos = 0
        while pos < len(buf):
            size = rng.choice((1, 7, 64, 300, 2000))
            piece = bytes(buf[pos : pos + size])
            pos += len(piece)
            pieces.append((start + self.latency_s + pos / self.bytes_per_s, piece))
        self.busy_until = start + len(buf) / self.bytes_per_s
        return pieces


@dataclass
class End:
    name: str
    machine: Machine
    action: Action | None = None
    inbox: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)
    error: TransportError | None = None
    finished: bool = False
    calls: int = 0


@dataclass
class Outcome:
    sender: End
    receiver: End
    time_s: float
    steps: int


def run(
    sender: Machine,
    receiver: Machine,
    *,
    seed: int = 0,
    to_receiver: LineFaults | None = None,
    to_sender: LineFaults | None = None,
    receiver_starts_at_s: float = 0.0,
    max_time_s: float = 10_000.0,
    max_steps: int = 2_000_000,
) -> Outcome:
    """Run both machines to the end; an exception other than via ``Action.error`` propagates."""
    rng = random.Random(seed)
    lines = {
        "sender": Line(random.Random(rng.random()), to_receiver or LineFaults()),
        "receiver": Line(random.Random(rng.random()), to_sender or LineFaults()),
    }
    ends = {"sender": End("sender", sender), "receiver": End("receiver", receiver)}
    peer = {"sender": "receiver", "receiver": "sender"}
    queue: list[tuple[float, int, str, bytes]] = []  # (time, seq, destination, bytes)
    seq = 0

    def handle(end: End, action: Action, now: float) -> None:
        nonlocal seq
        end.action = action
        end.calls += 1
        if action.flush_input:
            end.inbox.clear()
        end.events.extend(action.events)
        if action.send:
            for at, piece in lines[end.name].transmit(action.send, now):
                seq += 1
                heapq.heappush(queue, (at, seq, peer[end.name], piece))
        if action.error is not None:
            assert isinstance(action.error, TransportError)
            end.error = action.error
        if action.deadline_s is None:
            end.finished = True
        else:
            assert action.deadline_s >= now - 1e-9, "a deadline in the past"

    now = 0.0
    handle(ends["sender"], sender.start(now), now)
    receiver_started = False
    steps = 0
    while steps < max_steps:
        steps += 1
        if not receiver_started and now >= receiver_starts_at_s:
            receiver_started = True
            handle(ends["receiver"], receiver.start(now), now)
        if all(e.finished for e in ends.values()):
            break
        times = [queue[0][0]] if queue else []
        for e in ends.values():
            if not e.finished and e.action is not None and e.action.deadline_s is not None:
                times.append(e.action.deadline_s)
        if not receiver_started:
            times.append(receiver_starts_at_s)
        if not times:
            break
        now = max(now, min(times))
        if now > max_time_s:
            break
        while queue and queue[0][0] <= now:
            _, _, dest, piece = heapq.heappop(queue)
            end = ends[dest]
            if not end.finished and (dest == "sender" or receiver_started):
                end.inbox += piece
        for e in ends.values():
            if e.finished or e.action is None:
                continue
            if e.inbox:
                data = bytes(e.inbox)
                e.inbox.clear()
                handle(e, e.machine.receive(data, now), now)
            elif e.action.deadline_s is not None and now >= e.action.deadline_s:
                handle(e, e.machine.timeout(now), now)
    return Outcome(ends["sender"], ends["receiver"], now, steps)
