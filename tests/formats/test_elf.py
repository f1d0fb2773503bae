"""ELF: files from the host toolchain and from a small builder, checked against readelf and
objcopy; hand-built damage; round trips and fuzzing."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, LimitError
from unbrick.formats import elf, ihex, srec
from unbrick.formats.base import Context, Findings, Sniff, Source
from unbrick.formats.memmap import RawLayout

# --- a small ELF builder -------------------------------------------------------------------------


@dataclass
class Seg:
    paddr: int
    data: bytes
    vaddr: int | None = None
    extra_mem: int = 0
    flags: int = 5
    ptype: int = 1


@dataclass
class Spec:
    bits: int = 32
    endian: str = "<"
    machine: int = 40
    etype: int = 2
    entry: int = 0
    segs: list[Seg] = field(default_factory=list)
    sections: bool = True


def build(spec: Spec) -> bytes:
    """An ELF file with the given program headers, a null section and .shstrtab."""
    e = spec.endian
    word = "I" if spec.bits == 32 else "Q"
    ehsize = 52 if spec.bits == 32 else 64
    phentsize = 32 if spec.bits == 32 else 56
    shentsize = 40 if spec.bits == 32 else 64
    phoff = ehsize
    pos = phoff + phentsize * len(spec.segs)
    body = b""
    offsets = []
    for s in spec.segs:
        pad = (-pos) % 4
        body += bytes(pad)
        pos += pad
        offsets.append(pos)
        body += s.data
        pos += len(s.data)
    strtab = b"\0.shstrtab\0"
    shstr_off = pos
    body += strtab
    pos += len(strtab)
    pos_aligned = pos + (-pos) % 8
    body += bytes(pos_aligned - pos)
    shoff = pos_aligned if spec.sections else 0
    shnum = 2 if spec.sections else 0
    ident = b"\x7fELF" + bytes((1 if spec.bits == 32 else 2, 1 if e == "<" else 2, 1)) + bytes(9)
    head = ident + struct.pack(
        f"{e}HHI{word}{word}{word}IHHHHHH",
        spec.etype,
        spec.machine,
        1,
        spec.entry,
        phoff if spec.segs else 0,
        shoff,
        0,
        ehsize,
        phentsize,
        len(spec.segs),
        shentsize,
        shnum,
        1 if spec.sections else 0,
    )
    phdrs = b""
    for s, off in zip(spec.segs, offsets, strict=True):
        vaddr = s.paddr if s.vaddr is None else s.vaddr
        memsz = len(s.data) + s.extra_mem
        if spec.bits == 32:
            phdrs += struct.pack(
                f"{e}8I", s.ptype, off, vaddr, s.paddr, len(s.data), memsz, s.flags, 4
            )
        else:
            phdrs += struct.pack(
                f"{e}IIQQQQQQ", s.ptype, s.flags, off, vaddr, s.paddr, len(s.data), memsz, 4
            )
    shdrs = b""
    if spec.sections:
        fmt = f"{e}10I" if spec.bits == 32 else f"{e}IIQQQQIIQQ"
        shdrs = bytes(shentsize) + struct.pack(fmt, 1, 3, 0, 0, shstr_off, len(strtab), 0, 0, 1, 0)
    return head + phdrs + body + shdrs


def parse(data: bytes) -> Findings:
    return elf.inspect(Source.from_bytes(data), Context())


def convert(data: bytes, **kw: int) -> tuple[RawLayout, bytes]:
    out = io.BytesIO()
    layout = elf.to_raw(Source.from_bytes(data), out, Context(), **kw)
    return layout, out.getvalue()


ARM_IMAGE = Spec(
    entry=0x08000101,
    segs=[
        Seg(0x08000000, b"\x11" * 40, flags=5),
        Seg(0x08000100, b"\x22" * 8, vaddr=0x20000000, extra_mem=100, flags=6),
        Seg(0, b"note", ptype=4),
    ],
)


# --- hand-built files ----------------------------------------------------------------------------


def test_details_of_a_built_arm_image() -> None:
    f = parse(build(ARM_IMAGE))
    assert f.valid, f.problems
    d = f.details
    assert d["class"] == "ELF32"
    assert d["data"] == "little"
    assert d["machine"] == 40
    assert d["machine_name"] == "ARM"
    assert d["type"] == "EXEC"
    assert d["entry"] == 0x08000101
    assert d["program_header_count"] == 3
    assert d["section_count"] == 2
    assert d["load_segment_count"] == 2
    assert [
        (s["paddr"], s["vaddr"], s["filesz"], s["memsz"], s["perm"]) for s in d["segments"]
    ] == [
        (0x08000000, 0x08000000, 40, 40, "r-x"),
        (0x08000100, 0x20000000, 8, 108, "rw-"),
    ]
    assert d["load_ranges"] == [[0x08000000, 0x08000028], [0x08000100, 0x08000108]]
    assert d["load_bytes"] == 48


def test_to_raw_places_segments_by_physical_address() -> None:
    layout, raw = convert(build(ARM_IMAGE))
    assert layout == RawLayout(
        0x08000000, 0x108, [(0x08000000, 0x08000028), (0x08000100, 0x08000108)]
    )
    assert raw == b"\x11" * 40 + b"\xff" * (0x100 - 40) + b"\x22" * 8
    _, raw = convert(build(ARM_IMAGE), fill=0)
    assert raw[40:0x100] == bytes(0x100 - 40)


def test_to_raw_bounds_the_span() -> None:
    spec = Spec(segs=[Seg(0, b"\x01"), Seg(0x20000000, b"\x02")])
    with pytest.raises(LimitError, match="max_span"):
        convert(build(spec))


@pytest.mark.parametrize(
    ("machine", "name"),
    [
        (40, "ARM"),
        (183, "AArch64"),
        (243, "RISC-V"),
        (94, "Xtensa"),
        (62, "x86-64"),
        (8, "MIPS"),
        (20, "PowerPC"),
        (83, "AVR"),
        (105, "MSP430"),
        (0x7777, "unknown (30583)"),
    ],
)
def test_machine_names(machine: int, name: str) -> None:
    assert parse(build(Spec(machine=machine))).details["machine_name"] == name


def test_segment_outside_the_file_is_a_problem() -> None:
    data = build(Spec(segs=[Seg(0x1000, b"\x01" * 64)], sections=False))
    cut = data[:-30]
    f = parse(cut)
    assert len(f.problems) == 1
    assert "PT_LOAD segment 0: file range" in f.problems[0]
    assert "lies outside the file" in f.problems[0]
    with pytest.raises(ImageError, match="cannot convert an invalid ELF"):
        convert(cut)


def test_truncated_section_table_is_a_problem() -> None:
    data = build(Spec(segs=[Seg(0x1000, b"\x01" * 64)]))
    f = parse(data[:-10])
    assert len(f.problems) == 1
    assert "section header table" in f.problems[0]
    assert "truncated" in f.problems[0]
    f = parse(data[: len(data) - 80])
    assert "lies outside the file" in f.problems[0]


def test_filesz_larger_than_memsz_is_a_problem() -> None:
    data = bytearray(build(Spec(segs=[Seg(0x1000, b"\x01" * 16)])))
    struct.pack_into("<I", data, 52 + 20, 8)  # p_memsz of the first program header
    f = parse(bytes(data))
    assert f.problems == ["PT_LOAD segment 0: file size 0x10 is larger than its memory size 0x8"]


def test_overlapping_segments_are_a_problem() -> None:
    data = build(Spec(segs=[Seg(0x1000, b"\x01" * 16), Seg(0x1008, b"\x02" * 16)]))
    f = parse(data)
    assert f.problems == [
        "PT_LOAD segment 1 overlaps an earlier segment at physical address 0x1008"
    ]


def test_segment_past_the_address_space_is_a_problem() -> None:
    f = parse(build(Spec(segs=[Seg(0xFFFFFFF8, b"\x01" * 16)])))
    assert f.problems == ["PT_LOAD segment 0: 0xfffffff8+0x10 runs past the 32-bit address space"]


def test_no_load_segments() -> None:
    f = parse(build(Spec(etype=1)))
    assert f.valid
    assert f.details["type"] == "REL"
    assert f.warnings == ["no PT_LOAD segments: this is not a loadable image (an object file?)"]
    with pytest.raises(ImageError, match="no loadable data"):
        convert(build(Spec(etype=1)))


def test_bss_only_segment_is_not_written() -> None:
    spec = Spec(segs=[Seg(0x100, b"\x01" * 4), Seg(0x200, b"", extra_mem=64, flags=6)])
    layout, raw = convert(build(spec))
    assert layout.segments == [(0x100, 0x104)]
    assert raw == b"\x01" * 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x7fELF", "ELF identification truncated"),
        (b"\x7fELX" + bytes(60), "bad magic"),
        (b"\x7fELF\x03\x01\x01" + bytes(60), "ELF class 3"),
        (b"\x7fELF\x01\x03\x01" + bytes(60), "data encoding 3"),
        (b"\x7fELF\x02\x01\x01" + bytes(30), "ELF header truncated"),
    ],
)
def test_header_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse(data)


def test_program_header_table_errors() -> None:
    data = bytearray(build(ARM_IMAGE))
    struct.pack_into("<H", data, 42, 16)  # e_phentsize
    with pytest.raises(ImageError, match="program header size 16"):
        parse(bytes(data))
    data = bytearray(build(ARM_IMAGE))
    struct.pack_into("<I", data, 28, len(data) - 40)  # e_phoff near the end
    with pytest.raises(ImageError, match="program header table"):
        parse(bytes(data))


def test_extended_numbering_from_section_zero() -> None:
    spec = Spec(segs=[Seg(0x100, b"\x01" * 4), Seg(0x200, b"\x02" * 4)])
    data = bytearray(build(spec))
    shoff = struct.unpack_from("<I", data, 32)[0]
    struct.pack_into("<H", data, 44, 0xFFFF)  # e_phnum = PN_XNUM
    struct.pack_into("<I", data, shoff + 28, 2)  # section 0 sh_info = real count
    struct.pack_into("<H", data, 48, 0)  # e_shnum = 0: count in section 0 sh_size
    struct.pack_into("<I", data, shoff + 20, 2)
    f = parse(bytes(data))
    assert f.valid, f.problems
    assert f.details["program_header_count"] == 2
    assert f.details["section_count"] == 2
    assert f.details["load_ranges"] == [[0x100, 0x104], [0x200, 0x204]]


def test_sniff() -> None:
    good = build(ARM_IMAGE)
    assert elf.sniff(Sniff(head=good, tail=good[-64:], size=len(good)))
    for bad in (b"\x7fELF", b"\x7fELF\x01\x01\x02" + bytes(60), b"\x7fELF\x05\x01\x01" + bytes(60)):
        assert not elf.sniff(Sniff(head=bad, tail=b"", size=len(bad)))


def test_registered() -> None:
    from unbrick.formats import detect

    good = build(ARM_IMAGE)
    assert detect.detect(Sniff(head=good, tail=good[-64:], size=len(good))).name == "elf"


def test_load_segments_and_iter_data() -> None:
    src = Source.from_bytes(build(ARM_IMAGE))
    segs = elf.load_segments(src, Context())
    assert [(s.index, s.paddr, s.filesz) for s in segs] == [(0, 0x08000000, 40), (1, 0x08000100, 8)]
    assert list(elf.iter_data(src, Context())) == [
        (0x08000000, b"\x11" * 40),
        (0x08000100, b"\x22" * 8),
    ]


# --- properties ----------------------------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    bits = draw(st.sampled_from([32, 64]))
    top = (1 << bits) - 1
    n = draw(st.integers(0, 5))
    base = draw(st.integers(0, min(top, 1 << 40) - (1 << 20)))
    offsets = sorted(draw(st.sets(st.integers(0, (1 << 20) - 300), min_size=n, max_size=n)))
    segs: list[Seg] = []
    end = -1
    for off in offsets:
        if off <= end:
            continue
        data = draw(st.binary(min_size=0, max_size=256))
        segs.append(
            Seg(
                base + off,
                data,
                vaddr=draw(st.integers(0, top)),
                extra_mem=draw(st.integers(0, 1000)),
                flags=draw(st.integers(0, 7)),
            )
        )
        end = off + len(data)
    return Spec(
        bits=bits,
        endian=draw(st.sampled_from(["<", ">"])),
        machine=draw(st.sampled_from(sorted(elf.MACHINES))),
        etype=draw(st.integers(0, 4)),
        entry=draw(st.integers(0, top)),
        segs=segs,
        sections=draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None)
@given(spec=specs(), fill=st.integers(0, 255))
def test_round_trip_built_files(spec: Spec, fill: int) -> None:
    data = build(spec)
    f = parse(data)
    assert f.valid, f.problems
    d = f.details
    assert d["class"] == f"ELF{spec.bits}"
    assert d["data"] == ("little" if spec.endian == "<" else "big")
    assert d["machine"] == spec.machine
    assert d["type"] == elf.TYPES[spec.etype]
    assert d["entry"] == spec.entry
    assert d["section_count"] == (2 if spec.sections else 0)
    assert [
        (s["paddr"], s["vaddr"], s["filesz"], s["memsz"], s["flags"]) for s in d["segments"]
    ] == [(s.paddr, s.vaddr, len(s.data), len(s.data) + s.extra_mem, s.flags) for s in spec.segs]
    with_data = [s for s in spec.segs if s.data]
    if not with_data:
        return
    layout, raw = convert(data, fill=fill)
    lo = min(s.paddr for s in with_data)
    assert layout.base_address == lo
    for s in with_data:
        assert raw[s.paddr - lo : s.paddr - lo + len(s.data)] == s.data
    assert len(raw) == max(s.paddr + len(s.data) for s in with_data) - lo


def _check_parse(data: bytes) -> None:
    try:
        f = parse(data)
    except ImageError:
        return
    json.dumps(f.details)
    assert isinstance(f.details["segments"], list)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_parse(b"\x7fELF" + data)
    _check_parse(data)


_VALID32 = build(ARM_IMAGE)
_VALID64 = build(Spec(bits=64, endian=">", machine=21, segs=[Seg(0x1000, b"\x01" * 64)]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([_VALID32, _VALID64]),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert", "set"]),
            st.integers(0, 300),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzz_mutated_file(valid: bytes, edits: list[tuple[str, int, int]]) -> None:
    data = bytearray(valid)
    for op, where, val in edits:
        pos = min(where, len(data))
        if op == "flip" and pos < len(data):
            data[pos] ^= val or 1
        elif op == "set" and pos < len(data):
            data[pos] = 0xFF
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = bytes((val,)) * 8
    _check_parse(bytes(data))
    try:
        layout, raw = convert(bytes(data), max_span=1 << 20)
    except ImageError:
        return
    assert len(raw) == layout.size


# --- cross-checks with binutils ------------------------------------------------------------------

READELF_MACHINES = {
    "None": 0,
    "Intel 80386": 3,
    "Advanced Micro Devices X86-64": 62,
    "ARM": 40,
    "AArch64": 183,
    "RISC-V": 243,
    "Tensilica Xtensa Processor": 94,
    "MIPS R3000": 8,
    "PowerPC": 20,
    "PowerPC64": 21,
    "Atmel AVR 8-bit microcontroller": 83,
    "Texas Instruments msp430 microcontroller": 105,
}

_LOAD = re.compile(
    r"^\s+LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+"
    r"(0x[0-9a-f]+)\s(.{3})\s",
    re.M,
)


def readelf(path: Path) -> dict[str, object]:
    out = run(["readelf", "-h", "-l", "-W", path]).stdout.decode()

    def field(name: str) -> str:
        m = re.search(rf"^\s+{name}:\s+(.*)$", out, re.M)
        assert m, (name, out)
        return m.group(1).strip()

    sections = re.match(r"(\d+)(?: \((\d+)\))?", field("Number of section headers"))
    assert sections
    loads = [
        (
            int(m[0], 16),
            int(m[1], 16),
            int(m[2], 16),
            int(m[3], 16),
            int(m[4], 16),
            ("r" if m[5][0] == "R" else "-")
            + ("w" if m[5][1] == "W" else "-")
            + ("x" if m[5][2] == "E" else "-"),
        )
        for m in _LOAD.findall(out)
    ]
    return {
        "class": field("Class"),
        "data": "little" if "little endian" in field("Data") else "big",
        "type": field("Type").split()[0],
        "machine": READELF_MACHINES[field("Machine")],
        "entry": int(field("Entry point address"), 16),
        "section_count": int(sections.group(2) or sections.group(1)),
        "loads": loads,
    }


def ours(path: Path) -> dict[str, object]:
    f = elf.inspect(Source.from_bytes(path.read_bytes()), Context())
    assert f.valid, f.problems
    d = f.details
    return {
        "class": d["class"],
        "data": d["data"],
        "type": d["type"],
        "machine": d["machine"],
        "entry": d["entry"],
        "section_count": d["section_count"],
        "loads": [
            (s["offset"], s["vaddr"], s["paddr"], s["filesz"], s["memsz"], s["perm"])
            for s in d["segments"]
        ],
    }


_C_PROGRAM = "int counter = 3;\nint main(void) { return counter; }\n"


@pytest.mark.peer
@pytest.mark.parametrize("flags", [[], ["-no-pie"], ["-static"], ["-m32", "-nostdlib", "-e", "f"]])
def test_gcc_executables_agree_with_readelf(tmp_path: Path, flags: list[str]) -> None:
    need("gcc", "readelf")
    c = tmp_path / "p.c"
    c.write_text(_C_PROGRAM + ("void f(void) { for (;;) ; }\n" if "-m32" in flags else ""))
    exe = tmp_path / "p"
    proc = subprocess.run(["gcc", "-O1", *flags, c, "-o", exe], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"this gcc cannot build with {flags}: {proc.stderr.decode()[-200:]}")
    theirs = readelf(exe)
    assert ours(exe) == theirs
    assert theirs["loads"]


def _assemble(tmp_path: Path, asflag: str) -> Path:
    s = tmp_path / "a.s"
    s.write_text(
        '.globl _start\n.text\n_start: nop\nnop\nret\n.section .rodata\n.ascii "hello"\n'
        ".data\n.long 1,2,3\n.bss\n.space 64\n"
    )
    o = tmp_path / "a.o"
    run(["as", asflag, s, "-o", o])
    return o


@pytest.mark.peer
@pytest.mark.parametrize(
    ("bits", "emulation", "oformat"),
    [
        (32, "elf_i386", None),
        (32, "elf_i386", "elf32-big"),
        (64, "elf_x86_64", None),
        (64, "elf_x86_64", "elf64-big"),
        (32, "elf32_x86_64", None),
    ],
)
def test_ld_outputs_agree_with_readelf(
    tmp_path: Path, bits: int, emulation: str, oformat: str | None
) -> None:
    need("as", "ld", "readelf")
    o = _assemble(tmp_path, "--x32" if emulation == "elf32_x86_64" else f"--{bits}")
    exe = tmp_path / "a.elf"
    argv: list[str | Path] = ["ld", "-m", emulation, "-Ttext=0x08000000", o, "-o", exe]
    if oformat:
        argv += ["--oformat", oformat]
    run(argv)
    theirs = readelf(exe)
    assert ours(exe) == theirs
    assert theirs["data"] == ("big" if oformat else "little")


@pytest.mark.peer
@pytest.mark.parametrize(
    ("target", "arch"),
    [
        ("elf32-little", None),
        ("elf32-big", None),
        ("elf64-big", None),
        ("elf32-i386", "i386"),
        ("elf64-x86-64", "i386:x86-64"),
    ],
)
def test_objcopy_blobs_agree_with_readelf(tmp_path: Path, target: str, arch: str | None) -> None:
    need("objcopy", "readelf")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 12)
    obj = tmp_path / "blob.o"
    argv: list[str | Path] = ["objcopy", "-I", "binary", "-O", target]
    if arch:
        argv += ["-B", arch]
    run([*argv, blob, obj])
    theirs = readelf(obj)
    assert ours(obj) == theirs
    assert theirs["type"] == "REL"
    assert theirs["loads"] == []


@pytest.mark.peer
@pytest.mark.parametrize(
    ("bits", "endian", "machine"),
    [
        (32, "<", 40),
        (32, ">", 40),
        (64, "<", 183),
        (64, "<", 243),
        (32, "<", 243),
        (32, "<", 94),
        (32, ">", 8),
        (32, ">", 20),
        (64, ">", 21),
        (32, "<", 83),
        (32, "<", 105),
    ],
)
def test_built_files_agree_with_readelf(
    tmp_path: Path, bits: int, endian: str, machine: int
) -> None:
    need("readelf")
    spec = Spec(
        bits=bits,
        endian=endian,
        machine=machine,
        entry=0x1001,
        segs=[
            Seg(0x1000, b"\x01" * 100, flags=5),
            Seg(0x3000, b"\x02" * 10, vaddr=0x80000000, extra_mem=500, flags=6),
        ],
    )
    p = tmp_path / "built.elf"
    p.write_bytes(build(spec))
    assert ours(p) == readelf(p)


_LMA_SCRIPT = """
ENTRY(_start)
PHDRS { text PT_LOAD; data PT_LOAD; }
SECTIONS {
  . = 0x08000000;
  .text : { *(.text*) } :text
  .rodata : { *(.rodata*) } :text
  .data 0x20000000 : AT(0x08001000) { *(.data*) } :data
  .bss : { *(.bss*) } :data
}
"""


@pytest.mark.peer
@pytest.mark.parametrize("oformat", [None, "elf32-big"])
def test_raw_conversion_agrees_with_objcopy(tmp_path: Path, oformat: str | None) -> None:
    """Data linked to RAM but loaded from flash (VMA != LMA): objcopy -O binary/ihex/srec all
    place it at the load address, as does our conversion."""
    need("as", "ld", "objcopy")
    o = _assemble(tmp_path, "--32")
    script = tmp_path / "lma.ld"
    script.write_text(_LMA_SCRIPT)
    exe = tmp_path / "lma.elf"
    argv: list[str | Path] = ["ld", "-m", "elf_i386", "-T", script, o, "-o", exe]
    if oformat:
        argv += ["--oformat", oformat]
    run(argv)
    f = elf.inspect(Source.from_bytes(exe.read_bytes()), Context())
    assert [(s["vaddr"], s["paddr"]) for s in f.details["segments"]] == [
        (0x08000000, 0x08000000),
        (0x20000000, 0x08001000),
    ]
    layout, raw = convert(exe.read_bytes())
    assert layout.base_address == 0x08000000
    theirs = tmp_path / "lma.bin"
    in_fmt = ["-I", oformat] if oformat else []
    run(["objcopy", *in_fmt, "-O", "binary", "--gap-fill", "0xff", exe, theirs])
    assert raw == theirs.read_bytes()
    for fmt, mod in (("ihex", ihex), ("srec", srec)):
        out = tmp_path / f"lma.{fmt}"
        run(["objcopy", *in_fmt, "-O", fmt, exe, out])
        text = Source.from_bytes(out.read_bytes())
        parsed = mod.inspect(text, Context())
        assert parsed.valid, parsed.problems
        assert parsed.details["segments"] == f.details["load_ranges"]
        assert parsed.details["entry_point"] == f.details["entry"]
        buf = io.BytesIO()
        mod.to_raw(text, buf, Context())
        assert buf.getvalue() == raw
