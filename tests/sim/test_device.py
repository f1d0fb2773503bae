"""The simulated device: factory state, boot chain, environment redundancy, A/B, faults."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sim.conftest import FAST, reboot, to_recovery, write_region
from unbrick.errors import DeviceError, UsageError
from unbrick.sim.device import (
    FIRMWARE_BUSY,
    Faults,
    SimDevice,
    decode_env,
    encode_env,
    load_env,
    save_env,
)
from unbrick.sim.firmware import build_firmware
from unbrick.sim.flash import PowerLoss
from unbrick.sim.kinds import KINDS, create_device, get_kind, load_device, serial_for

pytestmark = pytest.mark.unit
FW = KINDS["router"].region("firmware")
SLOT_B = KINDS["router-ab"].region("firmware_b")


def fw_image(model: str = "SimRouter", version: str = "2.0.0", **kw: object) -> bytes:
    args: dict[str, object] = {"security_version": 1, "size_bytes": 256 * 1024, **kw}
    return build_firmware(model, version, **args)  # type: ignore[arg-type]


# -- layouts and factory state ----------------------------------------------------------------


def test_kind_layouts_are_the_shipped_ones() -> None:
    def layout(kind: str) -> list[tuple[str, int, int, str | None]]:
        return [(r.name, r.offset, r.size, r.slot) for r in KINDS[kind].regions]

    common = [
        ("bootloader", 0, 0x40000, None),
        ("env", 0x40000, 0x20000, None),
        ("calibration", 0x60000, 0x10000, None),
    ]
    assert layout("router") == [*common, ("firmware", 0x80000, 0x380000, None)]
    assert layout("router-ab") == [
        *common,
        ("firmware_a", 0x80000, 0x380000, "a"),
        ("firmware_b", 0x400000, 0x380000, "b"),
    ]
    for kind in KINDS.values():
        if kind.geometry.type != "nand":  # router-nand: see tests/sim/test_uboot_face_mtd.py
            assert kind.geometry.size_bytes == 8 << 20
            assert kind.geometry.erase_block_bytes == 64 << 10
        assert kind.region("bootloader").critical
    assert KINDS["router"].model == "SimRouter" and KINDS["router-ab"].model == "SimRouterAB"
    with pytest.raises(UsageError, match="unknown sim device kind"):
        get_kind("toaster")


def test_the_shipped_profiles_agree_with_the_kinds() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2] / "src/unbrick/data/profiles"
    for kind, name in (("router", "sim-router.toml"), ("router-ab", "sim-router-ab.toml")):
        path = root / name
        if not path.exists():
            pytest.skip(f"{name} is not in the tree")
        doc = tomllib.loads(path.read_text())
        got = [(r["name"], r["offset"], r["size"], r.get("slot")) for r in doc["region"]]
        want = [(r.name, r.offset, r.size, r.slot) for r in KINDS[kind].regions]
        assert got == want
        assert doc["match"]["model"] == KINDS[kind].model


def test_a_factory_device_boots_its_firmware(router: SimDevice) -> None:
    assert router.state == "firmware"
    assert router.firmware_version == "1.0.0"
    log = router.boot_log
    assert "ROM: bootloader at 0x000000 OK" in log
    assert "Loading Environment from SPIFlash... OK" in log
    assert "## Booting kernel from Legacy Image at 82000000 ..." in log
    assert "   Image Name:   SimRouter 1.0.0" in log
    assert "Starting kernel ...\n\nSimRouter firmware 1.0.0 booted\n\nlogin:" in log


def test_identify_reports_config_calibration_and_storage(router: SimDevice) -> None:
    ident = router.identify()
    assert (ident.model, ident.serial) == ("SimRouter", serial_for("r1"))
    assert (ident.hw_revision, ident.region, ident.security_version) == ("B2", "EU", 1)
    assert (ident.bootloader_version, ident.firmware_version) == ("2023.01-sim", "1.0.0")
    assert ident.storage is not None and ident.storage.size_bytes == 8 << 20
    assert ident.extra["mac"].startswith("02:") and ident.extra["state"] == "firmware"
    assert serial_for("r1") == serial_for("r1") != serial_for("r2")


def test_overrides_and_persistence_across_restarts(tmp_path: Path) -> None:
    dev = create_device(
        "router", tmp_path, "p", hw_revision="C1", region="US", security_version=3, faults=FAST
    )
    to_recovery(dev)
    dev.program(0x7F0000, b"kept across restarts")
    dev.close()
    again = load_device(tmp_path, "p", faults=FAST)
    try:
        ident = again.identify()
        assert (ident.hw_revision, ident.region, ident.security_version) == ("C1", "US", 3)
        assert again.state == "firmware"  # the factory firmware matches the device
        to_recovery(again)
        assert again.read(0x7F0000, 20) == b"kept across restarts"
    finally:
        again.close()


def test_flash_operations_are_refused_while_firmware_runs(router: SimDevice) -> None:
    for call in (
        lambda: router.read(0, 16),
        lambda: router.erase(FW.offset, 65536),
        lambda: router.program(FW.offset, b"x"),
        lambda: router.hash(0, 16),
    ):
        with pytest.raises(DeviceError, match=FIRMWARE_BUSY):
            call()
    to_recovery(router)
    assert "sim: recovery requested" in router.boot_log
    assert router.read(0, 8) == b"SIMBOOT1"


# -- the boot chain ---------------------------------------------------------------------------


def test_a_new_good_image_boots_and_reports_its_version(router: SimDevice) -> None:
    to_recovery(router)
    write_region(router, FW, fw_image(version="2.1.0"))
    assert reboot(router) == "firmware"
    assert router.firmware_version == "2.1.0"
    assert "SimRouter firmware 2.1.0 booted" in router.boot_log


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x04
    return bytes(out)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: _flip(d, 2), "Bad Magic Number"),
        (lambda d: b"", "Wrong Image Format for bootm command"),
        (lambda d: _flip(d, 33), "Bad Header Checksum"),
        (lambda d: _flip(d, 100_000), "Bad Data CRC"),
        (lambda d: d[: len(d) // 2], "Bad Data CRC"),  # an update cut short
    ],
)
def test_a_corrupt_image_soft_bricks_with_u_boots_message(
    router: SimDevice, mutate: object, message: str
) -> None:
    to_recovery(router)
    write_region(router, FW, mutate(fw_image()))  # type: ignore[operator]
    assert reboot(router) == "bootloader"
    assert message in router.boot_log
    assert "ERROR: can't get kernel image!" in router.boot_log
    assert router.boot_log.rstrip().endswith("=>")
    # A soft brick: the recovery interface answers and the flash can be rewritten.
    assert router.identify().firmware_version is None
    write_region(router, FW, fw_image(version="3.0.0"))
    assert reboot(router) == "firmware" and router.firmware_version == "3.0.0"


def test_a_bad_bootloader_hard_bricks(router: SimDevice) -> None:
    router.simulate_brick("hard")
    assert router.state == "dead"
    assert "no valid bootloader" in router.boot_log
    with pytest.raises(DeviceError, match="does not answer"):
        router.identify()
    with pytest.raises(DeviceError, match="does not answer"):
        router.read(0, 4)
    # The SPI face (a clip on the flash chip) still works: restore the bootloader through it.
    assert router.chip_info()["jedec_id"] == "ef4017"
    from unbrick.sim.firmware import build_bootloader

    router.spi_erase(0, 0x40000)
    router.spi_program(0, build_bootloader("2023.01-sim"))
    assert reboot(router) == "firmware"


def test_soft_brick_helper_damages_the_firmware(router_ab: SimDevice) -> None:
    router_ab.simulate_brick("soft")
    assert router_ab.state == "bootloader"
    assert router_ab.boot_log.count("Bad Data CRC") == 2
    with pytest.raises(UsageError):
        router_ab.simulate_brick("medium")


def test_anti_rollback_refuses_an_older_image(tmp_path: Path) -> None:
    dev = create_device("router", tmp_path, "ar", security_version=2, faults=FAST)
    try:
        assert dev.state == "firmware"
        to_recovery(dev)
        write_region(dev, FW, fw_image(version="0.9.0", security_version=1))
        assert reboot(dev) == "bootloader"
        assert "anti-rollback: image security version 1 is below the device's minimum 2" in (
            dev.boot_log
        )
    finally:
        dev.close()


def test_single_slot_panic_loop_stops_in_the_bootloader(router: SimDevice) -> None:
    to_recovery(router)
    write_region(router, FW, fw_image(panic=True))
    assert reboot(router) == "bootloader"
    assert router.boot_log.count("Kernel panic - not syncing") == 3
    assert "boot loop: 3 kernel panics in a row" in router.boot_log


def test_a_foreign_models_firmware_panics(router: SimDevice) -> None:
    to_recovery(router)
    write_region(router, FW, fw_image(model="SimRouterAB"))
    assert reboot(router) == "bootloader"
    assert "unsupported board SimRouter" in router.boot_log


# -- A/B ---------------------------------------------------------------------------------------


def test_ab_trial_then_commit(router_ab: SimDevice) -> None:
    assert router_ab.booted_slot == "a"
    to_recovery(router_ab)
    write_region(router_ab, SLOT_B, fw_image("SimRouterAB", "2.0.0", security_version=2))
    router_ab.set_trial("b")
    st = router_ab.boot_state()
    assert (st.active_slot, st.trial_slot, st.bootcount) == ("a", "b", 0)
    assert reboot(router_ab) == "firmware"
    assert (router_ab.booted_slot, router_ab.firmware_version) == ("b", "2.0.0")
    assert router_ab.boot_state().bootcount == 1
    router_ab.commit("b")  # from the running firmware, as fw_setenv does
    st = router_ab.boot_state()
    assert (st.active_slot, st.trial_slot, st.bootcount) == ("b", None, 0)
    assert router_ab.identify().security_version == 2  # the committed image raised the counter
    assert reboot(router_ab) == "firmware" and router_ab.booted_slot == "b"


def test_ab_falls_back_after_bootlimit_on_a_panicking_trial(router_ab: SimDevice) -> None:
    to_recovery(router_ab)
    write_region(router_ab, SLOT_B, fw_image("SimRouterAB", "2.0.0", panic=True))
    router_ab.set_trial("b")
    assert reboot(router_ab) == "firmware"
    assert (router_ab.booted_slot, router_ab.firmware_version) == ("a", "1.0.0")
    log = router_ab.boot_log
    assert log.count("Kernel panic - not syncing") == 3
    assert "Warning: Bootlimit (3) exceeded. Using altbootcmd." in log
    st = router_ab.boot_state()
    assert (st.active_slot, st.trial_slot, st.extra["upgrade_available"]) == ("a", None, "0")


def test_ab_bad_trial_image_boots_the_other_slot(router_ab: SimDevice) -> None:
    to_recovery(router_ab)
    write_region(router_ab, SLOT_B, fw_image("SimRouterAB")[:5000])
    router_ab.set_trial("b")
    assert reboot(router_ab) == "firmware"
    assert router_ab.booted_slot == "a"
    assert "Bad Data CRC" in router_ab.boot_log and "slot b: boot failed" in router_ab.boot_log
    with pytest.raises(DeviceError, match="does not hold a bootable image"):
        router_ab.commit("b")


def test_ab_refusals(router_ab: SimDevice, router: SimDevice) -> None:
    with pytest.raises(DeviceError, match="active slot"):
        router_ab.set_trial("a")
    with pytest.raises(DeviceError, match="no slot 'c'"):
        router_ab.set_trial("c")
    with pytest.raises(DeviceError, match="single firmware slot"):
        router.boot_state()


# -- environment redundancy --------------------------------------------------------------------


def test_env_codec_round_trip_and_damage() -> None:
    blob = encode_env(7, {"a": "1", "bootcmd": "run x; run y"}, 65536)
    assert decode_env(blob + b"\xff" * 100) == (7, {"a": "1", "bootcmd": "run x; run y"})
    for pos in range(0, len(blob), 3):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        assert decode_env(bytes(damaged)) is None
    with pytest.raises(DeviceError):
        encode_env(1, {"a=b": "1"}, 65536)


@given(cut=st.integers(0, 200), keys=st.integers(1, 20))
@settings(max_examples=40, deadline=None)
def test_an_env_write_cut_at_any_byte_leaves_the_previous_env(
    tmp_path_factory: pytest.TempPathFactory, cut: int, keys: int
) -> None:
    """Erase done, program cut after ``cut`` bytes: the other copy is still the valid one."""
    dev = create_device("router-ab", tmp_path_factory.mktemp("env"), "e", power_on=False)
    try:
        before, seq, target = load_env(dev.flash, dev.config)
        assert before is not None
        new = {**before, **{f"k{i}": "v" * i for i in range(keys)}}
        blob = encode_env(seq + 1, new, 65536)
        dev.flash.erase(target, 65536)
        dev.flash.program(target, blob[: min(cut, len(blob) - 1)])
        assert load_env(dev.flash, dev.config)[0] == before
        dev.flash.program(target, blob)  # the write completes: the new env wins
        assert load_env(dev.flash, dev.config)[0] == new
    finally:
        dev.close()


@pytest.mark.parametrize("cut_at", [1, 2])
def test_power_cut_during_an_env_write_keeps_a_valid_env(router_ab: SimDevice, cut_at: int) -> None:
    to_recovery(router_ab)
    lost = threading.Event()
    router_ab.add_power_listener(lost.set)
    before = router_ab.boot_state()
    router_ab.set_faults(Faults(power_cut_after_ops=cut_at, power_on_delay_s=0.01))
    with pytest.raises(PowerLoss):
        router_ab.set_trial("b")  # erase of the older copy (op 1), then its program (op 2)
    assert lost.is_set()
    assert router_ab.wait_state(("firmware", "bootloader"), 5.0) == "firmware"
    env, _, _ = load_env(router_ab.flash, router_ab.config)
    assert env is not None
    assert "bad CRC" not in router_ab.boot_log
    assert router_ab.boot_state() == before  # the write did not take; the old env stands
    router_ab.set_trial("b")  # and the next write works
    assert router_ab.boot_state().trial_slot == "b"


def test_env_writes_alternate_between_the_copies(router_ab: SimDevice) -> None:
    targets = []
    for slot_state in ("1", "0", "1"):
        _, _, target = load_env(router_ab.flash, router_ab.config)
        targets.append(target)
        env = dict(load_env(router_ab.flash, router_ab.config)[0] or {})
        env["upgrade_available"] = slot_state
        save_env(router_ab.flash, router_ab.config, env)
    assert targets[0] != targets[1] and targets[0] == targets[2]


def test_both_env_copies_bad_uses_the_default_environment(router_ab: SimDevice) -> None:
    to_recovery(router_ab)
    router_ab.erase(0x40000, 0x20000)
    assert reboot(router_ab) == "firmware"
    assert "*** Warning - bad CRC, using default environment" in router_ab.boot_log
    assert router_ab.boot_state().active_slot == "a"


# -- power cuts on flash writes ------------------------------------------------------------------


def test_power_cut_after_n_ops_leaves_a_partial_write_then_reboots(router: SimDevice) -> None:
    to_recovery(router)
    boots = router.boot_id
    router.set_faults(Faults(power_cut_after_ops=2, power_on_delay_s=0.01))
    router.erase(0x700000, 0x10000)  # operation 1
    with pytest.raises(PowerLoss):
        router.program(0x700000, b"\x00" * 0x8000)  # operation 2: half of it
    assert router.state == "off"
    state = router.wait_state(("firmware", "bootloader"), 5.0)
    assert state == "firmware" and router.boot_id == boots + 1
    to_recovery(router)
    assert router.read(0x700000, 0x8000) == b"\x00" * 0x4000 + b"\xff" * 0x4000


def test_power_cut_during_a_firmware_write_soft_bricks(router: SimDevice) -> None:
    to_recovery(router)
    router.set_faults(Faults(power_cut_after_ops=2, power_on_delay_s=0.01))
    router.erase(FW.offset, FW.size)
    with pytest.raises(PowerLoss):
        router.program(FW.offset, fw_image())
    assert router.wait_state(("firmware", "bootloader"), 5.0) == "bootloader"
    assert "Bad Data CRC" in router.boot_log


def test_power_cut_during_the_bootcount_write_still_boots(router_ab: SimDevice) -> None:
    to_recovery(router_ab)
    write_region(router_ab, SLOT_B, fw_image("SimRouterAB", "2.0.0"))
    router_ab.set_trial("b")
    router_ab.set_faults(Faults(power_cut_after_ops=1, power_on_delay_s=0.01))
    router_ab.reset()
    assert router_ab.wait_state(("firmware",), 5.0) == "firmware"
    assert router_ab.booted_slot == "b"


def test_closed_device_refuses(tmp_path: Path) -> None:
    dev = create_device("router", tmp_path, "c", faults=FAST)
    dev.close()
    with pytest.raises(DeviceError, match="closed"):
        dev.reset()
    dev.close()  # twice is fine
