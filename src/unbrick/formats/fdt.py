"""A pure, bounded parser for flattened device trees (DTB/FDT, the container of U-Boot FIT).

Layout (Devicetree Specification, "Flattened Devicetree (DTB) Format"): a big-endian header
(magic ``0xd00dfeed``, total size, offsets and sizes of the structure block, the strings block
and the memory reservation map, version numbers), then the blocks. The structure block is a
linear run of 32-bit tokens: ``FDT_BEGIN_NODE`` (followed by the NUL-terminated node name,
padded to 4 bytes), ``FDT_END_NODE``, ``FDT_PROP`` (value length, offset of the name in the
strings block, value padded to 4 bytes), ``FDT_NOP`` and a final ``FDT_END``.

The walk over the structure block only moves forward, so no input can make it loop. Every
offset and length is checked against its block before use, names must be NUL-terminated within
their block, nesting is bounded, and tokens are counted against ``Limits.max_records``.
Property values are not loaded: each property records where its value lies in the source, so a
FIT whose images are embedded as multi-megabyte ``data`` properties costs a few reads. Small
values are kept inline; larger ones are read on request up to a caller-given bound.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from unbrick.errors import ImageError, LimitError
from unbrick.formats.base import Context, Counter, Source

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE = 0x1
FDT_END_NODE = 0x2
FDT_PROP = 0x3
FDT_NOP = 0x4
FDT_END = 0x9

#: Header size of versions 17+; version 16 lacks the final ``size_dt_struct`` field.
HEADER_SIZE_V17 = 40
HEADER_SIZE_V16 = 36
#: Oldest version whose layout we read (the one that introduced the strings block size is 3,
#: but every tool of the last two decades writes 17 with last_comp_version 16).
MIN_VERSION = 16
#: Deepest node nesting accepted. Real trees are under 10 levels deep.
MAX_DEPTH = 64
#: Longest node or property name read. The specification caps names at 31 characters
#: (plus a unit address for nodes); this is generous.
MAX_NAME = 1024
#: Property values up to this size are kept in memory by the parser.
INLINE_LIMIT = 4096
#: Reservation map entries kept in the result (all are counted and checked).
MAX_KEPT_RESERVATIONS = 256
#: Bounds on the tree kept in memory. Board device trees have a few thousand nodes and FIT
#: images a few dozen; a blob of millions of empty nodes is an attack on memory.
MAX_NODES = 100_000
MAX_PROPERTIES = 500_000
#: Total bytes of property values kept inline; past it values are read on request.
INLINE_BUDGET = 16 * 1024 * 1024
_WINDOW = 64 * 1024


@dataclass(frozen=True)
class FdtHeader:
    totalsize: int
    off_dt_struct: int
    off_dt_strings: int
    off_mem_rsvmap: int
    version: int
    last_comp_version: int
    boot_cpuid_phys: int
    size_dt_strings: int
    #: For version 16 trees (no size field) this is the room up to ``totalsize``.
    size_dt_struct: int


@dataclass
class FdtProperty:
    name: str
    #: Offset of the value in the parsed source (not in the structure block).
    offset: int
    size: int
    #: The value when it is at most ``INLINE_LIMIT`` bytes, else None (see ``Fdt.value``).
    inline: bytes | None


@dataclass
class FdtNode:
    name: str
    path: str
    #: Offset of the node's FDT_BEGIN_NODE token in the source.
    offset: int
    depth: int
    properties: dict[str, FdtProperty] = field(default_factory=dict)
    children: list[FdtNode] = field(default_factory=list)
    _by_name: dict[str, FdtNode] = field(default_factory=dict, repr=False)

    def child(self, name: str) -> FdtNode | None:
        """The first child called ``name`` (full name, unit address included)."""
        return self._by_name.get(name)

    def prop(self, name: str) -> FdtProperty | None:
        return self.properties.get(name)

    def _add_child(self, node: FdtNode) -> None:
        self.children.append(node)
        self._by_name.setdefault(node.name, node)


def _u32(data: bytes, off: int) -> int:
    value: int = struct.unpack_from(">I", data, off)[0]
    return value


def parse_header(data: bytes) -> FdtHeader:
    """Check and decode an FDT header from the first bytes of a tree; raises ImageError."""
    if len(data) < HEADER_SIZE_V16:
        raise ImageError(f"FDT header truncated: {len(data)} bytes, needs {HEADER_SIZE_V16}")
    magic, total, off_struct, off_strings, off_rsv, version, last_comp = struct.unpack_from(
        ">7I", data, 0
    )
    if magic != FDT_MAGIC:
        raise ImageError(f"not a flattened device tree: magic 0x{magic:08x} at offset 0")
    if version < MIN_VERSION:
        raise ImageError(f"FDT version {version} is too old (need {MIN_VERSION} or later)")
    if last_comp > 17:
        raise ImageError(f"FDT last compatible version {last_comp} is newer than 17")
    boot_cpu = _u32(data, 28)
    size_strings = _u32(data, 32)
    hdr_size = HEADER_SIZE_V16
    if version >= 17:
        hdr_size = HEADER_SIZE_V17
        if len(data) < HEADER_SIZE_V17:
            raise ImageError(f"FDT header truncated: {len(data)} bytes, needs {HEADER_SIZE_V17}")
        size_struct = _u32(data, 36)
    else:
        size_struct = max(0, total - off_struct)
    if total < hdr_size:
        raise ImageError(f"FDT total size {total} is smaller than its header")
    if off_rsv < hdr_size or off_rsv % 8 or off_rsv + 16 > total:
        raise ImageError(f"FDT memory reservation map offset {off_rsv} is invalid")
    if off_struct < hdr_size or off_struct % 4 or off_struct + size_struct > total:
        raise ImageError(
            f"FDT structure block {off_struct}+{size_struct} does not fit in total size {total}"
        )
    if off_strings < hdr_size or off_strings + size_strings > total:
        raise ImageError(
            f"FDT strings block {off_strings}+{size_strings} does not fit in total size {total}"
        )
    return FdtHeader(
        totalsize=total,
        off_dt_struct=off_struct,
        off_dt_strings=off_strings,
        off_mem_rsvmap=off_rsv,
        version=version,
        last_comp_version=last_comp,
        boot_cpuid_phys=boot_cpu,
        size_dt_strings=size_strings,
        size_dt_struct=size_struct,
    )


class _Window:
    """Positional reads inside ``[start, end)`` of a source, served from a sliding buffer."""

    def __init__(self, src: Source, start: int, end: int, what: str) -> None:
        self.src = src
        self.start = start
        self.end = end
        self.what = what
        self.base = start
        self.buf = b""

    def get(self, off: int, n: int) -> bytes:
        if off < self.start or n < 0 or off + n > self.end:
            raise ImageError(
                f"{self.what} read {off}..{off + n} runs outside the block "
                f"{self.start}..{self.end}",
                offset=off,
            )
        rel = off - self.base
        if rel < 0 or rel + n > len(self.buf):
            self.base = off
            self.buf = self.src.read_at(off, min(self.end - off, max(n, _WINDOW)), self.what)
            rel = 0
        return self.buf[rel : rel + n]

    def u32(self, off: int) -> int:
        return _u32(self.get(off, 4), 0)

    def cstring(self, off: int, what: str) -> bytes:
        """The NUL-terminated string at ``off`` (without its NUL), at most MAX_NAME bytes."""
        if off < self.start or off >= self.end:
            raise ImageError(f"{what} at offset {off} is outside its block", offset=off)
        n = min(MAX_NAME + 1, self.end - off)
        data = self.get(off, n)
        nul = data.find(b"\0")
        if nul < 0:
            if n == MAX_NAME + 1:
                raise ImageError(f"{what} at offset {off} is longer than {MAX_NAME} bytes")
            raise ImageError(f"{what} at offset {off} is not NUL-terminated", offset=off)
        return data[:nul]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


@dataclass
class Fdt:
    """A parsed tree over its source: header, reservations, nodes, lazily read values."""

    src: Source
    header: FdtHeader
    root: FdtNode
    reservations: list[tuple[int, int]]
    reservation_count: int
    node_count: int
    property_count: int

    def node(self, path: str) -> FdtNode | None:
        """The node at an absolute path such as ``/images/kernel-1`` (``/`` is the root)."""
        node: FdtNode | None = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if node is None:
                return None
            node = node.child(part)
        return node

    def walk(self) -> Iterator[FdtNode]:
        """Every node, parents before children, in file order (iterative)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def value(self, prop: FdtProperty, limit: int = INLINE_LIMIT) -> bytes:
        """The value of ``prop``; ImageError when it is larger than ``limit`` bytes."""
        if prop.inline is not None:
            return prop.inline
        if prop.size > limit:
            raise ImageError(
                f"FDT property '{prop.name}' is {prop.size} bytes, more than {limit} expected",
                offset=prop.offset,
            )
        return self.src.read_at(prop.offset, prop.size, f"FDT property '{prop.name}'")

    def get_bytes(self, node: FdtNode, name: str, limit: int = INLINE_LIMIT) -> bytes | None:
        prop = node.prop(name)
        return None if prop is None else self.value(prop, limit)

    def get_str(self, node: FdtNode, name: str) -> str | None:
        """A string property up to its first NUL (lenient about a missing terminator)."""
        raw = self.get_bytes(node, name)
        if raw is None:
            return None
        return _text(raw.split(b"\0", 1)[0])

    def get_strings(self, node: FdtNode, name: str) -> list[str] | None:
        """A string-list property (NUL-separated strings)."""
        raw = self.get_bytes(node, name)
        if raw is None:
            return None
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        return [_text(s) for s in raw.split(b"\0")] if raw else []

    def get_int(self, node: FdtNode, name: str) -> int | None:
        """A one- or two-cell (4 or 8 byte) big-endian integer; ImageError for other sizes."""
        raw = self.get_bytes(node, name)
        if raw is None:
            return None
        if len(raw) not in (4, 8):
            raise ImageError(
                f"FDT property '{node.path}/{name}' is {len(raw)} bytes, expected a 4 or 8 "
                "byte integer"
            )
        return int.from_bytes(raw, "big")


