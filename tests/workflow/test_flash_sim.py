"""The flash workflow end to end against a simulated router over loopback."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.workflow.conftest import Bench, IntegrityRequest, make_bench
from unbrick.engine.events import Event, FanOut
from unbrick.errors import (
    IntegrityError,
    PreflightError,
    RolledBack,
    SignatureError,
    TransportError,
    UnbrickError,
    UsageError,
)

pytestmark = pytest.mark.unit


def test_flash_happy_path(bench: Bench) -> None:
    fw = bench.firmware("2.0.0")
    before = bench.flash_bytes()
    wb = bench.workbench()
    result = wb.flash(bench.uri, bench.request(fw))
    assert result.outcome == "success"
    assert result.boot is not None and result.boot.firmware_version == "2.0.0"
    after = bench.flash_bytes()
    data = fw.read_bytes()
    assert after[0x80000 : 0x80000 + len(data)] == data
    # Only the firmware region changed: bootloader, env, calibration are untouched.
    assert after[:0x80000] == before[:0x80000]
    assert bench.device.state == "firmware" and bench.device.firmware_version == "2.0.0"
    steps = [s.name for s in wb.store.steps(result.job_id)]
    assert steps[:3] == ["preflight", "enter-recovery", "backup"]
    assert steps[-5:] == ["write", "verify", "reboot", "validate", "commit"]
    assert wb.store.get_job(result.job_id).outcome == "success"


# ------------------------------------------------------------------------- refusals


def _refused(
    bench: Bench, request: object, error: type[UnbrickError], check: str | None, code: int
) -> UnbrickError:
    wb = bench.workbench()
    before = bench.flash_digest()
    with pytest.raises(error) as info:
        wb.flash(bench.uri, request)  # type: ignore[arg-type]
    err = info.value
    assert err.exit_code == code
    if check is not None:
        assert isinstance(err, PreflightError) and err.check_id == check
    assert "\n" not in err.one_line()
    assert bench.flash_digest() == before, "a refused job changed the device"
    jobs = wb.store.list_jobs()
    assert jobs and jobs[0].outcome == "refused"
    return err


def test_wrong_model_is_refused(bench: Bench) -> None:
    fw = bench.firmware("2.0.0", model="OtherRouter")
    err = _refused(bench, bench.request(fw), PreflightError, "device.model", 3)
    assert "OtherRouter" in err.message and "SimRouter" in err.message


def test_wrong_hw_revision_is_refused(bench: Bench) -> None:
    fw = bench.firmware("2.0.0", hw_revisions=("C1",))
    err = _refused(bench, bench.request(fw), PreflightError, "device.hw_revision", 3)
    assert "B2" in err.message


def test_wrong_region_is_refused(bench: Bench) -> None:
    fw = bench.firmware("2.0.0", regions=("CN",))
    _refused(bench, bench.request(fw), PreflightError, "device.region", 3)


def test_image_larger_than_region_is_refused(bench: Bench) -> None:
    fw = bench.firmware("2.0.0", size_bytes=0x380000 + 4096)
    _refused(bench, bench.request(fw), PreflightError, "image.size", 3)


def test_corrupted_image_is_refused(bench: Bench) -> None:
    fw = bench.firmware("2.0.0")
    data = bytearray(fw.read_bytes())
    data[100_000] ^= 0x40
    fw.write_bytes(bytes(data))  # the manifest still has the old sha256
    _refused(bench, bench.request(fw), IntegrityError, None, 4)


def test_bad_signature_is_refused(bench: Bench, tmp_path: Path) -> None:
    fw = bench.firmware("2.0.0")
    pub, sig = _minisign(tmp_path, b"some other file")
    req = bench.request(fw, integrity=IntegrityRequest(signature=sig, minisign_key=pub))
    err = _refused(bench, req, SignatureError, None, 4)
    assert "signature" in err.one_line().lower()


def test_good_signature_passes(bench: Bench, tmp_path: Path) -> None:
    fw = bench.firmware("2.0.0")
    pub, sig = _minisign(tmp_path, fw.read_bytes())
    req = bench.request(fw, integrity=IntegrityRequest(signature=sig, minisign_key=pub))
    result = bench.workbench().flash(bench.uri, req)
    assert result.outcome == "success"


def test_downgrade_needs_the_flag(bench: Bench) -> None:
    old = bench.firmware("0.9.0")
    _refused(bench, bench.request(old), PreflightError, "firmware.downgrade", 3)
    result = bench.workbench().flash(bench.uri, bench.request(old, allow_downgrade=True))
    assert result.outcome == "success" and bench.device.firmware_version == "0.9.0"


def test_security_version_below_minimum_cannot_be_forced(bench: Bench) -> None:
    fw = bench.firmware("3.0.0", security_version=0)
    _refused(bench, bench.request(fw), PreflightError, "firmware.antirollback", 3)
    with pytest.raises(UsageError, match="cannot be"):
        bench.workbench().flash(
            bench.uri,
            bench.request(fw, forced=(("firmware.antirollback", "need it"),)),
        )


def test_forced_check_is_recorded(bench: Bench) -> None:
    fw = bench.firmware("2.0.0", regions=("CN",))
    req = bench.request(fw, forced=(("device.region", "unit re-homed to EU by RMA 1234"),))
    wb = bench.workbench()
    result = wb.flash(bench.uri, req)
    assert result.outcome == "success"
    job = wb.store.get_job(result.job_id)
    assert job.options["forced"] == {"device.region": "unit re-homed to EU by RMA 1234"}
    from unbrick.engine.replog import RepairLog

    assert "RMA 1234" in RepairLog.from_store(wb.store, result.job_id).to_markdown()


def test_an_image_without_checksum_or_signature_is_flashed_and_recorded_as_unchecked(
    bench: Bench,
) -> None:
    fw = bench.firmware("2.0.0")
    # The manifest still declares the security version (the device has a rollback counter),
    # but carries no sha256: nothing checks the bytes.
    sidecar = fw.with_name(fw.name + ".manifest.toml")
    lines = sidecar.read_text().splitlines()
    sidecar.write_text("\n".join(x for x in lines if not x.startswith("sha256")) + "\n")
    wb = bench.workbench()
    result = wb.flash(bench.uri, bench.request(fw))
    assert result.outcome == "success"
    job = wb.store.get_job(result.job_id)
    checks = {c["id"]: c for c in job.plan["checks"]}
    assert checks["image.integrity"]["passed"] is True
    assert checks["image.integrity"]["detail"]["unchecked"] is True
    assert "flashed unchecked" in checks["image.integrity"]["message"]


def test_dry_run_writes_nothing(bench: Bench) -> None:
    fw = bench.firmware("2.0.0")
    before = bench.flash_digest()
    wb = bench.workbench()
    plan = wb.plan(bench.uri, bench.request(fw))
    assert plan.ok and plan.target.region == "firmware" and plan.target.offset == 0x80000
    assert plan.preflight.results[0].id == "image.integrity"
    assert bench.flash_digest() == before
    assert wb.store.list_jobs() == []


# ------------------------------------------------------------------------- rollback


def test_failed_first_boot_rolls_back(bench: Bench) -> None:
    fw = bench.firmware("2.0.0", panic=True)
    wb = bench.workbench()
    with pytest.raises(RolledBack) as info:
        wb.flash(bench.uri, bench.request(fw))
    assert info.value.exit_code == 7
    assert bench.device.state == "firmware" and bench.device.firmware_version == "1.0.0"
    job = wb.store.list_jobs()[0]
    assert job.state == "rolled-back" and job.outcome == "rolled_back"
    names = [s.name for s in wb.store.steps(job.id)]
    assert "rollback" in names and names.index("validate") < names.index("rollback")
    console = [e.data.get("line", "") for e in wb.store.events(job.id)]
    assert any("Kernel panic" in line for line in console)


def test_verify_failure_is_rewritten_then_rolled_back(bench: Bench) -> None:
    fw = bench.firmware("2.0.0")
    wb = bench.workbench()
    real_open = bench.open

    lossy = {"on": True}

    class Lossy:
        """Loses 4 KiB of every program over one spot until the rollback starts."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def program(self, offset: int, data: bytes) -> None:
            hole = 0x80000 + 0x10000
            if lossy["on"] and offset <= hole < offset + len(data):
                data = data[: hole - offset] + b"\xff" * 4096 + data[hole - offset + 4096 :]
            self._inner.program(offset, data)

    class Watch:
        def emit(self, event: Event) -> None:
            if event.kind == "step-start" and event.name == "rollback":
                lossy["on"] = False

    wb._open_device = lambda addr: Lossy(real_open(addr))  # type: ignore[method-assign]
    wb.sink = FanOut(bench.sink, Watch())
    with pytest.raises(RolledBack, match=r"did not verify by device-hash.*0x80000-0xb0d3f"):
        wb.flash(bench.uri, bench.request(fw))
    assert bench.device.firmware_version == "1.0.0" and bench.device.state == "firmware"


