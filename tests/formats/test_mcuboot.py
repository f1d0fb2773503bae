"""MCUboot images: cross-checks with imgtool (sign, dumpinfo, verify), round trips, fuzzing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError
from unbrick.formats import mcuboot
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source
from unbrick.formats.detect import detect, sniff_source

SMALL = Limits(max_records=100_000, max_seconds=10.0)


def parse(blob: bytes) -> Findings:
    return mcuboot.inspect(Source.from_bytes(blob), Context(limits=SMALL))


# --- imgtool --------------------------------------------------------------------------------


def imgtool_path() -> str:
    beside = Path(sys.executable).parent / "imgtool"
    if beside.exists():
        return str(beside)
    need("imgtool")
    found = shutil.which("imgtool")
    assert found is not None
    return found


def imgtool(*args: str | Path, check: bool = True) -> tuple[int, str]:
    argv = [imgtool_path(), *map(str, args)]
    if check:
        proc = run(argv)
    else:
        proc = subprocess.run(argv, capture_output=True, check=False, timeout=120)
    return proc.returncode, (proc.stdout + proc.stderr).decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    imgtool_path()
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for kind in ("ed25519", "ecdsa-p256", "rsa-2048"):
        path = folder / f"{kind}.pem"
        imgtool("keygen", "-k", path, "-t", kind)
        out[kind] = path
    return out


def sign(tmp_path: Path, payload: bytes, *args: str | Path, name: str = "out.bin") -> Path:
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    out = tmp_path / name
    imgtool("sign", "--header-size", "0x200", "--pad-header", "--align", "8",
            "--slot-size", "0x20000", *args, src, out)  # fmt: skip
    return out


def dumpinfo(path: Path) -> dict[str, object]:
    _, out = imgtool("dumpinfo", "--format", "json", path)
    info = json.loads(out[out.index("{") :])
    assert isinstance(info, dict)
    return info


def tlv_view(tlvs: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(t["type"], t["len"]) for t in tlvs]


SIGNATURE_TLV = {"ed25519": "ED25519", "ecdsa-p256": "ECDSA_SIG", "rsa-2048": "RSA2048_PSS"}


@pytest.mark.peer
@pytest.mark.parametrize("key", ["ed25519", "ecdsa-p256", "rsa-2048", None])
@pytest.mark.parametrize("counter", [None, "7"])
def test_imgtool_images_agree_with_dumpinfo_and_verify(
    tmp_path: Path, keys: dict[str, Path], key: str | None, counter: str | None
) -> None:
    payload = os.urandom(5000)
    args: list[str | Path] = ["--version", "1.2.3+4"]
    if key:
        args += ["--key", keys[key]]
    if counter:
        args += ["--security-counter", counter]
    out = sign(tmp_path, payload, *args)
    blob = out.read_bytes()
    assert detect(sniff_source(Source.from_bytes(blob))).name == "mcuboot"
    f = parse(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["hash_ok"] is True
    assert d["version"] == "1.2.3+4"
    assert d["signature_types"] == ([SIGNATURE_TLV[key]] if key else [])
    assert blob[d["header"]["hdr_size"] :][: len(payload)] == payload

    info = dumpinfo(out)
    header = info["header"]
    assert isinstance(header, dict)
    ours = d["header"]
    assert header["magic"] == mcuboot.IMAGE_MAGIC
    assert header["load_addr"] == ours["load_addr"]
    assert header["hdr_size"] == ours["hdr_size"] == 0x200
    assert header["protected_tlv_size"] == ours["protect_tlv_size"]
    assert header["img_size"] == ours["img_size"] == len(payload)
    assert header["flags"] == ours["flags"]
    assert header["version"] == d["version"]
    area = info["tlv_area"]
    assert isinstance(area, dict)
    tool_tlvs = area["tlvs_prot"] + area["tlvs"]
    assert [(t["type"], t["length"]) for t in d["tlvs"]] == tlv_view(tool_tlvs)
    for mine, theirs in zip(d["tlvs"], tool_tlvs, strict=True):
        assert mine["type_name"] == theirs["type_name"].replace("ECDSASIG", "ECDSA_SIG").replace(
            "RSA2048", "RSA2048_PSS"
        )
        assert blob[mine["offset"] : mine["offset"] + mine["length"]].hex() == theirs["data"]
    if counter:
        assert d["security_counter"] == 7
    else:
        assert "security_counter" not in d

    verify = ["verify", *(["-k", keys[key]] if key else []), out]
    rc, text = imgtool(*verify, check=False)
    assert rc == 0 and "Image was correctly validated" in text
    assert d["hash_algorithm"] == "sha256"
    assert hashlib.sha256(blob[: 0x200 + len(payload) + ours["protect_tlv_size"]]).hexdigest() in (
        text
    )

    corrupt = bytearray(blob)
    corrupt[0x200 + 4321] ^= 0x10
    out.write_bytes(corrupt)
    rc, text = imgtool(*verify, check=False)
    assert rc != 0 and "invalid hash" in text
    bad = parse(bytes(corrupt))
    assert bad.details["hash_ok"] is False
    assert len(bad.problems) == 1 and bad.problems[0].startswith("image hash mismatch (SHA256)")


@pytest.mark.peer
@pytest.mark.parametrize("sha", ["384", "512"])
def test_unsigned_images_with_other_hashes(tmp_path: Path, sha: str) -> None:
    out = sign(tmp_path, os.urandom(1000), "--version", "2.0.0", "--sha", sha)
    f = parse(out.read_bytes())
    assert f.valid and f.details["hash_ok"] is True
    assert f.details["hash_algorithm"] == f"sha{sha}"
    rc, text = imgtool("verify", out, check=False)
    assert rc == 0, text


@pytest.mark.peer
def test_protected_tlvs_are_hashed(tmp_path: Path, keys: dict[str, Path]) -> None:
    out = sign(
        tmp_path, os.urandom(3000), "--version", "3.4.5+6", "--key", keys["ed25519"],
        "--security-counter", "auto", "--boot-record", "SPE", "--dependencies", "(1, 1.2.3+0)",
        "--custom-tlv", "0xa0", "0x12345678",
    )  # fmt: skip
    blob = out.read_bytes()
    f = parse(blob)
    assert f.valid, f.problems
    d = f.details
    prot = [t["type_name"] for t in d["tlvs"] if t["area"] == "protected"]
    assert prot == ["SEC_CNT", "BOOT_RECORD", "DEPENDENCY", "UNKNOWN"]
    assert d["security_counter"] == (3 << 24) | (4 << 16) | 5
    info = dumpinfo(out)
    assert info["header"]["protected_tlv_size"] == d["header"]["protect_tlv_size"] > 0  # type: ignore[index]
    # A change in the protected area breaks the hash, as imgtool verify agrees.
    sec = next(t for t in d["tlvs"] if t["type_name"] == "SEC_CNT")
    corrupt = bytearray(blob)
    corrupt[sec["offset"]] ^= 1
    out.write_bytes(corrupt)
    rc, text = imgtool("verify", "-k", keys["ed25519"], out, check=False)
    assert rc != 0 and "invalid hash" in text
    assert parse(bytes(corrupt)).details["hash_ok"] is False


@pytest.mark.peer
def test_padded_slot_with_trailer(tmp_path: Path, keys: dict[str, Path]) -> None:
    out = sign(tmp_path, os.urandom(2000), "--version", "1.0.0", "--key", keys["ecdsa-p256"],
               "--pad", "--confirm", "--public-key-format", "full")  # fmt: skip
    blob = out.read_bytes()
    assert len(blob) == 0x20000
    f = parse(blob)
    assert f.valid
    d = f.details
    assert d["trailer_magic"] is True
    assert d["trailing_size"] == len(blob) - d["tlv_end"]
    assert "PUBKEY" in [t["type_name"] for t in d["tlvs"]]
    info = dumpinfo(out)
    assert info["trailer"]["image_ok"] == 1  # type: ignore[index]


@pytest.mark.peer
def test_input_with_room_for_the_header(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Without --pad-header imgtool writes the header over the first 0x200 (zero) bytes."""
    body = os.urandom(777)
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(0x200) + body)
    out = tmp_path / "out.bin"
    imgtool("sign", "--key", keys["ed25519"], "--header-size", "0x200", "--align", "8",
            "--version", "1.2.3+4", "--slot-size", "0x10000", src, out)  # fmt: skip
    f = parse(out.read_bytes())
    assert f.valid and f.details["hash_ok"] is True
    assert f.details["header"]["img_size"] == len(body)
    rc, text = imgtool("verify", "-k", keys["ed25519"], out, check=False)
    assert rc == 0, text