def _read_reservations(
    src: Source, hdr: FdtHeader, counter: Counter
) -> tuple[list[tuple[int, int]], int]:
    # The map ends before whichever block follows it (dtc puts it right after the header).
    end = min(
        [o for o in (hdr.off_dt_struct, hdr.off_dt_strings) if o > hdr.off_mem_rsvmap],
        default=hdr.totalsize,
    )
    win = _Window(src, hdr.off_mem_rsvmap, end, "FDT memory reservation map")
    kept: list[tuple[int, int]] = []
    count = 0
    off = hdr.off_mem_rsvmap
    while True:
        counter.tick()
        address, size = struct.unpack(">QQ", win.get(off, 16))
        if address == 0 and size == 0:
            return kept, count
        count += 1
        if len(kept) < MAX_KEPT_RESERVATIONS:
            kept.append((address, size))
        off += 16


def parse(
    src: Source,
    ctx: Context,
    *,
    max_depth: int = MAX_DEPTH,
    inline_limit: int = INLINE_LIMIT,
    max_nodes: int = MAX_NODES,
    max_properties: int = MAX_PROPERTIES,
) -> Fdt:
    """Parse the device tree at the start of ``src``; raises ImageError when it is malformed.

    The tree may be followed by other data (a FIT with external data is); only its
    ``totalsize`` bytes are read. More than ``max_nodes`` nodes or ``max_properties``
    properties raise LimitError.
    """
    hdr = parse_header(src.read_at(0, min(src.size, HEADER_SIZE_V17), "FDT header"))
    if hdr.totalsize > src.size:
        raise ImageError(
            f"FDT truncated: header says {hdr.totalsize} bytes, file has {src.size}",
            offset=src.size,
        )
    counter = Counter(ctx, "FDT records")
    reservations, reservation_count = _read_reservations(src, hdr, counter)

    struct_end = hdr.off_dt_struct + hdr.size_dt_struct
    win = _Window(src, hdr.off_dt_struct, struct_end, "FDT structure block")
    strings_end = hdr.off_dt_strings + hdr.size_dt_strings
    strings = _Window(src, hdr.off_dt_strings, strings_end, "FDT strings block")
    names: dict[int, str] = {}

    root: FdtNode | None = None
    stack: list[FdtNode] = []
    nodes = props = inlined = 0
    off = hdr.off_dt_struct
    while True:
        counter.tick()
        token = win.u32(off)
        if token == FDT_BEGIN_NODE:
            if root is not None and not stack:
                raise ImageError(f"FDT has a second root node at offset {off}", offset=off)
            if len(stack) >= max_depth:
                raise ImageError(
                    f"FDT nodes nested deeper than {max_depth} levels at offset {off}",
                    offset=off,
                )
            raw = win.cstring(off + 4, "FDT node name")
            name = _text(raw)
            if stack:
                parent = stack[-1]
                path = f"{parent.path.rstrip('/')}/{name}"
            else:
                path = "/"
            node = FdtNode(name=name, path=path, offset=off, depth=len(stack))
            if stack:
                stack[-1]._add_child(node)
            else:
                root = node
            stack.append(node)
            nodes += 1
            if nodes > max_nodes:
                raise LimitError(f"FDT has more than {max_nodes} nodes", offset=off)
            off += 4 + ((len(raw) + 1 + 3) & ~3)
        elif token == FDT_END_NODE:
            if not stack:
                raise ImageError(f"FDT_END_NODE without an open node at offset {off}", offset=off)
            stack.pop()
            off += 4
        elif token == FDT_PROP:
            if not stack:
                raise ImageError(f"FDT property outside any node at offset {off}", offset=off)
            length = win.u32(off + 4)
            nameoff = win.u32(off + 8)
            value_off = off + 12
            if length > struct_end - value_off:
                raise ImageError(
                    f"FDT property at offset {off} claims {length} bytes, past the end of "
                    f"the structure block at {struct_end}",
                    offset=off,
                )
            pname = names.get(nameoff)
            if pname is None:
                if nameoff >= hdr.size_dt_strings:
                    raise ImageError(
                        f"FDT property at offset {off} names string {nameoff}, outside the "
                        f"strings block of {hdr.size_dt_strings} bytes",
                        offset=off,
                    )
                pname = _text(strings.cstring(hdr.off_dt_strings + nameoff, "FDT property name"))
                names[nameoff] = pname
            inline = None
            if length <= inline_limit and inlined + length <= INLINE_BUDGET:
                inline = win.get(value_off, length)
                inlined += length
            stack[-1].properties.setdefault(
                pname, FdtProperty(name=pname, offset=value_off, size=length, inline=inline)
            )
            props += 1
            if props > max_properties:
                raise LimitError(f"FDT has more than {max_properties} properties", offset=off)
            off = value_off + ((length + 3) & ~3)
        elif token == FDT_NOP:
            off += 4
        elif token == FDT_END:
            if stack:
                raise ImageError(
                    f"FDT_END at offset {off} while node '{stack[-1].path}' is open", offset=off
                )
            if root is None:
                raise ImageError("FDT structure block has no root node", offset=off)
            break
        else:
            raise ImageError(f"unknown FDT token 0x{token:08x} at offset {off}", offset=off)

    return Fdt(
        src=src,
        header=hdr,
        root=root,
        reservations=reservations,
        reservation_count=reservation_count,
        node_count=nodes,
        property_count=props,
    )


