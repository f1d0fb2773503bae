"""The named pre-flight checks: each passes and fails, overrides and refusals."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from unbrick.errors import IntegrityError, PreflightError, SignatureError, UsageError
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.manifest import Manifest, parse_android_info
from unbrick.model.profile import Profile, Region
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources
from unbrick.safety.checks import (
    CHECK_IDS,
    CHECKS,
    BackupStatus,
    ImageFacts,
    IntegrityCheckFacts,
    IntegrityFacts,
    PreflightContext,
    PreflightOptions,
    PreflightResult,
    run_preflight,
)

pytestmark = pytest.mark.unit

SHA = "cd" * 32
PROFILES = ProfileSet.from_sources(builtin_profile_sources(), [])


def router() -> Profile:
    return PROFILES.get("sim-router")


def region(name: str, profile: Profile | None = None) -> Region:
    r = (profile or router()).region(name)
    assert r is not None
    return r


def base_ctx(**changes: Any) -> PreflightContext:
    ctx = PreflightContext(
        identity=DeviceIdentity(
            model="SimRouter",
            serial="SIM1",
            hw_revision="B1",
            region="EU",
            bootloader_version="2023.01-sim",
            firmware_version="1.0.0",
            security_version=1,
            storage=StorageInfo("nor", 8 << 20, 64 << 10),
        ),
        profile=router(),
        targets=(region("firmware"),),
        image=ImageFacts(format="uimage", size_bytes=1 << 20, sha256=SHA, valid=True),
        integrity=IntegrityFacts((IntegrityCheckFacts("sha256", True, "matches"),)),
        manifest=Manifest(model="SimRouter", version="2.0.0", security_version=1, source="m"),
        backup_planned=True,
    )
    return replace(ctx, **changes)


def ident(**changes: Any) -> DeviceIdentity:
    return replace(base_ctx().identity, **changes)


def manifest(**changes: Any) -> Manifest:
    m = base_ctx().manifest
    assert m is not None
    return replace(m, **changes)


def opts(**changes: Any) -> PreflightOptions:
    return replace(PreflightOptions(), **changes)


def check(ctx: PreflightContext, check_id: str) -> tuple[bool, str]:
    r = run_preflight(ctx).get(check_id)
    return r.passed, r.message


def test_a_good_job_passes_every_check_in_order() -> None:
    result = run_preflight(base_ctx())
    assert [r.id for r in result.results] == list(CHECK_IDS)
    assert result.passed, [r.message for r in result.failed()]
    assert result.refusal() is None
    assert result.forced() == ()
    assert result.to_dict()["passed"] is True
    assert CHECK_IDS == (
        "image.integrity",
        "image.valid",
        "image.format",
        "image.size",
        "device.model",
        "device.hw_revision",
        "device.region",
        "device.bootloader",
        "android.requirements",
        "firmware.antirollback",
        "firmware.downgrade",
        "region.critical",
        "backup.verified",
        "device.identity",
        "device.write_protect",
        "device.unlocked",
    )


# ---------------------------------------------------------------------------------------------
# One test per check


def test_image_integrity() -> None:
    ok, msg = check(base_ctx(), "image.integrity")
    assert ok and "sha256" in msg
    # Only a manifest's sha256: passes when it matches.
    ctx = base_ctx(integrity=IntegrityFacts(), manifest=manifest(sha256=SHA))
    assert check(ctx, "image.integrity") == (True, "image verified by manifest sha256")
    # Nothing requested: passes, saying the image goes unchecked (recorded in the detail).
    ctx = base_ctx(integrity=IntegrityFacts())
    result = run_preflight(ctx)
    r = result.get("image.integrity")
    assert r.passed and not r.overridable
    assert "no checksum or signature given: the image is flashed unchecked" in r.message
    assert r.detail["unchecked"] is True
    assert result.refusal() is None
    # A wrong checksum: IntegrityError (exit 4).
    ctx = base_ctx(integrity=IntegrityFacts((IntegrityCheckFacts("sha256", False, "mismatch"),)))
    err = run_preflight(ctx).refusal()
    assert type(err) is IntegrityError and err.exit_code == 4
    assert "integrity check 'sha256' failed: mismatch" in err.message
    # A bad signature: SignatureError.
    bad_sig = IntegrityCheckFacts("minisign", False, "bad signature", error="SignatureError")
    err = run_preflight(base_ctx(integrity=IntegrityFacts((bad_sig,)))).refusal()
    assert type(err) is SignatureError and err.exit_code == 4
    # The manifest's sha256 disagrees with the image.
    err = run_preflight(base_ctx(manifest=manifest(sha256="ef" * 32))).refusal()
    assert type(err) is IntegrityError
    assert f"image sha256 is {SHA}" in err.message


def test_image_valid() -> None:
    assert check(base_ctx(), "image.valid")[0]
    ctx = base_ctx(image=replace(base_ctx().image, valid=False, problems=("bad CRC", "short")))
    ok, msg = check(ctx, "image.valid")
    assert not ok
    assert msg.startswith("image is not a valid uimage image: bad CRC (and 1 more)")


def test_image_format() -> None:
    assert check(base_ctx(), "image.format")[0]
    ctx = base_ctx(image=replace(base_ctx().image, format="fit"))
    ok, msg = check(ctx, "image.format")
    assert not ok
    assert "region 'firmware' takes uimage images but this image is fit" in msg
    # A region without formats accepts any.
    ctx = base_ctx(image=replace(base_ctx().image, format="raw"), targets=(region("env"),))
    assert check(ctx, "image.format")[0]
    # The manifest's target must be what the job writes (a slot group counts).
    ok, msg = check(base_ctx(manifest=manifest(target="env")), "image.format")
    assert not ok and "manifest says the image is for region 'env'" in msg
    ab = PROFILES.get("sim-router-ab")
    ctx = base_ctx(
        profile=ab, targets=(region("firmware_b", ab),), manifest=manifest(target="firmware")
    )
    assert check(ctx, "image.format")[0]


def test_image_size() -> None:
    assert check(base_ctx(), "image.size")[0]
    big = replace(base_ctx().image, size_bytes=0x380000 + 1)
    result = run_preflight(base_ctx(image=big))
    r = result.get("image.size")
    assert not r.passed and not r.overridable
    assert r.message.startswith(
        f"image is {0x380001} bytes but region 'firmware' holds {0x380000} bytes (1 too many)"
    )
    # The expanded size counts, not the file size.
    sparse = replace(base_ctx().image, expanded_size_bytes=0x400000)
    assert not check(base_ctx(image=sparse), "image.size")[0]
    assert not check(base_ctx(image=replace(base_ctx().image, size_bytes=0)), "image.size")[0]


def test_image_size_for_device_sized_regions() -> None:
    pi = PROFILES.get("raspberry-pi-sd")
    disk = region("disk", pi)
    card = ident(storage=StorageInfo("block", 4 << 30, 512))
    img = replace(base_ctx().image, format="raw", size_bytes=5 << 30)
    ctx = base_ctx(profile=pi, targets=(disk,), identity=card, image=img)
    assert not check(ctx, "image.size")[0]
    ok, msg = check(replace(ctx, image=replace(img, size_bytes=1 << 30)), "image.size")
    assert ok
    # Android: the size comes from getvar partition-size (hex, 0x optional), else the device.
    android = PROFILES.get("android-fastboot-generic")
    boot = region("boot_a", android)
    img = replace(base_ctx().image, format="android-boot", size_bytes=0x5000)
    ctx = base_ctx(profile=android, targets=(boot,), identity=ident(storage=None), image=img)
    ok, msg = check(ctx, "image.size")
    assert ok and "known only to the device" in msg
    assert not check(replace(ctx, android_vars={"partition-size:boot_a": "4000"}), "image.size")[0]
    assert check(replace(ctx, android_vars={"partition-size:boot_a": "0x6000"}), "image.size")[0]


def test_device_model() -> None:
    assert check(base_ctx(), "device.model")[0]
    ok, msg = check(base_ctx(identity=ident(model="OtherRouter")), "device.model")
    assert not ok
    assert msg.startswith(
        "device model is 'OtherRouter' but profile sim-router requires 'SimRouter'"
    )
    # The manifest's model counts as well as the profile's.
    ok, msg = check(base_ctx(manifest=manifest(model="SimRouterPro")), "device.model")
    assert not ok and "manifest m requires 'SimRouterPro'" in msg


def test_device_hw_revision() -> None:
    assert check(base_ctx(), "device.hw_revision")[0]
    ok, msg = check(base_ctx(identity=ident(hw_revision="C1")), "device.hw_revision")
    assert not ok and "hardware revision is 'C1'" in msg and "one of 'B1', 'B2'" in msg
    ok, msg = check(base_ctx(identity=ident(hw_revision=None)), "device.hw_revision")
    assert not ok and "did not report its hardware revision" in msg
    ok, msg = check(base_ctx(manifest=manifest(hw_revisions=("B2",))), "device.hw_revision")
    assert not ok and "manifest m requires 'B2'" in msg


def test_device_region() -> None:
    assert check(base_ctx(), "device.region")[0]
    ok, msg = check(base_ctx(identity=ident(region="JP")), "device.region")
    assert not ok and "device region is 'JP'" in msg
    # A profile without region requirements accepts any.
    qemu = PROFILES.get("qemu-virt-arm64")
    ctx = base_ctx(profile=qemu, targets=(region("firmware", qemu),), identity=ident(region="JP"))
    assert check(replace(ctx, manifest=None), "device.region") == (
        True,
        "device region 'JP' is supported",
    )


def test_device_bootloader() -> None:
    assert check(base_ctx(), "device.bootloader")[0]
    ok, msg = check(base_ctx(identity=ident(bootloader_version="2022.10")), "device.bootloader")
    assert not ok
    assert msg.startswith(
        "bootloader 2022.10 is older than 2023.01, which profile sim-router needs"
    )
    ok, msg = check(base_ctx(manifest=manifest(min_bootloader="2024.01")), "device.bootloader")
    assert not ok and "which manifest m needs" in msg
    ok, msg = check(base_ctx(identity=ident(bootloader_version=None)), "device.bootloader")
    assert not ok and "did not report its bootloader version" in msg


def test_android_requirements() -> None:
    assert check(base_ctx(), "android.requirements") == (True, "no android-info.txt to check")
    info = parse_android_info("require board=sailfish|marlin\nrequire version-bootloader=8996-*\n")
    good = {"product": "marlin", "version-bootloader": "8996-0120"}
    ctx = base_ctx(android_info=info, android_vars=good)
    assert check(ctx, "android.requirements")[0]
    ctx = replace(ctx, android_vars={**good, "product": "walleye"})
    r = run_preflight(ctx).get("android.requirements")
    assert not r.passed and r.overridable
    assert "device product is 'walleye'; the update requires 'sailfish' or 'marlin'" in r.message
    # Forcing works like fastboot --force...
    forced = replace(ctx, options=opts(forced={"android.requirements": "board renamed by OEM"}))
    r = run_preflight(forced).get("android.requirements")
    assert r.passed and r.forced
    # ...but not for a missing partition-exists partition.
    info = parse_android_info("require partition-exists=vendor_boot\n")
    ctx = base_ctx(android_info=info, options=opts(forced={"android.requirements": "try anyway"}))
    result = run_preflight(ctx)
    r = result.get("android.requirements")
    assert not r.passed and not r.forced and not r.overridable
    assert "--force cannot override this failure" in r.message
    err = result.refusal()
    assert isinstance(err, PreflightError) and not err.overridable


def test_firmware_antirollback_is_never_overridable() -> None:
    assert check(base_ctx(), "firmware.antirollback")[0]
    ctx = base_ctx(identity=ident(security_version=2))
    result = run_preflight(ctx)
    r = result.get("firmware.antirollback")
    assert not r.passed and not r.overridable
    assert "security version 1 is below the device's anti-rollback counter 2" in r.message
    with pytest.raises(UsageError) as ei:
        run_preflight(replace(ctx, options=opts(forced={"firmware.antirollback": "please"})))
    assert "cannot be overridden" in ei.value.message
    # allow_downgrade does not help either.
    assert (
        not run_preflight(replace(ctx, options=opts(allow_downgrade=True)))
        .get("firmware.antirollback")
        .passed
    )
    # No manifest: the image's security version is unknown, which a device with a counter refuses.
    assert not check(
        base_ctx(manifest=None, identity=ident(security_version=2)), "firmware.antirollback"
    )[0]
    assert check(
        base_ctx(manifest=None, identity=ident(security_version=0)), "firmware.antirollback"
    )[0]


def test_firmware_downgrade() -> None:
    assert check(base_ctx(), "firmware.downgrade")[0]
    assert check(base_ctx(manifest=manifest(version="1.0")), "firmware.downgrade")[0]  # same
    ctx = base_ctx(identity=ident(firmware_version="2.1.0-rc1"), manifest=manifest(version="2.0.9"))
    r = run_preflight(ctx).get("firmware.downgrade")
    assert not r.passed and r.overridable
    assert r.message == (
        "image version 2.0.9 is older than the running firmware 2.1.0-rc1; "
        "pass --allow-downgrade if you mean to go back"
    )
    r = run_preflight(replace(ctx, options=opts(allow_downgrade=True))).get("firmware.downgrade")
    assert r.passed and not r.forced and "allowed by --allow-downgrade" in r.message
    r = run_preflight(replace(ctx, options=opts(forced={"firmware.downgrade": "known bad 2.1"})))
    assert r.get("firmware.downgrade").forced
    ok, msg = check(base_ctx(manifest=None), "firmware.downgrade")
    assert ok and "no manifest" in msg


def test_region_critical() -> None:
    assert check(base_ctx(), "region.critical") == (True, "no critical region is written")
    boot = (region("bootloader"),)
    img = replace(base_ctx().image, format="raw", size_bytes=0x1000)
    ctx = base_ctx(targets=boot, image=img)
    r = run_preflight(ctx).get("region.critical")
    assert not r.passed and not r.overridable and "pass --allow-critical" in r.message
    ctx = replace(ctx, options=opts(allow_critical=True))
    assert check(ctx, "region.critical")[0]  # a backup is planned
    no_backup = replace(ctx, backup_planned=False)
    ok, msg = check(no_backup, "region.critical")
    assert not ok and "no verified backup" in msg
    done = replace(no_backup, backup=BackupStatus(verified=True, backup_id="b1"))
    assert check(done, "region.critical")[0]
    with pytest.raises(UsageError, match="cannot be overridden"):
        run_preflight(replace(ctx, options=opts(forced={"region.critical": "x"})))
    # Forcing backup.verified does not let a critical region through without a backup.
    forced = replace(no_backup, options=opts(allow_critical=True, forced={"backup.verified": "x"}))
    result = run_preflight(forced)
    assert result.get("backup.verified").forced
    err = result.refusal()
    assert isinstance(err, PreflightError) and err.check_id == "region.critical"


def test_backup_verified() -> None:
    ok, msg = check(base_ctx(), "backup.verified")
    assert ok and "will be taken" in msg
    ctx = base_ctx(backup_planned=False)
    r = run_preflight(ctx).get("backup.verified")
    assert not r.passed and r.overridable
    assert r.message.startswith("no verified backup covers 'firmware'")
    ok, msg = check(replace(ctx, backup=BackupStatus(True, "bk-42")), "backup.verified")
    assert ok and msg == "verified backup bk-42 covers the target"


def test_device_identity() -> None:
    assert check(base_ctx(), "device.identity") == (True, "device matches profile 'sim-router'")
    ok, msg = check(base_ctx(identity=ident(model="SimRouterAB")), "device.identity")
    assert not ok
    assert msg == (
        "device does not match profile 'sim-router': model is 'SimRouterAB', the profile "
        "expects 'SimRouter'; choose the profile for this device"
    )
    small = ident(storage=StorageInfo("nor", 4 << 20, 64 << 10))
    ok, msg = check(base_ctx(identity=small), "device.identity")
    assert not ok and "profile 'sim-router' describes 8388608" in msg
    pi = PROFILES.get("raspberry-pi-sd")
    ctx = base_ctx(profile=pi, targets=(region("disk", pi),))
    ok, msg = check(ctx, "device.identity")
    assert ok and "chosen by name" in msg


# ---------------------------------------------------------------------------------------------
# Forcing and refusals


def test_forcing_an_overridable_check_records_it() -> None:
    ctx = base_ctx(
        identity=ident(model="SimRouterX", hw_revision="C9"),
        options=opts(forced={"device.model": "relabelled unit", "device.hw_revision": "new rev"}),
    )
    result = run_preflight(ctx)
    forced = result.forced()
    assert [r.id for r in forced] == ["device.model", "device.hw_revision"]
    assert forced[0].reason == "relabelled unit"
    assert forced[0].message.endswith("[forced: relabelled unit]")
    assert forced[0].to_dict()["forced"] is True
    # device.identity still fails: forcing one check does not force another.
    err = result.refusal()
    assert isinstance(err, PreflightError) and err.check_id == "device.identity"
    assert err.overridable
    assert "--force device.identity --reason TEXT" in err.hint


def test_forcing_a_passing_check_marks_nothing() -> None:
    result = run_preflight(base_ctx(options=opts(forced={"device.model": "just in case"})))
    assert result.passed and result.forced() == ()


@pytest.mark.parametrize("check_id", [c.id for c in CHECKS if not c.overridable])
def test_forcing_a_non_overridable_check_is_a_usage_error(check_id: str) -> None:
    with pytest.raises(UsageError) as ei:
        run_preflight(base_ctx(options=opts(forced={check_id: "because"})))
    assert ei.value.message.startswith(f"--force {check_id}: this check cannot be overridden: ")
    assert ei.value.exit_code == 2


def test_forcing_an_unknown_check_lists_the_ids() -> None:
    with pytest.raises(UsageError) as ei:
        run_preflight(base_ctx(options=opts(forced={"device.colour": "x"})))
    assert "no check with that id" in ei.value.message
    assert "device.model" in ei.value.hint and "backup.verified" in ei.value.hint


def test_force_needs_a_reason_and_targets_are_required() -> None:
    with pytest.raises(UsageError, match="needs --reason"):
        run_preflight(base_ctx(options=opts(forced={"device.model": "  "})))
    with pytest.raises(UsageError, match="no target region"):
        run_preflight(base_ctx(targets=()))


def test_refusal_is_the_first_failing_check() -> None:
    ctx = base_ctx(
        identity=ident(model="Other", hw_revision="Z"),
        image=replace(base_ctx().image, valid=False, problems=("truncated",)),
    )
    result = run_preflight(ctx)
    assert [r.id for r in result.failed()] == [
        "image.valid",
        "device.model",
        "device.hw_revision",
        "device.identity",
    ]
    err = result.refusal()
    assert isinstance(err, PreflightError)
    assert (err.check_id, err.overridable, err.exit_code) == ("image.valid", False, 3)
    assert err.hint == "nothing was written to the device"
    assert isinstance(result, PreflightResult)


def test_facts_from_report_dicts() -> None:
    image = ImageFacts.from_dict(
        {
            "path": "fw.bin",
            "format": "uimage",
            "size": 10,
            "sha256": SHA.upper(),
            "valid": False,
            "problems": ["bad"],
            "warnings": [],
            "details": {},
        }
    )
    assert image == ImageFacts("uimage", 10, SHA, False, ("bad",))
    integrity = IntegrityFacts.from_dict(
        {
            "path": "fw.bin",
            "ok": False,
            "checks": [
                {"id": "sha256", "passed": True, "detail": "ok", "weak": False, "error": None},
                {
                    "id": "minisign",
                    "passed": False,
                    "detail": "bad",
                    "weak": False,
                    "error": "SignatureError",
                },
            ],
        }
    )
    assert integrity.requested == ("sha256", "minisign")
    assert integrity.passed == ("sha256",)
    assert integrity.checks[1].error == "SignatureError"


def test_integrity_facts_from_a_verify_report() -> None:
    from pathlib import Path

    from unbrick.trust.verify import Check, VerifyReport

    report = VerifyReport(
        Path("fw.bin"),
        checks=[
            Check("sha256", True, "ok"),
            Check("openpgp", False, "bad", error="SignatureError"),
        ],
    )
    facts = IntegrityFacts.from_report(report)
    assert facts == IntegrityFacts.from_dict(report.to_dict())
    assert facts.checks[1] == IntegrityCheckFacts("openpgp", False, "bad", "SignatureError")
    assert IntegrityFacts.from_report(None) == IntegrityFacts()


def test_device_unlocked() -> None:
    assert check(base_ctx(), "device.unlocked") == (True, "the device reports no bootloader lock")
    unlocked = ident(extra={"unlocked": "yes"})
    assert check(base_ctx(identity=unlocked), "device.unlocked") == (
        True,
        "the bootloader is unlocked",
    )
    result = run_preflight(base_ctx(identity=ident(extra={"unlocked": "no"})))
    r = result.get("device.unlocked")
    assert not r.passed and not r.overridable
    assert "never unlocks it" in r.message and "erases all user data" in r.message


def test_device_write_protect() -> None:
    assert check(base_ctx(), "device.write_protect") == (
        True,
        "the device reports no write protection",
    )
    off = ident(extra={"wp_mode": "disabled", "wp_start": "0", "wp_length": "0"})
    assert check(base_ctx(identity=off), "device.write_protect") == (
        True,
        "write protection is disabled",
    )
    # The sim router's firmware region is at 0x80000: a protected boot block is elsewhere.
    low = ident(extra={"wp_mode": "hardware", "wp_start": "0", "wp_length": "0x10000"})
    ok, msg = check(base_ctx(identity=low), "device.write_protect")
    assert ok and "outside the target" in msg
    whole = ident(extra={"wp_mode": "hardware", "wp_start": "0", "wp_length": str(8 << 20)})
    result = run_preflight(base_ctx(identity=whole))
    r = result.get("device.write_protect")
    assert not r.passed and not r.overridable
    assert "covers 0x0-0x7fffff" in r.message and "--wp-disable" in r.message