# ------------------------------------------------------------------------- A/B


def test_ab_writes_the_inactive_slot_and_commits(bench_ab: Bench) -> None:
    fw = bench_ab.firmware("2.0.0")
    before = bench_ab.flash_bytes()
    wb = bench_ab.workbench()
    result = wb.flash(bench_ab.uri, bench_ab.request(fw))
    assert result.outcome == "success" and result.boot is not None
    assert result.boot.booted_slot == "b"
    after = bench_ab.flash_bytes()
    assert after[0x80000:0x400000] == before[0x80000:0x400000]  # slot a untouched
    assert after[0x400000 : 0x400000 + len(fw.read_bytes())] == fw.read_bytes()
    state = bench_ab.device.boot_state()
    assert (
        state.active_slot == "b" if hasattr(state, "active_slot") else state["active_slot"] == "b"
    )
    # The next update goes to slot a.
    fw3 = bench_ab.firmware("3.0.0")
    plan = wb.plan(bench_ab.uri, bench_ab.request(fw3))
    assert plan.slot == "a" and plan.target.offset == 0x80000


def test_ab_bad_boot_keeps_the_old_slot(bench_ab: Bench) -> None:
    fw = bench_ab.firmware("2.0.0", panic=True)
    wb = bench_ab.workbench()
    with pytest.raises(RolledBack):
        wb.flash(bench_ab.uri, bench_ab.request(fw))
    assert bench_ab.device.firmware_version == "1.0.0"
    assert bench_ab.device.booted_slot == "a"


