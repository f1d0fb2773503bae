"""Flattened device trees and U-Boot FIT images.

Cross-checks: dtc/fdtget (the tree our parser reads is the tree libfdt reads), mkimage/dumpimage
(FIT fields, hashes, external data, signatures). Round trips through small in-test builders,
fuzzing, and one test per problem or error the parsers report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import string
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, LimitError
from unbrick.formats import fdt, fit
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source
from unbrick.formats.detect import detect, inspect_source, sniff_source

SMALL = Limits(max_records=200_000, max_seconds=10.0)

# --- an FDT builder written from the Devicetree Specification ----------------------------------

#: (name, properties, children)
Node = tuple[str, dict[str, bytes], list["Node"]]


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def pad4(b: bytes) -> bytes:
    return b + bytes(-len(b) % 4)


def build_struct(root: Node, strings: bytearray, offsets: dict[str, int]) -> bytes:
    def stroff(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode() + b"\0")
        return offsets[name]

    out = bytearray()
    todo: list[Node | None] = [root]
    while todo:
        item = todo.pop()
        if item is None:
            out += u32(2)
            continue
        name, props, children = item
        out += u32(1) + pad4(name.encode() + b"\0")
        for pname, value in props.items():
            out += u32(3) + u32(len(value)) + u32(stroff(pname)) + pad4(value)
        todo.append(None)
        todo.extend(reversed(children))
    out += u32(9)
    return bytes(out)


def build_fdt(
    root: Node,
    *,
    rsv: list[tuple[int, int]] | None = None,
    version: int = 17,
    raw_struct: bytes | None = None,
    raw_strings: bytes | None = None,
) -> bytes:
    strings = bytearray()
    struct_block = build_struct(root, strings, {}) if raw_struct is None else raw_struct
    if raw_strings is not None:
        strings = bytearray(raw_strings)
    rsvmap = b"".join(struct.pack(">QQ", a, s) for a, s in (rsv or [])) + bytes(16)
    off_rsv = 40
    off_struct = off_rsv + len(rsvmap)
    off_strings = off_struct + len(struct_block)
    total = off_strings + len(strings)
    header = struct.pack(
        ">10I", 0xD00DFEED, total, off_struct, off_strings, off_rsv, version, 16, 0,
        len(strings), len(struct_block),
    )  # fmt: skip
    return header + rsvmap + struct_block + bytes(strings)


def cstr(*values: str) -> bytes:
    return b"".join(v.encode() + b"\0" for v in values)


def parse_fdt(data: bytes, limits: Limits = SMALL) -> fdt.Fdt:
    return fdt.parse(Source.from_bytes(data), Context(limits=limits))


def inspect_fit(data: bytes) -> Findings:
    return fit.inspect(Source.from_bytes(data), Context(limits=SMALL))


def digest(algo: str, data: bytes) -> bytes:
    if algo == "crc32":
        return u32(zlib.crc32(data))
    return hashlib.new(algo, data).digest()


def fit_blob(
    images: list[tuple[str, bytes, dict[str, bytes], list[str]]],
    *,
    configs: list[tuple[str, dict[str, bytes]]] | None = None,
    default: str | None = None,
    external: bool = False,
) -> bytes:
    """A FIT: images are (name, data, extra properties, hash algorithms)."""
    image_nodes: list[Node] = []
    tail = b""
    for name, data, extra, algos in images:
        props: dict[str, bytes] = {}
        if external:
            props["data-offset"] = u32(len(tail))
            props["data-size"] = u32(len(data))
            tail += pad4(data)
        else:
            props["data"] = data
        props.update(extra)
        hashes: list[Node] = [
            (f"hash-{i + 1}", {"algo": cstr(a), "value": digest(a, data)}, [])
            for i, a in enumerate(algos)
        ]
        image_nodes.append((name, props, hashes))
    conf_props = {"default": cstr(default)} if default else {}
    conf_nodes: list[Node] = [(n, p, []) for n, p in (configs or [])]
    root: Node = (
        "",
        {"description": cstr("test FIT"), "#address-cells": u32(1)},
        [("images", {}, image_nodes), ("configurations", conf_props, conf_nodes)],
    )
    blob = build_fdt(root)
    return pad4(blob) + tail if external else blob


# --- cross-checks with dtc / fdtget ------------------------------------------------------------

DTS = """/dts-v1/;
/memreserve/ 0x10000000 0x4000;
/memreserve/ 0x20000000 0x100000;
/ {
    model = "Test board";
    compatible = "vendor,board", "vendor,soc";
    #address-cells = <2>;
    #size-cells = <1>;
    empty;
    bytes = [de ad be ef 01];
    wide = /bits/ 64 <0x123456789abcdef0>;
    cpus {
        cpu@0 { reg = <0 0>; device_type = "cpu"; };
        cpu@1 { reg = <0 1>; device_type = "cpu"; status = "disabled"; };
    };
    soc {
        serial@1000 { reg = <0 0x1000 0x100>; a { b { c { d = <1 2 3>; }; }; }; };
    };
    chosen { bootargs = "console=ttyS0,115200"; };
};
"""


def fdtget(path: Path, *args: str) -> list[str]:
    return run(["fdtget", path, *args]).stdout.decode().split("\n")[:-1]


@pytest.mark.peer
def test_fdt_parser_agrees_with_fdtget(tmp_path: Path) -> None:
    need("dtc", "fdtget")
    (tmp_path / "t.dts").write_text(DTS)
    dtb = tmp_path / "t.dtb"
    run(["dtc", "-I", "dts", "-O", "dtb", "-o", dtb, tmp_path / "t.dts"])
    tree = parse_fdt(dtb.read_bytes())
    assert tree.reservations == [(0x10000000, 0x4000), (0x20000000, 0x100000)]
    queries: list[str] = []
    expected: list[bytes] = []
    for node in tree.walk():
        assert fdtget(dtb, "-l", node.path) == [c.name for c in node.children]
        assert fdtget(dtb, "-p", node.path) == list(node.properties)
        for prop in node.properties.values():
            queries += [node.path, prop.name]
            expected.append(tree.value(prop))
    lines = fdtget(dtb, "-t", "bx", *queries)
    assert [bytes(int(x, 16) for x in line.split()) for line in lines] == expected
    root = tree.root
    assert tree.get_strings(root, "compatible") == ["vendor,board", "vendor,soc"]
    assert tree.get_int(root, "wide") == 0x123456789ABCDEF0
    assert tree.get_str(tree.node("/chosen") or root, "bootargs") == "console=ttyS0,115200"
    assert tree.node("/soc/serial@1000/a/b/c") is not None


@pytest.mark.peer
def test_plain_dtb_is_not_a_fit(tmp_path: Path) -> None:
    need("dtc")
    (tmp_path / "t.dts").write_text(DTS)
    dtb = tmp_path / "t.dtb"
    run(["dtc", "-I", "dts", "-O", "dtb", "-o", dtb, tmp_path / "t.dts"])
    data = dtb.read_bytes()
    assert not fit.sniff(Sniff(head=data, tail=data[-64:], size=len(data)))
    assert detect(sniff_source(Source.from_bytes(data))).name != "fit"
    with pytest.raises(ImageError, match="no /images node"):
        inspect_fit(data)


node_names = st.text(string.ascii_lowercase + string.digits + ",._+-", min_size=1, max_size=12)


def trees(max_leaves: int = 12) -> st.SearchStrategy[Node]:
    props = st.dictionaries(
        st.text(string.ascii_lowercase + "#,-", min_size=1, max_size=10),
        st.binary(max_size=40),
        max_size=4,
    )
    leaf = st.tuples(node_names, props, st.just([]))
    nested = st.recursive(
        leaf,
        lambda kids: st.tuples(
            node_names, props, st.lists(kids, max_size=4, unique_by=lambda n: n[0])
        ),
        max_leaves=max_leaves,
    )
    return st.tuples(st.just(""), props, st.lists(nested, max_size=4, unique_by=lambda n: n[0]))


@pytest.mark.peer
@given(root=trees(6))
@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_dtc_reads_what_our_builder_writes(tmp_path: Path, root: Node) -> None:
    need("dtc")
    path = tmp_path / "b.dtb"
    path.write_bytes(build_fdt(root))
    proc = run(["dtc", "-I", "dtb", "-O", "dtb", "-o", tmp_path / "again.dtb", path])
    assert proc.returncode == 0
    again = parse_fdt((tmp_path / "again.dtb").read_bytes())
    assert shape(again.root, again) == strip(root)


# --- cross-checks with mkimage / dumpimage ------------------------------------------------------

ITS = """/dts-v1/;
/ {
    description = "Cross-check FIT";
    #address-cells = <1>;
    images {
        kernel-1 {
            description = "Linux kernel";
            data = /incbin/("kernel.bin");
            type = "kernel";
            arch = "arm64";
            os = "linux";
            compression = "gzip";
            load = <0x80080000>;
            entry = <0x80080000>;
            hash-1 { algo = "crc32"; };
            hash-2 { algo = "sha1"; };
            hash-3 { algo = "md5"; };
        };
        fdt-1 {
            description = "board dtb";
            data = /incbin/("board.dtb");
            type = "flat_dt";
            arch = "arm64";
            compression = "none";
            hash-1 { algo = "sha256"; };
            hash-2 { algo = "sha512"; };
        };
        ramdisk-1 {
            description = "initramfs";
            data = /incbin/("initrd.bin");
            type = "ramdisk";
            arch = "arm64";
            os = "linux";
            compression = "none";
            load = <0x88000000>;
            hash-1 { algo = "sha384"; };
            hash-2 { algo = "crc16-ccitt"; };
        };
    };
    configurations {
        default = "conf-1";
        conf-1 {
            description = "boot";
            kernel = "kernel-1";
            fdt = "fdt-1";
            ramdisk = "ramdisk-1";
        };
        conf-2 {
            description = "no ramdisk";
            kernel = "kernel-1";
            fdt = "fdt-1";
        };
    };
};
"""

SIZES = {"kernel.bin": 5003, "board.dtb": 1500, "initrd.bin": 20000}


def make_its(tmp_path: Path, its: str = ITS) -> Path:
    for name, size in SIZES.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    path = tmp_path / "image.its"
    path.write_text(its)
    return path


def mkimage_table(flag: str) -> dict[str, str]:
    proc = subprocess.run(["mkimage", flag, "list"], capture_output=True, text=True, check=False)
    return dict(
        (m.group(1), m.group(2).strip())
        for m in (re.match(r"^\t(\S+)\s+(.+)$", line) for line in proc.stderr.splitlines())
        if m
    )


def dumpimage_fit(path: Path) -> dict[str, object]:
    """The parts of ``dumpimage -l`` output we compare: images, configurations, default."""
    out = run(["dumpimage", "-l", path]).stdout.decode()
    images: dict[str, dict[str, object]] = {}
    configs: dict[str, dict[str, object]] = {}
    result: dict[str, object] = {"images": images, "configs": configs, "raw": out}
    current: dict[str, object] | None = None
    for line in out.splitlines():
        if m := re.match(r"^ Image \d+ \((.+)\)$", line):
            current = images.setdefault(m.group(1), {"hashes": [], "signs": []})
        elif m := re.match(r"^ Configuration \d+ \((.+)\)$", line):
            current = configs.setdefault(m.group(1), {"hashes": [], "signs": []})
        elif m := re.match(r"^ Default Configuration: '(.+)'$", line):
            result["default"] = m.group(1)
        elif current is not None and (m := re.match(r"^  ([^:]+):\s*(.*)$", line)):
            key, value = m.group(1), m.group(2)
            if key == "Hash value":
                hashes = current["hashes"]
                assert isinstance(hashes, list)
                hashes.append(value)
            elif key == "Sign algo":
                signs = current["signs"]
                assert isinstance(signs, list)
                signs.append(value)
            else:
                current.setdefault(key, value)
    return result


def build_fit(tmp_path: Path, *args: str, its: str = ITS) -> Path:
    its_path = make_its(tmp_path, its)
    out = tmp_path / "image.itb"
    run(["mkimage", *args, "-f", its_path, out], cwd=tmp_path)
    return out


@pytest.mark.peer
@pytest.mark.parametrize(
    ("args", "location"),
    [((), "embedded"), (("-E",), "data-offset"), (("-E", "-p", "0x3000"), "data-position")],
)
def test_mkimage_fit_agrees_with_dumpimage(
    tmp_path: Path, args: tuple[str, ...], location: str
) -> None:
    need("mkimage", "dumpimage", "dtc")
    itb = build_fit(tmp_path, *args)
    f = inspect_fit(itb.read_bytes())
    assert f.valid, f.problems
    d = f.details
    assert d["hashes_ok"] is True
    assert d["description"] == "Cross-check FIT"
    assert d["external_data"] is (location != "embedded")
    info = dumpimage_fit(itb)
    types, comps, arches, oses = (mkimage_table(x) for x in ("-T", "-C", "-A", "-O"))
    dumped = info["images"]
    assert isinstance(dumped, dict)
    assert [i["name"] for i in d["images"]] == list(dumped) == ["kernel-1", "fdt-1", "ramdisk-1"]
    data = itb.read_bytes()
    for image, source in zip(d["images"], SIZES, strict=True):
        tool = dumped[image["name"]]
        assert image["data_location"] == location
        assert tool["Description"] == image["description"]
        assert tool["Type"] == types[image["type"]]
        assert tool["Compression"] == comps[image["compression"]]
        assert tool["Architecture"] == arches[image["arch"]]
        assert str(tool["Data Size"]).startswith(f"{image['data_size']} Bytes")
        if image["os"] is not None:
            assert tool["OS"] == oses[image["os"]]
        if image["load"] is not None:
            assert int(str(tool["Load Address"]), 16) == image["load"]
        if image["entry"] is not None:
            assert int(str(tool["Entry Point"]), 16) == image["entry"]
        assert tool["hashes"] == [h["value"] for h in image["hashes"]]
        assert all(h["ok"] is True for h in image["hashes"])
        payload = (tmp_path / source).read_bytes()
        assert image["data_size"] == len(payload)
        off = image["data_offset"]
        assert data[off : off + image["data_size"]] == payload
    if location == "data-position":
        assert d["images"][0]["data_offset"] == 0x3000
    algos = [h["algo"] for i in d["images"] for h in i["hashes"]]
    assert sorted(algos) == sorted(["crc32", "sha1", "md5", "sha256", "sha512", "sha384",
                                    "crc16-ccitt"])  # fmt: skip
    confs = d["configurations"]
    assert confs["default"] == info["default"] == "conf-1"
    tool_confs = info["configs"]
    assert isinstance(tool_confs, dict)
    for conf in confs["configs"]:
        tool = tool_confs[conf["name"]]
        assert tool["Kernel"] == conf["refs"]["kernel"][0]
        assert tool["FDT"] == conf["refs"]["fdt"][0]
        if "ramdisk" in conf["refs"]:
            assert tool["Init Ramdisk"] == conf["refs"]["ramdisk"][0]
    json.dumps(d)


@pytest.mark.peer
@pytest.mark.parametrize("args", [(), ("-E",)])
def test_flipped_data_byte_is_a_hash_mismatch_naming_the_image(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    need("mkimage", "dtc")
    itb = build_fit(tmp_path, *args)
    good = inspect_fit(itb.read_bytes())
    ramdisk = good.details["images"][2]
    data = bytearray(itb.read_bytes())
    data[ramdisk["data_offset"] + 777] ^= 0x01
    f = inspect_fit(bytes(data))
    assert f.details["hashes_ok"] is False
    assert not f.valid
    assert len(f.problems) == 2  # sha384 and crc16-ccitt of ramdisk-1
    assert all("image 'ramdisk-1'" in p and "mismatch" in p for p in f.problems)
    oks = {i["name"]: [h["ok"] for h in i["hashes"]] for i in f.details["images"]}
    assert oks == {"kernel-1": [True, True, True], "fdt-1": [True, True],
                   "ramdisk-1": [False, False]}  # fmt: skip


@pytest.mark.peer
def test_truncated_external_data_is_a_problem(tmp_path: Path) -> None:
    need("mkimage", "dtc")
    itb = build_fit(tmp_path, "-E")
    data = itb.read_bytes()
    f = inspect_fit(data[:-100])
    assert any("image 'ramdisk-1' data" in p and "beyond the end" in p for p in f.problems)
    assert f.details["hashes_ok"] is False


SIGNED_ITS = """/dts-v1/;
/ {
    description = "Signed FIT";
    #address-cells = <1>;
    images {
        kernel-1 {
            data = /incbin/("kernel.bin");
            type = "kernel"; arch = "arm"; os = "linux"; compression = "none";
            load = <0x80008000>; entry = <0x80008000>;
            hash-1 { algo = "sha256"; };
            signature-1 { algo = "sha256,rsa2048"; key-name-hint = "dev"; };
        };
        fdt-1 {
            data = /incbin/("board.dtb");
            type = "flat_dt"; arch = "arm"; compression = "none";
            hash-1 { algo = "sha256"; };
        };
    };
    configurations {
        default = "conf-1";
        conf-1 {
            kernel = "kernel-1";
            fdt = "fdt-1";
            signature-1 {
                algo = "sha256,rsa2048";
                key-name-hint = "dev";
                sign-images = "kernel", "fdt";
            };
        };
    };
};
"""


@pytest.mark.peer
def test_signed_fit_lists_its_signatures(tmp_path: Path) -> None:
    need("mkimage", "dumpimage", "dtc", "openssl")
    keys = tmp_path / "keys"
    keys.mkdir()
    run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
         "-out", keys / "dev.key"])  # fmt: skip
    run(["openssl", "req", "-batch", "-new", "-x509", "-key", keys / "dev.key", "-subj", "/CN=dev",
         "-out", keys / "dev.crt"])  # fmt: skip
    itb = build_fit(tmp_path, "-k", str(keys), its=SIGNED_ITS)
    f = inspect_fit(itb.read_bytes())
    assert f.valid, f.problems
    d = f.details
    assert d["hashes_ok"] is True
    assert d["signature_verified"] is False
    sigs = {s["where"]: s for s in d["signatures"]}
    assert set(sigs) == {"/images/kernel-1/signature-1", "/configurations/conf-1/signature-1"}
    for s in sigs.values():
        assert s["algo"] == "sha256,rsa2048"
        assert s["key_name_hint"] == "dev"
        assert s["signed"] is True
        assert s["signer_name"] == "mkimage"
    assert sigs["/configurations/conf-1/signature-1"]["sign_images"] == ["kernel", "fdt"]
    assert any("not verified" in w for w in f.warnings)
    info = dumpimage_fit(itb)
    images, configs = info["images"], info["configs"]
    assert isinstance(images, dict) and isinstance(configs, dict)
    assert images["kernel-1"]["signs"] == ["sha256,rsa2048:dev"]
    assert configs["conf-1"]["signs"] == ["sha256,rsa2048:dev"]


# --- round trips --------------------------------------------------------------------------------


def strip(node: Node) -> Node:
    name, props, children = node
    return (name, dict(props), [strip(c) for c in children])


def shape(node: fdt.FdtNode, tree: fdt.Fdt) -> Node:
    return (
        node.name,
        {k: tree.value(p, 1 << 20) for k, p in node.properties.items()},
        [shape(c, tree) for c in node.children],
    )


@given(root=trees(), rsv=st.lists(st.tuples(st.integers(1, 2**64 - 1), st.integers(0, 2**64 - 1)),
                                  max_size=3))  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_fdt_round_trip(root: Node, rsv: list[tuple[int, int]]) -> None:
    blob = build_fdt(root, rsv=rsv)
    tree = parse_fdt(blob)
    assert shape(tree.root, tree) == strip(root)
    assert tree.reservations == rsv
    assert tree.reservation_count == len(rsv)
    paths = [n.path for n in tree.walk()]
    assert paths[0] == "/"
    for path in paths:
        node = tree.node(path)
        assert node is not None and node.path == path


@given(root=trees(), inline=st.integers(0, 64))
@settings(max_examples=50, deadline=None)
def test_lazy_values_equal_inline_values(root: Node, inline: int) -> None:
    blob = build_fdt(root)
    a = parse_fdt(blob)
    b = fdt.parse(Source.from_bytes(blob), Context(limits=SMALL), inline_limit=inline)
    assert shape(a.root, a) == shape(b.root, b)


ALGOS = ["crc32", "md5", "sha1", "sha256", "sha384", "sha512"]

image_strategy = st.tuples(
    st.binary(max_size=3000),
    st.sampled_from(["kernel", "ramdisk", "flat_dt", "firmware"]),
    st.integers(0, 0xFFFFFFFF),
    st.lists(st.sampled_from(ALGOS), min_size=1, max_size=3),
)


@given(
    items=st.lists(image_strategy, min_size=1, max_size=4),
    external=st.booleans(),
)
@settings(max_examples=100, deadline=None)
def test_fit_round_trip(items: list[tuple[bytes, str, int, list[str]]], external: bool) -> None:
    images = [
        (f"img-{i}", data, {"type": cstr(typ), "load": u32(load)}, algos)
        for i, (data, typ, load, algos) in enumerate(items)
    ]
    configs = [("conf-1", {"kernel": cstr("img-0"), "fdt": cstr(*[n for n, *_ in images])})]
    blob = fit_blob(images, configs=configs, default="conf-1", external=external)
    sn = Sniff(head=blob[:65536], tail=blob[-64:], size=len(blob))
    assert fit.sniff(sn)
    f = inspect_fit(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["hashes_ok"] is True
    assert d["external_data"] is external
    for got, (name, data, _, algos) in zip(d["images"], images, strict=True):
        assert got["name"] == name
        assert got["data_size"] == len(data)
        assert blob[got["data_offset"] : got["data_offset"] + len(data)] == data
        assert [h["algo"] for h in got["hashes"]] == algos
        assert got["data_location"] == ("data-offset" if external else "embedded")
    assert [i["load"] for i in d["images"]] == [load for _, _, load, _ in items]
    conf = d["configurations"]["configs"][0]
    assert conf["refs"]["fdt"] == [n for n, *_ in images]


# --- fuzzing ------------------------------------------------------------------------------------


def fit_or_error(data: bytes) -> Findings | None:
    try:
        return inspect_fit(data)
    except ImageError:
        return None


@given(st.binary(max_size=1000))
@settings(max_examples=300, deadline=None)
def test_fuzz_random_bytes_after_magic(data: bytes) -> None:
    blob = struct.pack(">I", 0xD00DFEED) + data
    result = fit_or_error(blob)
    assert result is None or isinstance(json.dumps(result.details), str)
    with contextlib.suppress(ImageError):
        parse_fdt(blob)
    assert fdt.head_has_top_level_node(blob, "images") in (True, False)


@given(
    fields=st.lists(st.integers(0, 2**32 - 1), min_size=9, max_size=9),
    body=st.binary(max_size=400),
)
@settings(max_examples=300, deadline=None)
def test_fuzz_random_headers(fields: list[int], body: bytes) -> None:
    """Random header fields over a real tree: offsets and sizes pointing anywhere."""
    real = build_fdt(("", {"a": b"x"}, [("images", {}, [("k", {"data": body}, [])])]))
    blob = struct.pack(">I9I", 0xD00DFEED, *fields) + real[40:]
    result = fit_or_error(blob)
    assert result is None or isinstance(json.dumps(result.details), str)
    with pytest.raises(ImageError):
        parse_fdt(blob[:30])


VALID_FIT = fit_blob(
    [
        ("kernel", os.urandom(300), {"type": cstr("kernel")}, ["sha256"]),
        ("fdt", os.urandom(100), {"type": cstr("flat_dt")}, ["crc32"]),
    ],
    configs=[("c", {"kernel": cstr("kernel"), "fdt": cstr("fdt")})],
    default="c",
)


@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID_FIT) - 1), st.integers(1, 255)), max_size=5),
    cut=st.integers(0, len(VALID_FIT)),
    extra=st.binary(max_size=64),
)
@settings(max_examples=300, deadline=None)
def test_fuzz_mutations_of_a_valid_fit(
    flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    buf = bytearray(VALID_FIT)
    for pos, x in flips:
        buf[pos] ^= x
    mutated = bytes(buf[:cut]) + extra
    result = fit_or_error(mutated)
    if result is not None:
        json.dumps(result.details)
        assert isinstance(result.valid, bool)
    if mutated == VALID_FIT:
        assert result is not None and result.valid


# --- FDT edge cases -----------------------------------------------------------------------------

SIMPLE: Node = ("", {"p": b"v"}, [("child", {"q": u32(7)}, [])])


def tokens(*parts: bytes) -> bytes:
    return b"".join(parts)


def begin(name: str) -> bytes:
    return u32(1) + pad4(name.encode() + b"\0")


def prop(nameoff: int, value: bytes, length: int | None = None) -> bytes:
    return u32(3) + u32(len(value) if length is None else length) + u32(nameoff) + pad4(value)


END_NODE, NOP, END = u32(2), u32(4), u32(9)


def raw_fdt(struct_block: bytes, strings: bytes = b"p\0") -> bytes:
    return build_fdt(SIMPLE, raw_struct=struct_block, raw_strings=strings)


token_st = st.one_of(
    node_names.map(begin),
    st.just(END_NODE),
    st.just(NOP),
    st.just(END),
    st.tuples(st.integers(0, 40), st.binary(max_size=16), st.integers(0, 2**32 - 1)).map(
        lambda t: prop(t[0], t[1], t[2] if t[2] % 3 == 0 else None)
    ),
    st.integers(0, 2**32 - 1).map(u32),
    st.binary(max_size=7),
)


@given(
    stream=st.lists(token_st, max_size=40),
    strings=st.binary(max_size=40),
)
@settings(max_examples=400, deadline=None)
def test_fuzz_token_streams(stream: list[bytes], strings: bytes) -> None:
    """Structure-aware fuzzing: random token sequences with random lengths and name offsets."""
    blob = raw_fdt(b"".join(stream), strings=strings)
    try:
        tree = parse_fdt(blob)
    except ImageError as e:
        assert e.message
        return
    assert tree.node_count >= 1
    for node in tree.walk():
        for p in node.properties.values():
            assert len(tree.value(p, 1 << 20)) == p.size


def test_deep_nesting_is_refused() -> None:
    blob = raw_fdt(tokens(*[begin("n")] * 1000, *[END_NODE] * 1000, END))
    with pytest.raises(ImageError, match="nested deeper than 64 levels"):
        parse_fdt(blob)


def test_nesting_up_to_the_limit_is_fine() -> None:
    blob = raw_fdt(tokens(begin(""), *[begin("n")] * 63, *[END_NODE] * 64, END))
    tree = parse_fdt(blob)
    assert tree.node_count == 64
    assert tree.node("/" + "/".join(["n"] * 63)) is not None


def test_total_size_past_the_file_is_truncation() -> None:
    blob = build_fdt(SIMPLE)
    with pytest.raises(ImageError, match="FDT truncated"):
        parse_fdt(blob[:-3])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (1, 10, "total size 10 is smaller"),
        (2, 0x7FFFFFF0, "structure block"),
        (2, 58, "structure block"),  # not 4-aligned
        (3, 0xFFFFFF00, "strings block"),
        (4, 4, "reservation map offset"),
        (4, 44, "reservation map offset"),  # not 8-aligned
        (5, 15, "too old"),
        (6, 18, "newer than 17"),
        (9, 0xFFFFFFFF, "structure block"),
    ],
)
def test_bad_header_fields(field: int, value: int, message: str) -> None:
    blob = bytearray(build_fdt(SIMPLE))
    blob[field * 4 : field * 4 + 4] = u32(value)
    with pytest.raises(ImageError, match=message):
        parse_fdt(bytes(blob))


def test_wrong_magic() -> None:
    with pytest.raises(ImageError, match="not a flattened device tree"):
        parse_fdt(b"\0" * 100)


def test_version_16_header_without_struct_size() -> None:
    blob = bytearray(build_fdt(SIMPLE, version=16))
    tree = parse_fdt(bytes(blob))
    assert tree.header.version == 16
    assert tree.get_int(tree.root.children[0], "q") == 7


def test_unterminated_node_name() -> None:
    blob = raw_fdt(tokens(u32(1), b"abcdefgh"))
    with pytest.raises(ImageError, match="not NUL-terminated"):
        parse_fdt(blob)


def test_overlong_node_name() -> None:
    blob = raw_fdt(tokens(begin("x" * 2000), END_NODE, END))
    with pytest.raises(ImageError, match="longer than 1024"):
        parse_fdt(blob)


def test_property_name_outside_strings_block() -> None:
    blob = raw_fdt(tokens(begin(""), prop(1000, b"v"), END_NODE, END))
    with pytest.raises(ImageError, match="outside the strings block"):
        parse_fdt(blob)


def test_unterminated_property_name() -> None:
    blob = raw_fdt(tokens(begin(""), prop(0, b"v"), END_NODE, END), strings=b"abc")
    with pytest.raises(ImageError, match="not NUL-terminated"):
        parse_fdt(blob)


def test_property_longer_than_the_structure_block() -> None:
    blob = raw_fdt(tokens(begin(""), prop(0, b"v", length=0xFFFFFFF0), END_NODE, END))
    with pytest.raises(ImageError, match="past the end of the structure block"):
        parse_fdt(blob)


def test_missing_fdt_end() -> None:
    blob = raw_fdt(tokens(begin(""), END_NODE))
    with pytest.raises(ImageError, match="outside the block"):
        parse_fdt(blob)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (tokens(begin(""), u32(7), END_NODE, END), "unknown FDT token 0x00000007"),
        (tokens(END_NODE, END), "FDT_END_NODE without an open node"),
        (tokens(prop(0, b"v"), END), "property outside any node"),
        (tokens(begin(""), END_NODE, begin(""), END_NODE, END), "second root node"),
        (tokens(begin(""), END), "while node '/' is open"),
        (tokens(END), "no root node"),
    ],
)
def test_malformed_token_streams(block: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_fdt(raw_fdt(block))


def test_nops_are_skipped() -> None:
    blob = raw_fdt(tokens(NOP, begin(""), NOP, prop(0, b"v"), NOP, END_NODE, NOP, END))
    tree = parse_fdt(blob)
    assert tree.get_bytes(tree.root, "p") == b"v"


def test_endless_nops_hit_the_record_limit() -> None:
    blob = raw_fdt(tokens(begin(""), NOP * 5000, END_NODE, END))
    with pytest.raises(LimitError, match="more than 1000 FDT records"):
        parse_fdt(blob, Limits(max_records=1000))


def test_node_and_property_counts_are_bounded() -> None:
    blob = raw_fdt(
        tokens(begin(""), *[begin(f"n{i}") + END_NODE for i in range(20)], END_NODE, END)
    )
    assert parse_fdt(blob).node_count == 21
    with pytest.raises(LimitError, match="more than 10 nodes"):
        fdt.parse(Source.from_bytes(blob), Context(limits=SMALL), max_nodes=10)
    blob = raw_fdt(tokens(begin(""), *[prop(0, b"v")] * 20, END_NODE, END))
    with pytest.raises(LimitError, match="more than 10 properties"):
        fdt.parse(Source.from_bytes(blob), Context(limits=SMALL), max_properties=10)


def test_unterminated_reservation_map() -> None:
    blob = bytearray(build_fdt(SIMPLE))
    off_struct = struct.unpack_from(">I", blob, 8)[0]
    blob[40:off_struct] = b"\x01" * (off_struct - 40)
    with pytest.raises(ImageError, match="reservation map"):
        parse_fdt(bytes(blob))


def test_many_props_share_one_name_string() -> None:
    block = tokens(begin(""), *[prop(0, u32(i)) for i in range(50)], END_NODE, END)
    tree = parse_fdt(raw_fdt(block))
    assert tree.property_count == 50
    assert tree.get_int(tree.root, "p") == 0  # the first one wins, as in libfdt


def test_large_values_are_read_lazily_and_bounded() -> None:
    big = os.urandom(100_000)
    tree = parse_fdt(build_fdt(("", {"data": big, "n": b"\0\0\0"}, [])))
    p = tree.root.prop("data")
    assert p is not None and p.inline is None and p.size == len(big)
    assert tree.value(p, len(big)) == big
    with pytest.raises(ImageError, match="more than 4096 expected"):
        tree.value(p)
    with pytest.raises(ImageError, match="expected a 4 or 8 byte integer"):
        tree.get_int(tree.root, "n")
    assert tree.get_str(tree.root, "missing") is None
    assert tree.get_strings(tree.root, "n") == ["", "", ""]


def test_head_sniff_ignores_images_below_the_top_level() -> None:
    nested = build_fdt(("", {}, [("a", {}, [("images", {}, [])])]))
    top = build_fdt(("", {}, [("a", {}, []), ("images", {}, [])]))
    assert not fdt.head_has_top_level_node(nested, "images")
    assert fdt.head_has_top_level_node(top, "images")
    assert not fdt.head_has_top_level_node(top[:60], "images")
    assert not fdt.head_has_top_level_node(b"", "images")


# --- FIT edge cases -----------------------------------------------------------------------------


def one_image(algos: list[str] | None = None, **extra: bytes) -> bytes:
    return fit_blob(
        [("k", b"kernel data", {"type": cstr("kernel"), **extra}, algos or ["sha1"])],
        configs=[("c", {"kernel": cstr("k")})],
        default="c",
    )


def test_fit_is_detected() -> None:
    blob = one_image()
    assert detect(sniff_source(Source.from_bytes(blob))).name == "fit"
    assert inspect_source(Source.from_bytes(blob)).valid


def test_hash_mismatch_names_image_and_node() -> None:
    blob = one_image(["sha256"]).replace(b"kernel data", b"kernel DATA")
    f = inspect_fit(blob)
    assert f.details["hashes_ok"] is False
    assert f.problems == [
        f"image 'k' hash-1 (sha256) mismatch: stored {hashlib.sha256(b'kernel data').hexdigest()}"
        f", computed {hashlib.sha256(b'kernel DATA').hexdigest()}"
    ]


def test_hash_without_value_is_a_problem() -> None:
    root: Node = (
        "",
        {},
        [("images", {}, [("k", {"data": b"x"}, [("hash-1", {"algo": cstr("crc32")}, [])])])],
    )
    f = inspect_fit(build_fdt(root))
    assert f.problems == ["image 'k' hash-1 has no value (the FIT is unfinished)"]
    assert f.details["hashes_ok"] is False


def test_unknown_hash_algorithm_is_a_warning() -> None:
    root: Node = ("", {}, [("images", {}, [("k", {"data": b"x"}, [
        ("hash-1", {"algo": cstr("whirlpool"), "value": b"\0" * 64}, []),
    ])])])  # fmt: skip
    f = inspect_fit(build_fdt(root))
    assert f.valid
    assert f.details["hashes_ok"] is False
    assert any("'whirlpool' is not supported" in w for w in f.warnings)


def test_no_hash_nodes_leaves_hashes_ok_unknown() -> None:
    root: Node = ("", {}, [("images", {}, [("k", {"data": b"x"}, [])])])
    f = inspect_fit(build_fdt(root))
    assert f.valid
    assert f.details["hashes_ok"] is None
    assert any("no hash nodes" in w for w in f.warnings)
    assert any("has no hash node" in w for w in f.warnings)


def test_missing_referenced_image_is_a_problem() -> None:
    blob = fit_blob(
        [("k", b"x", {}, ["crc32"])],
        configs=[("c", {"kernel": cstr("k"), "fdt": cstr("fdt-9"), "ramdisk": cstr("rd")})],
        default="c",
    )
    f = inspect_fit(blob)
    assert f.problems == [
        "configuration 'c' fdt refers to missing image 'fdt-9'",
        "configuration 'c' ramdisk refers to missing image 'rd'",
    ]


def test_missing_default_configuration_is_a_problem() -> None:
    blob = fit_blob([("k", b"x", {}, ["crc32"])], configs=[("c", {})], default="nope")
    f = inspect_fit(blob)
    assert f.problems == ["default configuration 'nope' does not exist"]


def test_image_without_data_is_a_problem() -> None:
    root: Node = ("", {}, [("images", {}, [("k", {"type": cstr("kernel")}, [])])])
    f = inspect_fit(build_fdt(root))
    assert f.problems == ["image 'k' has no data (no data, data-offset or data-position)"]


def test_external_data_without_size_is_a_problem() -> None:
    root: Node = ("", {}, [("images", {}, [("k", {"data-offset": u32(0)}, [])])])
    f = inspect_fit(build_fdt(root))
    assert f.problems == ["image 'k' has external data but no data-size"]


def test_external_data_past_the_end_is_a_problem() -> None:
    root: Node = ("", {}, [("images", {}, [
        ("k", {"data-position": u32(0x100000), "data-size": u32(16)},
         [("hash-1", {"algo": cstr("crc32"), "value": u32(0)}, [])]),
    ])])  # fmt: skip
    f = inspect_fit(build_fdt(root))
    assert len(f.problems) == 1 and "is beyond the end of the file" in f.problems[0]
    assert f.details["images"][0]["hashes"][0]["ok"] is False


def test_overlapping_image_data_is_bounded() -> None:
    """Many image nodes pointing at the same range must not make hashing read it many times."""
    pos = 4096
    hashed: Node = ("hash-1", {"algo": cstr("crc32"), "value": u32(0)}, [])
    nodes: list[Node] = [
        (f"k{i}", {"data-position": u32(pos), "data-size": u32(60_000)}, [hashed])
        for i in range(40)
    ]
    blob = build_fdt(("", {}, [("images", {}, nodes)]))
    blob += bytes(pos - len(blob)) + os.urandom(60_000)
    with pytest.raises(LimitError, match="overlap"):
        inspect_fit(blob)


def test_empty_images_node_is_a_problem() -> None:
    f = inspect_fit(build_fdt(("", {}, [("images", {}, [])])))
    assert f.problems == ["FIT /images node is empty"]


def test_bad_load_property_is_a_problem() -> None:
    f = inspect_fit(one_image(load=b"\0\0\1"))
    assert any("load" in p and "4 or 8 byte integer" in p for p in f.problems)


def test_sixty_four_bit_load_address() -> None:
    f = inspect_fit(one_image(load=struct.pack(">Q", 0x1_0000_0000)))
    assert f.details["images"][0]["load"] == 0x1_0000_0000


def test_trailing_garbage_is_a_warning() -> None:
    f = inspect_fit(one_image() + b"\xff" * 100)
    assert f.valid
    assert f.warnings == ["100 bytes follow the FIT and its data"]


def test_cipher_node_is_reported() -> None:
    root: Node = ("", {}, [("images", {}, [("k", {"data": b"x"}, [
        ("hash-1", {"algo": cstr("crc32"), "value": u32(zlib.crc32(b"x"))}, []),
        ("cipher", {"algo": cstr("aes256"), "key-name-hint": cstr("k")}, []),
    ])])])  # fmt: skip
    f = inspect_fit(build_fdt(root))
    assert f.details["images"][0]["cipher"] == "aes256"
    assert any("encrypted" in w for w in f.warnings)


def test_fit_without_configurations_is_a_warning() -> None:
    root: Node = ("", {}, [("images", {}, [("k", {"data": b"x"}, [
        ("hash-1", {"algo": cstr("crc32"), "value": u32(zlib.crc32(b"x"))}, []),
    ])])])  # fmt: skip
    f = inspect_fit(build_fdt(root))
    assert f.valid
    assert f.details["configurations"] == {"default": None, "configs": []}
    assert "FIT has no /configurations node" in f.warnings