@pytest.mark.peer
def test_flags_from_imgtool(tmp_path: Path) -> None:
    out = sign(tmp_path, os.urandom(100), "--version", "1.0.0", "--load-addr", "0x20000000",
               "--non-bootable")  # fmt: skip
    d = parse(out.read_bytes()).details
    assert d["header"]["load_addr"] == 0x20000000
    assert d["header"]["flag_names"] == ["NON_BOOTABLE", "RAM_LOAD"]
    assert dumpinfo(out)["header"]["flags"] == d["header"]["flags"]  # type: ignore[index]


@pytest.mark.peer
def test_big_endian_image(tmp_path: Path, keys: dict[str, Path]) -> None:
    out = sign(tmp_path, os.urandom(1500), "--version", "9.8.7+65536", "--key",
               keys["rsa-2048"], "--endian", "big", "--security-counter", "42")  # fmt: skip
    blob = out.read_bytes()
    assert blob[:4] == bytes.fromhex("96f3b83d")
    f = parse(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["endian"] == "big"
    assert d["version"] == "9.8.7+65536"
    assert d["hash_ok"] is True
    assert d["signature_types"] == ["RSA2048_PSS"]
    assert d["security_counter"] == 42


@pytest.mark.peer
def test_encrypted_image_hash_cannot_be_checked(tmp_path: Path, keys: dict[str, Path]) -> None:
    _, pub = imgtool("getpub", "-k", keys["ecdsa-p256"], "-e", "pem")
    (tmp_path / "pub.pem").write_text(pub)
    out = sign(tmp_path, os.urandom(1000), "--version", "1.0.0", "--key", keys["ecdsa-p256"],
               "-E", tmp_path / "pub.pem")  # fmt: skip
    f = parse(out.read_bytes())
    assert f.valid
    assert f.details["hash_ok"] is None
    assert "ENCRYPTED_AES128" in f.details["header"]["flag_names"]
    assert "ENC_EC256" in [t["type_name"] for t in f.details["tlvs"]]
    assert any("encrypted" in w for w in f.warnings)


# --- a builder from MCUboot's design document ---------------------------------------------------

HASHES = {0x10: "sha256", 0x11: "sha384", 0x12: "sha512"}


def build(
    payload: bytes,
    *,
    version: tuple[int, int, int, int] = (1, 2, 3, 4),
    hdr_size: int = 0x20,
    load_addr: int = 0,
    flags: int = 0,
    prot: list[tuple[int, bytes]] | None = None,
    extra: list[tuple[int, bytes]] | None = None,
    hash_kind: int | None = 0x10,
    endian: str = "<",
    corrupt_hash: bool = False,
) -> bytes:
    def tlv(kind: int, value: bytes) -> bytes:
        return struct.pack(endian + "HH", kind, len(value)) + value

    prot_area = b""
    if prot:
        body = b"".join(tlv(k, v) for k, v in prot)
        prot_area = struct.pack(endian + "HH", 0x6908, 4 + len(body)) + body
    major, minor, rev, build_no = version
    header = struct.pack(
        endian + "IIHHIIBBHII", 0x96F3B83D, load_addr, hdr_size, len(prot_area), len(payload),
        flags, major, minor, rev, build_no, 0,
    )  # fmt: skip
    image = header + bytes(hdr_size - 32) + payload
    tlvs = []
    if hash_kind is not None:
        digest = hashlib.new(HASHES[hash_kind], image + prot_area).digest()
        if corrupt_hash:
            digest = bytes([digest[0] ^ 1]) + digest[1:]
        tlvs.append(tlv(hash_kind, digest))
    tlvs += [tlv(k, v) for k, v in (extra or [])]
    body = b"".join(tlvs)
    return image + prot_area + struct.pack(endian + "HH", 0x6907, 4 + len(body)) + body


@given(
    payload=st.binary(max_size=2000),
    version=st.tuples(
        st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)
    ),
    hdr_size=st.integers(32, 600),
    load_addr=st.integers(0, 2**32 - 1),
    counter=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    hash_kind=st.sampled_from([0x10, 0x11, 0x12]),
    endian=st.sampled_from(["<", ">"]),
    sig=st.sampled_from([0x20, 0x22, 0x23, 0x24]),
)
@settings(max_examples=150, deadline=None)
def test_round_trip(
    payload: bytes,
    version: tuple[int, int, int, int],
    hdr_size: int,
    load_addr: int,
    counter: int | None,
    hash_kind: int,
    endian: str,
    sig: int,
) -> None:
    prot = None if counter is None else [(0x50, struct.pack(endian + "I", counter))]
    blob = build(
        payload, version=version, hdr_size=hdr_size, load_addr=load_addr, prot=prot,
        hash_kind=hash_kind, endian=endian, extra=[(0x01, b"k" * 32), (sig, b"s" * 64)],
    )  # fmt: skip
    assert mcuboot.sniff(Sniff(head=blob[:65536], tail=blob[-64:], size=len(blob)))
    f = parse(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["version"] == "{}.{}.{}+{}".format(*version)
    assert d["header"]["hdr_size"] == hdr_size
    assert d["header"]["img_size"] == len(payload)
    assert d["header"]["load_addr"] == load_addr
    assert d["hash_ok"] is True
    assert d["hash_algorithm"] == HASHES[hash_kind]
    assert d["signature_types"] == [mcuboot.TLV_NAMES[sig]]
    assert d["key_hash"] == (b"k" * 32).hex()
    assert d.get("security_counter") == counter
    assert d["endian"] == ("little" if endian == "<" else "big")


# --- fuzzing ------------------------------------------------------------------------------------


def parse_or_error(blob: bytes) -> Findings | None:
    try:
        return parse(blob)
    except ImageError:
        return None


@given(st.binary(max_size=600), st.booleans())
@settings(max_examples=300, deadline=None)
def test_fuzz_random(data: bytes, big: bool) -> None:
    blob = struct.pack(">I" if big else "<I", 0x96F3B83D) + data
    result = parse_or_error(blob)
    assert result is None or isinstance(json.dumps(result.details), str)
    assert mcuboot.sniff(Sniff(head=data, tail=b"", size=len(data))) in (True, False)


VALID = build(os.urandom(300), prot=[(0x50, b"\1\0\0\0")], extra=[(0x24, os.urandom(64))])


@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, len(VALID)),
    extra=st.binary(max_size=32),
)
@settings(max_examples=300, deadline=None)
def test_fuzz_mutations(flips: list[tuple[int, int]], cut: int, extra: bytes) -> None:
    buf = bytearray(VALID)
    for pos, x in flips:
        buf[pos] ^= x
    mutated = bytes(buf[:cut]) + extra
    result = parse_or_error(mutated)
    if result is not None:
        json.dumps(result.details)
        # A change inside the hashed region (header, image, protected TLVs) must be caught.
        hashed = len(VALID) - (4 + 36 + 68)
        if mutated[:hashed] != VALID[:hashed]:
            assert result.details["hash_ok"] is not True


