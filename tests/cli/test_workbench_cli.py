"""The workbench commands end to end: probe, flash, log, backup, restore, rescue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workflow.conftest import Bench, make_bench
from unbrick.cli.main import main

pytestmark = pytest.mark.unit


@pytest.fixture
def cli_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bench]:
    b = make_bench(tmp_path, "router", name="r1")
    monkeypatch.setenv("UNBRICK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNBRICK_SIM_DIR", str(b.registry))
    try:
        yield b
    finally:
        b.close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def jsonl(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_probe_json(cli_bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "device", "probe", "sim://r1", "--json")
    assert code == 0
    obj = json.loads(out)
    assert obj["profile"] == "sim-router"
    ident = obj["identity"]
    assert ident["model"] == "SimRouter" and ident["firmware_version"] == "1.0.0"
    assert ident["storage"]["size_bytes"] == 8 << 20


def test_probe_of_a_missing_device_is_a_transport_error(
    cli_bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "device", "probe", "sim://nobody")
    assert code == 5 and err.count("\n") == 1 and "nobody" in err


def test_unknown_scheme_exit_2(cli_bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "device", "probe", "mtp://phone")
    assert code == 2 and "supported" in err


def test_dry_run_json_and_refusal_code(
    cli_bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    good = cli_bench.firmware("2.0.0")
    before = cli_bench.flash_digest()
    code, out, _ = run(capsys, "flash", "sim://r1", str(good), "--dry-run", "--json")
    assert code == 0
    plan = json.loads(out)["plan"]
    assert plan["ok"] and plan["target"]["region"] == "firmware"
    assert {c["id"] for c in plan["checks"]} >= {"image.integrity", "firmware.antirollback"}
    bad = cli_bench.firmware("2.0.0", model="Other", name="other.bin")
    code, out, _ = run(capsys, "flash", "sim://r1", str(bad), "--dry-run", "--json")
    assert code == 3 and not json.loads(out)["plan"]["ok"]
    assert cli_bench.flash_digest() == before


def test_flash_needs_confirmation(cli_bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    fw = cli_bench.firmware("2.0.0")
    before = cli_bench.flash_digest()
    code, _, err = run(capsys, "flash", "sim://r1", str(fw), "--json")
    assert code == 2 and "--yes" in err
    assert cli_bench.flash_digest() == before


def test_force_needs_a_reason(cli_bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    fw = cli_bench.firmware("2.0.0")
    code, _, err = run(capsys, "flash", "sim://r1", str(fw), "--force", "device.region", "--yes")
    assert code == 2 and "--reason" in err


def test_flash_json_events_then_log(
    cli_bench: Bench, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fw = cli_bench.firmware("2.0.0")
    code, out, err = run(capsys, "flash", "sim://r1", str(fw), "--yes", "--json")
    assert code == 0, err
    events = jsonl(out)
    kinds = {e["kind"] for e in events}
    assert {"step-start", "step-end", "progress", "state", "result"} <= kinds
    result = events[-1]
    assert result["kind"] == "result"
    data = result["data"]
    assert isinstance(data, dict) and data["outcome"] == "success"
    job = str(data["job"])
    fractions = [e["data"]["fraction"] for e in events if e["kind"] == "progress"]  # type: ignore[index]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    code, out, _ = run(capsys, "log")
    assert code == 0 and job in out and "success" in out
    code, out, _ = run(capsys, "log", job, "--json")
    lines = jsonl(out)
    assert any(line.get("name") == "write" for line in lines)
    md = tmp_path / "report.md"
    code, _, _ = run(capsys, "log", job, "--export", "markdown", "-o", str(md))
    text = md.read_text()
    assert code == 0 and "SimRouter" in text and "2.0.0" in text and "verify" in text


def test_backup_list_restore(cli_bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "backup", "sim://r1", "--json")
    assert code == 0, err
    backup_id = str(jsonl(out)[-1]["data"]["backup"])  # type: ignore[index]
    code, out, _ = run(capsys, "backups", "list", "--json")
    listed = json.loads(out)
    assert [b["id"] for b in listed] == [backup_id]
    fw = cli_bench.firmware("2.0.0")
    assert run(capsys, "flash", "sim://r1", str(fw), "--yes", "--json")[0] == 0
    assert cli_bench.device.firmware_version == "2.0.0"
    code, out, err = run(capsys, "restore", "sim://r1", backup_id[:8], "--yes", "--json")
    assert code == 0, err
    assert cli_bench.device.firmware_version == "1.0.0"


def test_resume_of_a_finished_job_is_exit_13(
    cli_bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    fw = cli_bench.firmware("2.0.0")
    code, out, _ = run(capsys, "flash", "sim://r1", str(fw), "--yes", "--json")
    job = str(jsonl(out)[-1]["data"]["job"])  # type: ignore[index]
    code, _, err = run(capsys, "resume", job)
    assert code == 13 and err.count("\n") == 1 and "already ended" in err
    code, _, err = run(capsys, "resume", "JNOSUCHJOB")
    assert code == 13


def test_rescue_non_interactive(
    cli_bench: Bench, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import unbrick.cli.rescue as rescue_mod

    monkeypatch.setattr(rescue_mod, "_stdin_is_tty", lambda: False)
    cli_bench.device.simulate_brick("soft")
    assert cli_bench.device.state == "bootloader"
    fw = cli_bench.firmware("2.0.0")
    symptoms = ["power=yes", "cause=during_update", "mode=uboot", "serial=prompt"]
    args = [a for s in symptoms for a in ("--symptom", s)]
    code, out, err = run(
        capsys, "rescue", "sim://r1", str(fw), "--family", "router", *args, "--yes", "--wait", "5"
    )
    assert code == 0, err
    assert "soft brick" in out.lower() or "soft brick" in err.lower()
    assert "# Repair report" in out and "success" in out
    assert "recovery mode" in err
    assert cli_bench.device.firmware_version == "2.0.0"


def test_rescue_times_out_waiting(
    cli_bench: Bench, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import unbrick.cli.rescue as rescue_mod

    monkeypatch.setattr(rescue_mod, "_stdin_is_tty", lambda: False)
    fw = cli_bench.firmware("2.0.0")
    code, _, err = run(
        capsys,
        "rescue",
        "sim://absent",
        str(fw),
        "--family",
        "router",
        "--symptom",
        "power=yes",
        "--wait",
        "0.5",
        "--yes",
    )
    assert code == 5 and "did not appear within 0.5 s" in err


def test_diagnose_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import unbrick.cli.diagnose as diag

    monkeypatch.setattr(diag, "_stdin_is_tty", lambda: False)
    code, out, _ = run(
        capsys,
        "diagnose",
        "--family",
        "router",
        "--symptom",
        "power=no",
        "--symptom",
        "power_checked=yes",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["class"] in ("hard", "hardware")


def test_backup_to_a_file_and_export(
    cli_bench: Bench, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "dump.bin"
    code, out, err = run(capsys, "backup", "sim://r1", "-o", str(out_file))
    assert code == 0, err
    assert f"written to {out_file}" in out
    size = cli_bench.device.config.geometry.size_bytes
    flash = b"".join(cli_bench.device.spi_read(o, 1 << 20) for o in range(0, size, 1 << 20))
    assert out_file.read_bytes() == flash
    assert out_file.stat().st_mode & 0o777 == 0o600
    code, out, _ = run(capsys, "backups", "list", "--json")
    backup_id = json.loads(out)[0]["id"]
    again = tmp_path / "again.bin"
    code, out, err = run(capsys, "backups", "export", backup_id[:8], "-o", str(again))
    assert code == 0, err
    assert again.read_bytes() == flash
    code, _, err = run(capsys, "backups", "export", "ffffffff", "-o", str(tmp_path / "x"))
    assert code == 2 and "no backup" in err and not (tmp_path / "x").exists()