# ------------------------------------------------------------------------- backup, restore


def test_backup_and_restore_round_trip(bench: Bench) -> None:
    wb = bench.workbench()
    original = bench.flash_bytes()
    backup = wb.backup(bench.uri)
    assert backup.backup_id is not None
    record = wb.vault.get(backup.backup_id)
    assert record.size_bytes == len(original)
    assert b"".join(wb.vault.open(backup.backup_id)) == original
    wb.flash(bench.uri, bench.request(bench.firmware("2.0.0")))
    assert bench.device.firmware_version == "2.0.0"
    result = wb.restore(bench.uri, backup.backup_id[:10])
    assert result.outcome == "success" and result.detail["regions"] == ["firmware"]
    assert bench.flash_bytes()[:0x400000] == original[:0x400000]
    assert bench.device.firmware_version == "1.0.0"


def test_restore_refuses_another_units_backup(bench: Bench, tmp_path: Path) -> None:
    wb = bench.workbench()
    backup = wb.backup(bench.uri)
    assert backup.backup_id is not None
    other = make_bench(tmp_path / "other", "router", name="other")
    try:
        wb2 = other.workbench()
        wb2.vault = wb.vault
        wb2._open_device = other.open  # type: ignore[method-assign]
        before = other.flash_digest()
        with pytest.raises(PreflightError) as info:
            wb2.restore(other.uri, backup.backup_id)
        assert info.value.check_id == "backup.device"
        assert other.flash_digest() == before
    finally:
        other.close()


def _minisign(tmp: Path, message: bytes) -> tuple[Path, Path]:
    """A minisign key pair and a prehashed signature of ``message``."""
    key = Ed25519PrivateKey.generate()
    key_id = os.urandom(8)
    pub = tmp / "key.pub"
    pub.write_text(
        "untrusted comment: test key\n"
        + base64.b64encode(b"Ed" + key_id + key.public_key().public_bytes_raw()).decode()
        + "\n"
    )
    sig = key.sign(hashlib.blake2b(message, digest_size=64).digest())
    trusted = "timestamp:0\tfile:fw"
    sig_path = tmp / "fw.minisig"
    sig_path.write_text(
        "untrusted comment: sig\n"
        + base64.b64encode(b"ED" + key_id + sig).decode()
        + f"\ntrusted comment: {trusted}\n"
        + base64.b64encode(key.sign(sig + trusted.encode())).decode()
        + "\n"
    )
    return pub, sig_path


# ------------------------------------------------------------------------- hard brick