# --- edge cases ---------------------------------------------------------------------------------


def test_missing_hash_tlv_is_a_problem() -> None:
    f = parse(build(b"abc", hash_kind=None, extra=[(0x24, b"s" * 64)]))
    assert f.problems == ["no hash TLV (SHA256/SHA384/SHA512) in the TLV area"]
    assert f.details["hash_ok"] is False


def test_hash_mismatch_is_a_problem() -> None:
    f = parse(build(b"abc", corrupt_hash=True))
    assert f.details["hash_ok"] is False
    assert f.problems[0].startswith("image hash mismatch (SHA256): stored ")


def test_hash_tlv_of_wrong_length_is_a_problem() -> None:
    f = parse(build(b"abc", hash_kind=None, extra=[(0x10, b"short")]))
    assert f.problems == ["SHA256 TLV is 5 bytes, expected 32"]
    assert f.details["hash_ok"] is False


def test_hash_tlv_in_the_protected_area_does_not_count() -> None:
    digest = hashlib.sha256(b"whatever").digest()
    f = parse(build(b"abc", hash_kind=None, prot=[(0x10, digest)]))
    assert f.problems == ["no hash TLV (SHA256/SHA384/SHA512) in the TLV area"]


def test_truncated_image_is_a_problem() -> None:
    blob = build(os.urandom(1000))
    f = parse(blob[:500])
    assert f.details["hash_ok"] is False
    assert f.problems == ["image truncated: header says 32 + 1000 bytes, file has 500"]


