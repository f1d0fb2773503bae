"""The flash model: NOR and NAND semantics, persistence, bounds, power cuts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbrick.errors import DeviceError, SourceError
from unbrick.sim.flash import MAX_OP_BYTES, Flash, FlashGeometry, PowerLoss

pytestmark = pytest.mark.unit

NOR = FlashGeometry(type="nor", size_bytes=256 * 1024, erase_block_bytes=4096)
NAND = FlashGeometry(
    type="nand",
    size_bytes=64 * 2048 * 8,
    erase_block_bytes=64 * 2048,
    page_bytes=2048,
    bad_blocks=(3,),
)


def test_a_new_chip_is_erased_and_has_its_size(tmp_path: Path) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f:
        assert f.read(0, 4096) == b"\xff" * 4096
    assert (tmp_path / "f.bin").stat().st_size == NOR.size_bytes


def test_program_only_clears_bits(tmp_path: Path) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f:
        f.program(100, b"\xf0\x0f\xaa")
        f.program(100, b"\x0f\xff\x55")
        # Programming over data that was not erased ANDs it: silent corruption, like NOR.
        assert f.read(100, 3) == b"\x00\x0f\x00"
        f.erase(0, 4096)
        assert f.read(100, 3) == b"\xff\xff\xff"
        f.program(100, b"\x12\x34\x56")
        assert f.read(100, 3) == b"\x12\x34\x56"


def test_reprogramming_the_same_data_is_harmless(tmp_path: Path) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f:
        f.program(0, b"same data")
        f.program(0, b"same data")
        assert f.read(0, 9) == b"same data"


@pytest.mark.parametrize(("offset", "length"), [(1, 4096), (0, 4095), (4096, 100), (2048, 4096)])
def test_unaligned_erase_is_refused_and_changes_nothing(
    tmp_path: Path, offset: int, length: int
) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f:
        f.program(0, b"\x00" * 8192)
        with pytest.raises(DeviceError, match="not aligned to the 4096-byte erase block"):
            f.erase(offset, length)
        assert f.read(0, 8192) == b"\x00" * 8192
        assert f.ops == 1


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("read", (NOR.size_bytes - 10, 11)),
        ("read", (-1, 1)),
        ("erase", (NOR.size_bytes, 4096)),
        ("program", (NOR.size_bytes - 1, b"ab")),
    ],
)
def test_out_of_range_operations_are_refused(
    tmp_path: Path, op: str, args: tuple[object, ...]
) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f, pytest.raises(DeviceError, match="outside the flash"):
        getattr(f, op)(*args)


def test_operation_sizes_are_bounded(tmp_path: Path) -> None:
    geo = FlashGeometry(type="nor", size_bytes=8 * 1024 * 1024, erase_block_bytes=65536)
    with Flash(tmp_path / "f.bin", geo) as f:
        with pytest.raises(DeviceError, match="exceeds"):
            f.read(0, MAX_OP_BYTES + 1)
        with pytest.raises(DeviceError, match="exceeds"):
            f.program(0, bytes(MAX_OP_BYTES + 1))


def test_contents_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with Flash(path, NOR) as f:
        f.program(5000, b"persistent")
    with Flash(path, NOR) as f:
        assert f.read(5000, 10) == b"persistent"


def test_a_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"\xff" * 1000)
    with pytest.raises(SourceError, match="holds 1000 bytes"):
        Flash(path, NOR)


def test_device_hash_equals_hashlib(tmp_path: Path) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f:
        f.program(1000, bytes(range(256)) * 10)
        want = hashlib.sha256(f.read(0, NOR.size_bytes)).hexdigest()
        assert f.hash(0, NOR.size_bytes) == want
        assert f.hash(1000, 2560, "md5") == hashlib.md5(bytes(range(256)) * 10).hexdigest()
        with pytest.raises(DeviceError, match="unsupported hash"):
            f.hash(0, 1, "crc99")


def test_geometry_is_validated() -> None:
    with pytest.raises(DeviceError, match="multiple of the erase block"):
        FlashGeometry(type="nor", size_bytes=10000, erase_block_bytes=4096)
    with pytest.raises(DeviceError, match="only NAND"):
        FlashGeometry(type="nor", size_bytes=8192, erase_block_bytes=4096, bad_blocks=(1,))
    with pytest.raises(DeviceError, match="unknown flash type"):
        FlashGeometry(type="tape", size_bytes=8192, erase_block_bytes=4096)
    assert FlashGeometry.from_dict(NAND.to_dict()) == NAND


# -- NAND ----------------------------------------------------------------------------------


def test_nand_programs_whole_pages_once_per_erase(tmp_path: Path) -> None:
    page = NAND.page_bytes
    with Flash(tmp_path / "n.bin", NAND) as f:
        with pytest.raises(DeviceError, match="not aligned to the 2048-byte page"):
            f.program(0, b"x" * 100)
        with pytest.raises(DeviceError, match="not aligned"):
            f.program(10, b"x" * page)
        f.program(0, b"a" * page)
        with pytest.raises(DeviceError, match="already programmed since its last erase"):
            f.program(0, b"\x00" * page)
        f.program(0, b"a" * page)  # the same data again: a retried transfer is harmless
        f.erase(0, NAND.erase_block_bytes)
        f.program(0, b"\x00" * page)
        assert f.read(0, page) == b"\x00" * page


def test_nand_bad_blocks_refuse_erase_and_program(tmp_path: Path) -> None:
    eb = NAND.erase_block_bytes
    with Flash(tmp_path / "n.bin", NAND) as f:
        with pytest.raises(DeviceError, match=r"NAND block 3 \(offset 0x60000\) is bad"):
            f.erase(3 * eb, eb)
        with pytest.raises(DeviceError, match="NAND block 3"):
            f.erase(0, 8 * eb)  # a range that covers the bad block
        with pytest.raises(DeviceError, match="NAND block 3"):
            f.program(3 * eb + NAND.page_bytes, b"z" * NAND.page_bytes)
        assert f.read(3 * eb, 16) == b"\xff" * 16
        f.erase(4 * eb, eb)  # the good neighbours work
        f.program(4 * eb, b"k" * NAND.page_bytes)
        assert f.read(4 * eb, 4) == b"kkkk"


# -- power cuts ----------------------------------------------------------------------------


def test_power_cut_applies_the_nth_operation_partly(tmp_path: Path) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f:
        f.arm_power_cut(2)
        f.program(0, b"\x00" * 100)  # operation 1: whole
        with pytest.raises(PowerLoss):
            f.program(4096, b"\x00" * 100)  # operation 2: half, then power is lost
        assert f.read(4096, 100) == b"\x00" * 50 + b"\xff" * 50
        assert not f.power_cut_armed
        f.program(8192, b"\x00" * 10)  # disarmed after it struck once
        assert f.ops == 3


def test_power_cut_during_erase_erases_half(tmp_path: Path) -> None:
    with Flash(tmp_path / "f.bin", NOR) as f:
        f.program(0, b"\x00" * 8192)
        f.arm_power_cut(1)
        with pytest.raises(PowerLoss):
            f.erase(0, 8192)
        assert f.read(0, 8192) == b"\xff" * 4096 + b"\x00" * 4096


# -- model-based property test ----------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("erase"), st.integers(0, 63), st.integers(1, 4)),
        st.tuples(
            st.just("program"),
            st.integers(0, NOR.size_bytes - 300),
            st.binary(min_size=1, max_size=300),
        ),
    ),
    max_size=30,
)


@given(ops=_ops)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_nor_matches_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, object]]
) -> None:
    path = tmp_path_factory.mktemp("nor") / "f.bin"
    model = bytearray(b"\xff" * NOR.size_bytes)
    eb = NOR.erase_block_bytes
    with Flash(path, NOR) as f:
        for op, a, b in ops:
            if op == "erase":
                assert isinstance(b, int)
                start, n = a * eb, min(b, 64 - a) * eb
                f.erase(start, n)
                model[start : start + n] = b"\xff" * n
            else:
                assert isinstance(b, bytes)
                f.program(a, b)
                for i, byte in enumerate(b):
                    model[a + i] &= byte
        assert f.read(0, NOR.size_bytes) == bytes(model)