def test_hard_brick_is_revived_through_the_spi_face(bench: Bench) -> None:
    wb = bench.workbench()
    backup = wb.backup(bench.uri)
    assert backup.backup_id is not None
    bench.device.simulate_brick("hard")
    assert bench.device.state == "dead"
    with pytest.raises(TransportError):
        wb.probe(bench.uri)
    spi = bench.uri + "?via=spi"
    # Through a clip the chip, not the router, answers: the unit's own backup is forced on
    # purpose, and the bootloader is critical.
    with pytest.raises(PreflightError) as info:
        wb.restore(spi, backup.backup_id, profile_id="sim-router")
    assert info.value.check_id == "backup.device"
    forced = {"backup.device": "clip on the same board, serial on its label"}
    with pytest.raises(PreflightError) as info:
        wb.restore(spi, backup.backup_id, profile_id="sim-router", forced=forced)
    assert info.value.check_id == "region.critical"
    result = wb.restore(
        spi, backup.backup_id, profile_id="sim-router", forced=forced, allow_critical=True
    )
    assert result.outcome == "success" and "bootloader" in result.detail["regions"]
    steps = {s.name: s.result for s in wb.store.steps(result.job_id)}
    assert steps["reboot"] == "skipped"
    bench.device.reset()
    bench.device.wait_state(("firmware",), 5.0)
    identity, profile = wb.probe(bench.uri)
    assert identity.firmware_version == "1.0.0" and profile is not None


def test_android_info_requirements_are_honoured(bench: Bench) -> None:
    fw = bench.firmware("2.0.0")
    info = bench.tmp / "android-info.txt"
    info.write_text("require board=Pixel9|Pixel9Pro\nrequire version-bootloader=2023.01-sim\n")
    req = bench.request(fw, android_info=info)
    err = _refused(bench, req, PreflightError, "android.requirements", 3)
    assert "Pixel9" in err.message
    info.write_text("require board=SimRouter\nreject version-bootloader=2019.*\n")
    assert bench.workbench().flash(bench.uri, bench.request(fw, android_info=info)).outcome == (
        "success"
    )


def test_compressed_image_is_expanded_before_writing(bench: Bench) -> None:
    import gzip

    from unbrick.sim.firmware import build_manifest_toml

    raw = bench.firmware("2.0.0", manifest=False)
    gz = raw.with_name("fw.bin.gz")
    gz.write_bytes(gzip.compress(raw.read_bytes(), mtime=0))
    gz.with_name(gz.name + ".manifest.toml").write_text(
        build_manifest_toml(
            model="SimRouter",
            version="2.0.0",
            security_version=1,
            target="firmware",
            sha256=hashlib.sha256(gz.read_bytes()).hexdigest(),
            hw_revisions=("B2",),
            regions=("EU",),
        )
    )
    wb = bench.workbench()
    plan = wb.plan(bench.uri, bench.request(gz))
    assert plan.image_format == "gzip" and plan.flash_path != gz
    assert plan.target.size == len(raw.read_bytes())
    result = wb.flash(bench.uri, bench.request(gz), plan=plan)
    assert result.outcome == "success" and bench.device.firmware_version == "2.0.0"
    assert bench.flash_bytes()[0x80000 : 0x80000 + plan.target.size] == raw.read_bytes()


def test_two_pass_profile_stages_the_loader_first(bench: Bench) -> None:
    from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources

    base = next(d for n, d in builtin_profile_sources() if n.endswith("sim-router.toml")).decode()
    two_pass = (
        base.replace('id = "sim-router"', 'id = "sim-router-2pass"').replace(
            '[[region]]\nname = "firmware"',
            '[[region]]\nname = "loader"\noffset = 0x070000\nsize = 0x010000\n'
            'kind = "loader"\n\n[[region]]\nname = "firmware"',
        )
        + '\n[loader]\nregion = "loader"\ndescription = "a RAM loader that speeds up writes"\n'
    )
    wb = bench.workbench()
    wb.profiles = ProfileSet.from_sources(
        builtin_profile_sources(), [("two-pass.toml", two_pass.encode())]
    )
    fw = bench.firmware("2.0.0")
    with pytest.raises(UsageError, match="two passes") as info:
        wb.plan(bench.uri, bench.request(fw, profile_id="sim-router-2pass"))
    assert "--loader" in info.value.hint
    loader = bench.tmp / "loader.bin"
    loader.write_bytes(hashlib.shake_256(b"loader").digest(20_000))
    req = bench.request(fw, profile_id="sim-router-2pass", loader=loader)
    result = wb.flash(bench.uri, req)
    assert result.outcome == "success"
    names = [s.name for s in wb.store.steps(result.job_id)]
    assert names.index("stage-loader") < names.index("write")
    assert bench.flash_bytes()[0x70000 : 0x70000 + 20_000] == loader.read_bytes()
    with pytest.raises(UsageError, match="stages no loader"):
        wb.plan(bench.uri, bench.request(fw, loader=loader))