def test_no_tlv_area_is_a_problem() -> None:
    blob = build(b"abcd")
    f = parse(blob[: 32 + 4])
    assert f.problems == ["no TLV area (magic 0x6907) at offset 36: the image is not signed/hashed"]


def test_declared_protected_area_must_exist() -> None:
    blob = bytearray(build(b"abcd"))
    struct.pack_into("<H", blob, 10, 12)
    with pytest.raises(ImageError, match="magic 0x6908 is not at offset 36"):
        parse(bytes(blob))


def test_protected_area_size_must_match_the_header() -> None:
    blob = bytearray(build(b"abcd", prot=[(0x50, b"\0\0\0\0")]))
    struct.pack_into("<H", blob, 10, 16)
    with pytest.raises(ImageError, match="is 12 bytes, header says 16"):
        parse(bytes(blob))


def test_undeclared_protected_area_is_an_error() -> None:
    blob = bytearray(build(b"abcd", prot=[(0x50, b"\0\0\0\0")]))
    struct.pack_into("<H", blob, 10, 0)
    with pytest.raises(ImageError, match="header declares none"):
        parse(bytes(blob))


def test_tlv_overrunning_its_area_is_an_error() -> None:
    blob = bytearray(build(b"abcd", extra=[(0x24, b"s" * 64)]))
    struct.pack_into("<H", blob, len(blob) - 64 - 2, 1000)
    with pytest.raises(ImageError, match="claims 1000 bytes, past the area end"):
        parse(bytes(blob))


