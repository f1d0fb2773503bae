"""update.zip planning without a device: fastboot-info.txt, fastboot's image list, requirements."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from unbrick.errors import ImageError, PreflightError, UsageError
from unbrick.formats import sparse
from unbrick.formats.base import Context, Source
from unbrick.model.manifest import parse_android_info
from unbrick.transports.fastboot.update import (
    UpdatePackage,
    UpdateStep,
    answers_from,
    check_android_info,
    default_steps,
    parse_fastboot_info,
    plan_update,
)

pytestmark = pytest.mark.unit

DEVICE = {
    "product": "walleye",
    "version-bootloader": "mw8998-002.0069.00",
    "slot-count": "2",
    "current-slot": "b",
    "has-slot:boot": "yes",
    "has-slot:system": "yes",
    "has-slot:vbmeta": "yes",
    "has-slot:misc": "no",
    "partition-size:boot_a": "0x2000000",
    "partition-size:boot_b": "0x2000000",
    "partition-size:system_a": "0x10000000",
    "partition-size:system_b": "0x10000000",
    "partition-size:vbmeta_b": "0x10000",
    "partition-size:misc": "0x100000",
    "is-logical:system_b": "no",
}


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_parse_fastboot_info() -> None:
    text = (
        "version 1\n"
        "# comment\n\n"
        "flash boot\n"
        "flash --apply-vbmeta vbmeta vbmeta_custom.img\n"
        "flash --slot-other system system_other.img\n"
        "reboot fastboot\n"
        "reboot\n"
        "erase misc\n"
        "if-wipe erase userdata\n"
    )
    steps = parse_fastboot_info(text)
    assert [(s.action, s.partition, s.image, s.other_slot) for s in steps] == [
        ("flash", "boot", "boot.img", False),
        ("flash", "vbmeta", "vbmeta_custom.img", False),
        ("flash", "system", "system_other.img", True),
        ("reboot", "fastboot", None, False),
        ("reboot", "system", None, False),
        ("erase", "misc", None, False),
    ]
    assert parse_fastboot_info(text, wipe=True)[-1] == UpdateStep("erase", "userdata", line_no=10)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("version 2\n", "newer"),
        ("version x\n", "malformed"),
        ("flash\n", "PARTITION"),
        ("flash a b c\n", "PARTITION"),
        ("reboot elsewhere\n", "reboot takes"),
        ("erase\n", "erase needs"),
        ("if-wipe\n", "if-wipe"),
        ("format userdata\n", "unknown command"),
        ("update-super\n", "super partition"),
    ],
)
def test_bad_fastboot_info(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_fastboot_info(text)


def test_default_steps_in_fastboot_order() -> None:
    members = {
        "system.img",
        "vendor.img",
        "boot.img",
        "vbmeta.img",
        "dtbo.img",
        "boot_other.img",
        "radio.img",
        "android-info.txt",
    }
    steps = default_steps(members)
    assert [s.image for s in steps] == [
        "boot.img",
        "dtbo.img",
        "vbmeta.img",
        "boot_other.img",
        "system.img",
        "vendor.img",
    ]
    assert [s.other_slot for s in steps] == [False, False, False, True, False, False]
    with pytest.raises(ImageError, match=r"boot\.img"):
        default_steps({"system.img"})


def test_requirements() -> None:
    info = parse_android_info(
        "require board=walleye|taimen\nrequire version-bootloader=mw8998-002.0069.00\n"
        "require-for-product:taimen version-baseband=g8998-00164-1710262031\n"
    )
    assert check_android_info(info, answers_from(DEVICE)) == ()
    info = parse_android_info("require board=taimen\nreject version-bootloader=mw8998-*\n")
    with pytest.raises(PreflightError, match=r"and 1 more") as e:
        check_android_info(info, answers_from(DEVICE))
    assert e.value.check_id == "android-info" and "product walleye" in e.value.hint
    overridden = check_android_info(info, answers_from(DEVICE), forced=("android-info",))
    assert len(overridden) == 2
    unknown = parse_android_info("require version-baseband=x\n")
    with pytest.raises(PreflightError, match="did not answer getvar 'version-baseband'"):
        check_android_info(unknown, answers_from(DEVICE))


def test_plan_resolves_slots_and_sizes(tmp_path: Path) -> None:
    raw = tmp_path / "system.raw"
    raw.write_bytes(bytes(1 << 20) + b"\x01" * 4096)
    with raw.open("rb") as f, (tmp_path / "system.simg").open("wb") as out:
        sparse.write_sparse(Source(f), out, Context())
    pkg_path = zip_of(
        tmp_path / "u.zip",
        {
            "android-info.txt": b"require board=walleye\nnot a requirement line\n",
            "boot.img": b"\0" * 4096,
            "system.img": (tmp_path / "system.simg").read_bytes(),
            "system_other.img": b"\0" * 4096,
        },
    )
    with UpdatePackage.open(pkg_path) as pkg:
        plan = plan_update(pkg, answers_from(DEVICE))
        assert plan.slot == "b" and not plan.set_active
        assert [(s.target, s.image_bytes) for s in plan.steps] == [
            ("boot_b", 4096),
            ("system_b", (1 << 20) + 4096),
            ("system_a", 4096),
        ]
        assert plan.warnings == (
            "android-info.txt line 2 skipped (not a requirement): 'not a requirement line'",
        )
        plan = plan_update(pkg, answers_from(DEVICE), slot="_a", skip_secondary=True)
        assert [s.target for s in plan.flash_steps] == ["boot_a", "system_a"]
        assert plan.set_active
        logical = dict(DEVICE, **{"is-logical:system_b": "yes"})
        with pytest.raises(PreflightError) as e:
            plan_update(pkg, answers_from(logical))
        assert e.value.check_id == "logical-partition"
        no_slots = {k: v for k, v in DEVICE.items() if k != "current-slot"}
        with pytest.raises(PreflightError) as e:
            plan_update(pkg, answers_from(no_slots))
        assert e.value.check_id == "slot"
        single = {
            "product": "walleye",
            "has-slot:boot": "no",
            "has-slot:system": "no",
            "partition-size:boot": "0x100000",
            "partition-size:system": "0x1000",
        }
        with pytest.raises(PreflightError, match=r"system\.img needs") as e:
            plan_update(pkg, answers_from(single))
        with pytest.raises(UsageError, match="no A/B slots"):
            plan_update(pkg, answers_from(single), slot="a")


def test_package_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="too large"):
        UpdatePackage.open(
            zip_of(tmp_path / "big.zip", {"android-info.txt": b"#" * ((1 << 20) + 1)})
        )
    with pytest.raises(ImageError, match=r"missing\.img"):
        pkg_path = zip_of(
            tmp_path / "m.zip",
            {
                "android-info.txt": b"require board=walleye\n",
                "fastboot-info.txt": b"flash boot missing.img\n",
            },
        )
        with UpdatePackage.open(pkg_path) as pkg:
            plan_update(pkg, answers_from(DEVICE))