def head_has_top_level_node(head: bytes, name: str) -> bool:
    """Cheap check for sniffers: does the tree whose first bytes are ``head`` have a node
    ``name`` directly under the root? Walks tokens inside ``head`` only; never raises."""
    try:
        hdr = parse_header(head[:HEADER_SIZE_V17])
    except (ImageError, struct.error):
        return False
    want = name.encode()
    end = min(len(head), hdr.off_dt_struct + hdr.size_dt_struct)
    off = hdr.off_dt_struct
    depth = 0
    steps = 0
    while off + 4 <= end and steps < 100_000:
        steps += 1
        token = _u32(head, off)
        if token == FDT_BEGIN_NODE:
            nul = head.find(b"\0", off + 4, min(end, off + 4 + MAX_NAME))
            if nul < 0:
                return False
            if depth == 1 and head[off + 4 : nul] == want:
                return True
            depth += 1
            off += 4 + ((nul - (off + 4) + 1 + 3) & ~3)
        elif token == FDT_END_NODE:
            depth -= 1
            if depth <= 0:
                return False
            off += 4
        elif token == FDT_PROP:
            if off + 12 > end:
                return False
            length = _u32(head, off + 4)
            off += 12 + ((length + 3) & ~3)
        elif token == FDT_NOP:
            off += 4
        else:
            return False
    return False