def test_tlv_area_past_the_end_of_the_file_is_an_error() -> None:
    blob = build(b"abcd")
    with pytest.raises(ImageError, match="runs past the end of the file"):
        parse(blob[:-5])


def test_tlv_area_with_impossible_size_is_an_error() -> None:
    blob = bytearray(build(b"abcd"))
    struct.pack_into("<H", blob, 32 + 4 + 2, 2)
    with pytest.raises(ImageError, match="has size 2"):
        parse(bytes(blob))


def test_tlv_header_crossing_the_area_end_is_an_error() -> None:
    blob = build(b"abcd") + b"\0\0"
    blob = bytearray(blob)
    struct.pack_into("<H", blob, 32 + 4 + 2, 4 + 36 + 2)
    with pytest.raises(ImageError, match="crosses its area end"):
        parse(bytes(blob))


def test_small_header_size_is_an_error() -> None:
    blob = bytearray(build(b"abcd"))
    struct.pack_into("<H", blob, 8, 16)
    assert not mcuboot.sniff(Sniff(head=bytes(blob), tail=b"", size=len(blob)))
    with pytest.raises(ImageError, match="header size 16 is smaller than 32"):
        parse(bytes(blob))


def test_wrong_magic_is_an_error() -> None:
    with pytest.raises(ImageError, match="magic missing"):
        parse(bytes(64))


def test_security_counter_of_wrong_length_is_a_problem() -> None:
    f = parse(build(b"abcd", prot=[(0x50, b"\1\2")]))
    assert f.problems == ["security counter TLV is 2 bytes, expected 4"]


def test_encrypted_flag_makes_the_hash_unverifiable() -> None:
    f = parse(build(b"abcd", flags=0x4, corrupt_hash=True))
    assert f.valid
    assert f.details["hash_ok"] is None
    assert f.details["header"]["flag_names"] == ["ENCRYPTED_AES128"]


def test_pure_signature_without_hash_is_a_warning() -> None:
    f = parse(build(b"abcd", hash_kind=None, extra=[(0x25, b"\1"), (0x24, b"s" * 64)]))
    assert f.valid
    assert f.details["hash_ok"] is None
    assert any("pure signature" in w for w in f.warnings)


def test_unknown_tlv_and_large_values() -> None:
    f = parse(build(b"abcd", extra=[(0x1234, b"v" * 10), (0x02, b"p" * 300)]))
    assert f.valid
    tlvs = {t["type"]: t for t in f.details["tlvs"]}
    assert tlvs[0x1234]["type_name"] == "UNKNOWN" and tlvs[0x1234]["value"] == (b"v" * 10).hex()
    assert tlvs[0x02]["type_name"] == "PUBKEY" and "value" not in tlvs[0x02]


def test_trailer_magic_detection() -> None:
    blob = build(b"abcd")
    padded = blob + b"\xff" * 100 + mcuboot.BOOT_MAGIC
    f = parse(padded)
    assert f.details["trailer_magic"] is True
    assert f.details["trailing_size"] == 116
    assert parse(blob + b"\xff" * 20).details["trailer_magic"] is False


def test_payload_format_is_detected() -> None:
    inner = struct.pack(">7I4B32s", 0x27051956, 0, 0, 0, 0, 0, 0, 5, 2, 2, 0, b"")
    inner = inner[:4] + struct.pack(">I", zlib.crc32(inner)) + inner[8:]
    assert parse(build(inner)).details["payload_format"] == "uimage"
