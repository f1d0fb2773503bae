"""The command line: JSON interface, exit codes, one-line refusals."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from unbrick.cli.main import main

pytestmark = pytest.mark.unit


def uimage(payload: bytes, name: str = "demo") -> bytes:
    fields = [0x27051956, 0, 0, len(payload), 0x8000, 0x8000, zlib.crc32(payload), 5, 2, 2, 0]
    hdr = struct.pack(">7I4B32s", *fields, name.encode())
    return hdr[:4] + struct.pack(">I", zlib.crc32(hdr)) + hdr[8:] + payload


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_has_the_promised_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "k.uimg"
    data = uimage(bytes(range(256)) * 40)
    f.write_bytes(data)
    code, out, err = run_cli(capsys, "image", "inspect", str(f), "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["format"] == "uimage"
    assert obj["size"] == len(data)
    assert obj["sha256"] == hashlib.sha256(data).hexdigest()
    assert obj["valid"] is True
    assert obj["problems"] == []
    assert obj["details"]["header_crc_ok"] is True
    assert obj["details"]["data_crc_ok"] is True


def test_inspect_invalid_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "k.uimg"
    data = bytearray(uimage(bytes(range(256)) * 40))
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "image", "inspect", str(f), "--json")
    assert code == 1
    obj = json.loads(out)
    assert obj["valid"] is False
    assert obj["details"]["data_crc_ok"] is False
    assert obj["problems"]


def test_missing_file_is_one_line_with_its_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "image", "inspect", str(tmp_path / "nope.bin"))
    assert code == 11
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("unbrick: error: ") and "nope.bin" in err


def test_usage_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "image", "inspect", "--bogus")
    assert code == 2
    assert err.count("\n") == 1 and "--bogus" in err


def test_sig_without_key_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"data")
    sig = tmp_path / "f.sig"
    sig.write_bytes(b"x")
    code, _, err = run_cli(capsys, "image", "verify", str(f), "--sig", str(sig))
    assert code == 2
    assert err.count("\n") == 1


def test_verify_sha256(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"firmware" * 1000)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    assert run_cli(capsys, "image", "verify", str(f), "--sha256", good)[0] == 0
    code, _, err = run_cli(capsys, "image", "verify", str(f), "--sha256", "0" * 64)
    assert code == 4
    assert err.startswith("unbrick: error: ") and err.count("\n") == 1


def test_verify_with_no_check_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"firmware")
    code, _, _ = run_cli(capsys, "image", "verify", str(f))
    assert code == 2


def test_convert_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.img"
    with open(raw, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(bytes(range(256)) * 4096)
    simg = tmp_path / "disk.simg"
    back = tmp_path / "back.img"
    assert run_cli(capsys, "image", "convert", str(raw), "-o", str(simg), "--to", "sparse")[0] == 0
    code, out, _ = run_cli(capsys, "image", "inspect", str(simg), "--json")
    assert code == 0 and json.loads(out)["format"] == "android-sparse"
    assert json.loads(out)["details"]["expanded_size"] == 4 << 20
    assert run_cli(capsys, "image", "convert", str(simg), "-o", str(back), "--to", "raw")[0] == 0
    assert back.read_bytes() == raw.read_bytes()
    assert not list(tmp_path.glob("*.part")), "temporary output left behind"


def test_convert_refuses_to_overwrite_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"x" * 8192)
    code, _, _ = run_cli(capsys, "image", "convert", str(raw), "-o", str(raw), "--to", "sparse")
    assert code == 2
    assert raw.read_bytes() == b"x" * 8192


def test_installed_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unbrick", "image", "formats"], capture_output=True, check=False
    )
    assert proc.returncode == 0
    assert b"android-sparse" in proc.stdout and b"uimage" in proc.stdout
