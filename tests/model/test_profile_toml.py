"""Profiles from TOML: the shipped profiles, the strict schema, and the profile set."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import UsageError
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.profile import MatchRule, Profile, Region
from unbrick.model.profile_toml import (
    ProfileSet,
    builtin_profile_sources,
    load_profile,
    parse_size,
    region_size_bytes,
)

pytestmark = pytest.mark.unit

BASE = """\
id = "test-dev"
name = "Test device"
family = "router"
default_region = "firmware"

[match]
model = "TestDev"

[storage]
type = "nor"
size = "1MiB"
erase_block = "64KiB"

[[region]]
name = "boot"
offset = 0
size = 0x10000
kind = "bootloader"
critical = true

[[region]]
name = "firmware"
offset = 0x10000
size = 0xf0000

[recovery]
instructions = ["Hold reset while powering on."]
methods = ["sim"]

[boot]
success_pattern = "booted"

[compat]
models = ["TestDev"]

[loader]
region = "boot"
"""


def load(text: str, source: str = "test-dev.toml") -> Profile:
    return load_profile(text.encode(), source)


def refused(text: str, *fragments: str, source: str = "test-dev.toml") -> str:
    with pytest.raises(UsageError) as ei:
        load(text, source)
    msg = ei.value.message
    assert msg.startswith(f"profile {source}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def ident(**kw: object) -> DeviceIdentity:
    base: dict[str, object] = {"model": "TestDev", "serial": "S1"}
    base.update(kw)
    return DeviceIdentity(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Shipped profiles


def test_every_builtin_profile_loads_and_is_named_after_its_file() -> None:
    sources = builtin_profile_sources()
    names = {s for s, _ in sources}
    assert {
        "builtin:sim-router.toml",
        "builtin:sim-router-ab.toml",
        "builtin:qemu-virt-arm64.toml",
        "builtin:qemu-virt-arm.toml",
        "builtin:openwrt-tplink-archer-c7-v2.toml",
        "builtin:raspberry-pi-sd.toml",
        "builtin:esp32-devkitc.toml",
        "builtin:android-fastboot-generic.toml",
    } <= names
    for source, data in sources:
        profile = load_profile(data, source)
        assert source == f"builtin:{profile.id}.toml"
        assert profile.source == source
        assert profile.recovery.instructions


def test_sim_router_has_the_simulator_layout() -> None:
    p = ProfileSet.from_sources(builtin_profile_sources(), []).get("sim-router")
    assert p.family == "router"
    assert p.storage.type == "nor"
    assert p.storage.size_bytes == 8 << 20
    assert p.storage.erase_block_bytes == 64 << 10
    assert p.regions == (
        Region("bootloader", 0x000000, 0x040000, kind="bootloader", critical=True),
        Region("env", 0x040000, 0x020000, kind="env"),
        Region("calibration", 0x060000, 0x010000, kind="calibration"),
        Region("firmware", 0x080000, 0x380000, kind="firmware", formats=("uimage",)),
    )
    assert p.default_region == "firmware"
    assert p.match == (MatchRule("model", equals="SimRouter"),)
    assert p.compat.models == ("SimRouter",)
    assert p.compat.hw_revisions == ("B1", "B2")
    assert p.compat.regions == ("EU", "US")
    assert p.compat.min_bootloader == "2023.01"
    assert p.recovery.methods == ("sim",)
    assert p.boot.success_pattern is not None
    assert re.search(p.boot.success_pattern, "firmware 1.2.0 booted")
    assert p.boot.version_pattern is not None
    found = re.search(p.boot.version_pattern, "SimRouter firmware 2.1.0 booted\nlogin:")
    assert found is not None and found.group(1) == "2.1.0"
    for line in (
        "Bad Data CRC",
        "Bad Header Checksum",
        "Bad Magic Number",
        "Wrong Image Format",
        "Kernel panic",
    ):
        assert any(re.search(pat, line) for pat in p.boot.failure_patterns), line
    assert not p.is_ab


def test_sim_router_ab_has_two_slots_in_group_firmware() -> None:
    p = ProfileSet.from_sources(builtin_profile_sources(), []).get("sim-router-ab")
    assert p.is_ab
    assert p.match == (MatchRule("model", equals="SimRouterAB"),)
    assert p.default_region == "firmware"
    assert p.region("firmware") is None
    assert p.slots("firmware") == (
        Region(
            "firmware_a", 0x080000, 0x380000, slot="a", slot_group="firmware", formats=("uimage",)
        ),
        Region(
            "firmware_b", 0x400000, 0x380000, slot="b", slot_group="firmware", formats=("uimage",)
        ),
    )
    assert [r.name for r in p.regions[:3]] == ["bootloader", "env", "calibration"]


def test_realistic_profiles_hold_their_documented_facts() -> None:
    ps = ProfileSet.from_sources(builtin_profile_sources(), [])
    c7 = ps.get("openwrt-tplink-archer-c7-v2")
    assert c7.storage.size_bytes == 16 << 20
    assert [(r.name, r.offset, r.size, r.critical) for r in c7.regions] == [
        ("u-boot", 0, 0x20000, True),
        ("firmware", 0x20000, 0xFD0000, False),
        ("art", 0xFF0000, 0x10000, True),
    ]
    esp = ps.get("esp32-devkitc")
    assert esp.storage.size_bytes == 4 << 20
    assert {r.name: r.offset for r in esp.regions} == {
        "bootloader": 0x1000,
        "partition_table": 0x8000,
        "nvs": 0x9000,
        "phy_init": 0xF000,
        "app": 0x10000,
    }
    qemu = ps.get("qemu-virt-arm64")
    assert qemu.storage.erase_block_bytes == 128 << 10
    assert qemu.region("env") == Region("env", 0x04000000, 0x40000, kind="env")
    nor = qemu.region("nor-firmware")
    assert nor is not None and (nor.offset, nor.size) == (0x04040000, 4 << 20)
    disk = qemu.region("firmware")
    assert disk is not None and (disk.offset, disk.size) == (1 << 20, 32 << 20)
    android = ps.get("android-fastboot-generic")
    assert android.storage.size_bytes == 0
    assert {r.slot_group for r in android.regions} == {"boot", "dtbo", "vbmeta"}
    assert android.slots("boot")[0].formats == ("android-boot",)
    pi = ps.get("raspberry-pi-sd")
    disk = pi.region("disk")
    assert disk is not None
    assert region_size_bytes(disk, 32 << 30) == 32 << 30
    assert region_size_bytes(disk, None) is None


# ---------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0x40000, 0x40000),
        ("0x40000", 0x40000),
        ("262144", 262144),
        ("256KiB", 256 << 10),
        ("8MiB", 8 << 20),
        (" 8 MiB ", 8 << 20),
        ("2GiB", 2 << 30),
        ("0x1_0000", 0x10000),
    ],
)
def test_parse_size_accepts_numbers_hex_and_binary_units(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [True, "8MB", "8 mb", "-1", "0x", 1.5, "ten", -5, 1 << 60])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


# ---------------------------------------------------------------------------------------------
# Strict schema: unknown keys at every level


@pytest.mark.parametrize(
    ("anchor", "insert", "key", "table"),
    [
        ('family = "router"\n', "regoins = 1\n", "regoins", "the top level"),
        ('model = "TestDev"\n', 'modle = "x"\n', "modle", "[match]"),
        ('erase_block = "64KiB"\n', "sise = 1\n", "sise", "[storage]"),
        ("critical = true\n", "critcal = true\n", "critcal", "[[region]] #1 ('boot')"),
        ('methods = ["sim"]\n', "wait = 1\n", "wait", "[recovery]"),
        ('success_pattern = "booted"\n', "timeout = 3\n", "timeout", "[boot]"),
        ('models = ["TestDev"]\n', "min_bootlader = '1'\n", "min_bootlader", "[compat]"),
        ('region = "boot"\n', "regoin = 'boot'\n", "regoin", "[loader]"),
    ],
)
def test_unknown_key_is_named_with_its_table_and_file(
    anchor: str, insert: str, key: str, table: str
) -> None:
    assert anchor in BASE
    text = BASE.replace(anchor, anchor + insert, 1)
    msg = refused(text, f"unknown key '{key}' in {table}", "known keys:")
    assert msg.startswith("profile test-dev.toml: ")


def test_unknown_key_in_an_inline_match_rule() -> None:
    text = BASE.replace('model = "TestDev"', 'model = { patern = "Test.*" }')
    refused(text, "unknown key 'patern'", "[match] 'model'")


def test_match_rule_forms() -> None:
    text = BASE.replace(
        'model = "TestDev"',
        'model = "TestDev"\nhw_revision = ["B1", "B2"]\n'
        'bootloader_version = { pattern = "2023\\\\..*" }\n'
        '[match.extra]\nboard = { equals = "tb1" }\nmac = { one_of = ["a", "b"] }',
    )
    p = load(text)
    assert p.match == (
        MatchRule("model", equals="TestDev"),
        MatchRule("hw_revision", one_of=("B1", "B2")),
        MatchRule("bootloader_version", pattern="2023\\..*"),
        MatchRule("board", equals="tb1"),
        MatchRule("mac", one_of=("a", "b")),
    )
    assert p.matches(
        ident(hw_revision="B2", bootloader_version="2023.04", extra={"board": "tb1", "mac": "a"})
    )
    assert not p.matches(ident(hw_revision="B3", bootloader_version="2023.04"))


def test_extra_fields_must_go_under_match_extra() -> None:
    refused(BASE.replace('model = "TestDev"', 'board = "x"'), "unknown key 'board' in [match]")
    refused(
        BASE.replace('model = "TestDev"', '[match.extra]\nmodel = "x"'),
        "'model' belongs in [match]",
    )


def test_match_rule_must_set_exactly_one_form() -> None:
    refused(
        BASE.replace('model = "TestDev"', 'model = { equals = "a", pattern = "b" }'),
        "exactly one of",
    )


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ('size = "1MiB"', "size = true", ("'size' in [storage]", "boolean")),
        ("critical = true", 'critical = "yes"', ("'critical'", "true or false")),
        ('family = "router"', 'family = "toaster"', ("'family'", "expected one of")),
        ('type = "nor"', 'type = "floppy"', ("'type' in [storage]", "expected one of")),
        ('id = "test-dev"', 'id = "Test Dev"', ("'id' in the top level",)),
        ('methods = ["sim"]', 'methods = "sim"', ("'methods' in [recovery]", "list")),
        (
            'instructions = ["Hold reset while powering on."]',
            "instructions = []",
            ("must not be empty",),
        ),
        ('success_pattern = "booted"', 'success_pattern = "boot(ed"', ("regular expression",)),
        ('model = "TestDev"', 'model = { pattern = "[unclosed" }', ("regular expression",)),
        ('erase_block = "64KiB"', "erase_block = 3000", ("power of two",)),
        (
            'type = "nor"\nsize = "1MiB"',
            'type = "ram"\nsize = "device"',
            ("'type' in [storage]",),
        ),
        ('region = "boot"', 'region = "nowhere"', ("'region' in [loader]", "nowhere")),
        (
            'default_region = "firmware"',
            'default_region = "fw"',
            ("neither a region nor a slot group",),
        ),
        ("[boot]\n", "[boot]\ntimeout_s = -1\n", ("'timeout_s' in [boot]", "above 0")),
        (
            "[boot]\n",
            '[boot]\nversion_pattern = "v[0-9.]+"\n',
            ("'version_pattern' in [boot]", "needs a group"),
        ),
    ],
)
def test_type_and_value_errors_name_the_key(old: str, new: str, fragments: tuple[str, ...]) -> None:
    assert old in BASE
    refused(BASE.replace(old, new, 1), *fragments)


def test_missing_required_keys() -> None:
    refused(BASE.replace('id = "test-dev"\n', ""), "missing key 'id'")
    refused(BASE.replace("[recovery]\n", "[recovery_old]\n"), "unknown key 'recovery_old'")
    no_regions = BASE.split("[[region]]", maxsplit=1)[0] + '[recovery]\ninstructions = ["x"]\n'
    refused(no_regions, "missing key 'region'")


def test_not_toml_and_not_utf8() -> None:
    refused("id = ", "not valid TOML")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_profile(b"\xff\xfe", "bad.toml")


# ---------------------------------------------------------------------------------------------
# Regions


def _regions(
    *regions: str, storage: str = 'type = "nor"\nsize = "1MiB"\nerase_block = "64KiB"'
) -> str:
    body = "".join(f"[[region]]\n{r}\n" for r in regions)
    return (
        'id = "r"\nname = "R"\nfamily = "router"\n'
        f"[storage]\n{storage}\n{body}"
        '[recovery]\ninstructions = ["x"]\n'
    )


def test_overlapping_regions_are_refused() -> None:
    text = _regions(
        'name = "a"\noffset = 0\nsize = 0x20000',
        'name = "b"\noffset = 0x10000\nsize = 0x10000',
    )
    refused(text, "regions 'a' (0x0-0x20000) and 'b' (0x10000-0x20000) overlap", source="r.toml")


def test_misaligned_regions_are_refused() -> None:
    refused(
        _regions('name = "a"\noffset = 0x1000\nsize = 0x10000'),
        "'offset' in [[region]] #1 ('a')",
        "not aligned to the erase block (0x10000)",
        source="r.toml",
    )
    refused(
        _regions('name = "a"\noffset = 0\nsize = 0x18000'),
        "'size' in [[region]] #1 ('a')",
        "not a multiple of the erase block",
        source="r.toml",
    )


def test_region_outside_storage_is_refused() -> None:
    refused(
        _regions('name = "a"\noffset = 0xf0000\nsize = 0x20000'),
        "ends at 0x110000, past the end of the storage (0x100000)",
        source="r.toml",
    )


def test_duplicate_region_names_are_refused() -> None:
    refused(
        _regions(
            'name = "a"\noffset = 0\nsize = 0x10000', 'name = "a"\noffset = 0x10000\nsize = 0x10000'
        ),
        "two [[region]] tables are named 'a'",
        source="r.toml",
    )


def test_bootloader_regions_must_be_critical() -> None:
    refused(
        _regions('name = "a"\noffset = 0\nsize = 0x10000\nkind = "bootloader"'),
        "critical = true",
        source="r.toml",
    )


def test_unknown_format_is_refused() -> None:
    refused(
        _regions('name = "a"\noffset = 0\nsize = 0x10000\nformats = ["jpeg"]'),
        "unknown format 'jpeg'",
        source="r.toml",
    )


def test_slot_pairs_must_be_complete_and_alike() -> None:
    refused(
        _regions('name = "fa"\noffset = 0\nsize = 0x10000\nslot = "a"\nslot_group = "fw"'),
        "slot group 'fw' has slots ['a']",
        source="r.toml",
    )
    refused(
        _regions(
            'name = "fa"\noffset = 0\nsize = 0x10000\nslot = "a"\nslot_group = "fw"',
            'name = "fb"\noffset = 0x10000\nsize = 0x20000\nslot = "b"\nslot_group = "fw"',
        ),
        "A/B slots must be alike",
        source="r.toml",
    )
    refused(
        _regions('name = "fa"\noffset = 0\nsize = 0x10000\nslot = "a"'),
        "both 'slot' and 'slot_group'",
        source="r.toml",
    )
    refused(
        _regions(
            'name = "fa"\noffset = 0\nsize = 0x10000\nslot = "a"\nslot_group = "fa"',
            'name = "fb"\noffset = 0x10000\nsize = 0x10000\nslot = "b"\nslot_group = "fa"',
        ),
        "has the name of a region",
        source="r.toml",
    )


def test_rest_of_storage_and_device_sized_storage() -> None:
    p = load_profile(
        _regions(
            'name = "a"\noffset = 0\nsize = 0x10000', 'name = "b"\noffset = 0x10000\nsize = "rest"'
        ).encode(),
        "r.toml",
    )
    assert p.regions[1].size == 0xF0000
    block = 'type = "block"\nsize = "device"\nerase_block = 512'
    p = load_profile(
        _regions('name = "disk"\noffset = 0x100000\nsize = "rest"', storage=block).encode(),
        "r.toml",
    )
    assert (p.storage.size_bytes, p.regions[0].offset, p.regions[0].size) == (0, 0x100000, 0)
    refused(
        _regions(
            'name = "disk"\noffset = 0\nsize = "rest"',
            'name = "tail"\noffset = 0x100000\nsize = 0x1000',
            storage=block,
        ),
        "runs to the end of the storage",
        source="r.toml",
    )
    # By-name partitions: neither offset nor size, only with a device-sized storage.
    p = load_profile(_regions('name = "boot"', storage=block).encode(), "r.toml")
    assert (p.regions[0].offset, p.regions[0].size) == (0, 0)
    refused(_regions('name = "boot"'), "needs 'offset' and 'size'", source="r.toml")
    refused(_regions('name = "boot"\noffset = 0'), "missing key 'size'", source="r.toml")


# ---------------------------------------------------------------------------------------------
# The profile set


def _profile(pid: str, match: str, source: str | None = None) -> tuple[str, bytes]:
    text = BASE.replace('id = "test-dev"', f'id = "{pid}"').replace(
        'model = "TestDev"\n', match + "\n"
    )
    return (source or f"{pid}.toml", text.encode())


def test_match_lists_the_most_specific_profile_first() -> None:
    ps = ProfileSet.from_sources(
        [
            _profile("generic", 'model = "TestDev"'),
            _profile("rev-b", 'model = "TestDev"\nhw_revision = ["B1", "B2"]'),
            _profile(
                "rev-b-eu",
                'model = "TestDev"\nhw_revision = "B1"\nregion = { pattern = "EU|UK" }',
            ),
            _profile("other", 'model = "Other"'),
            _profile("by-name", ""),
        ],
        [],
    )
    assert [p.id for p in ps.match(ident(hw_revision="B1", region="EU"))] == [
        "rev-b-eu",
        "rev-b",
        "generic",
    ]
    assert [p.id for p in ps.match(ident(hw_revision="B2"))] == ["rev-b", "generic"]
    assert ps.match(ident(model="Nope")) == []
    # Profiles without rules are chosen by id only.
    assert ps.get("by-name").match == ()


def test_user_profile_overrides_builtin_with_same_id() -> None:
    builtin = [_profile("dev", 'model = "TestDev"', "builtin:dev.toml")]
    user_text = BASE.replace('id = "test-dev"', 'id = "dev"').replace(
        'name = "Test device"', 'name = "My device"'
    )
    ps = ProfileSet.from_sources(builtin, [("/home/u/dev.toml", user_text.encode())])
    assert len(ps.all()) == 1
    assert ps.get("dev").name == "My device"
    assert ps.get("dev").source == "/home/u/dev.toml"


def test_duplicate_ids_in_one_list_and_unknown_ids() -> None:
    with pytest.raises(UsageError, match="both have id 'dev'"):
        ProfileSet.from_sources(
            [_profile("dev", 'model = "A"', "a.toml"), _profile("dev", 'model = "B"', "b.toml")],
            [],
        )
    ps = ProfileSet.from_sources([_profile("dev", 'model = "A"')], [])
    with pytest.raises(UsageError) as ei:
        ps.get("nope")
    assert "known profiles: dev" in ei.value.hint
    assert ps.find("nope") is None


def test_storage_of_a_device_resolves_rest_regions() -> None:
    r = Region("disk", 0x1000, 0)
    assert region_size_bytes(r, 0x3000) == 0x2000
    assert region_size_bytes(r, 0x1000) is None
    assert region_size_bytes(Region("x", 0, 5), None) == 5
    assert StorageInfo("block", 1).size_bytes == 1


# ---------------------------------------------------------------------------------------------
# Fuzz


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_give_usage_errors_only(data: bytes) -> None:
    with contextlib.suppress(UsageError):
        load_profile(data, "fuzz.toml")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_profiles_load_or_give_usage_errors(data: st.DataObject) -> None:
    text = BASE
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text) - 1))
        j = data.draw(st.integers(i, min(len(text), i + 8)))
        text = text[:i] + data.draw(st.text(max_size=4)) + text[j:]
    try:
        p = load_profile(text.encode("utf-8", "surrogatepass"), "fuzz.toml")
    except UsageError:
        return
    if p.storage.size_bytes:
        for r in p.regions:
            assert r.offset + r.size <= p.storage.size_bytes


def test_link_tables_set_uri_defaults_and_the_backup_scope() -> None:
    p = load(
        BASE
        + "\n[link.uboot]\nboot_bank = true\nnor_fallback = false\nbaud = 57600\n"
        + 'interrupt = "ctrl-c"\nbackup_scope = "target"\n',
        "test-dev.toml",
    )
    assert p.link_params("uboot") == {
        "boot_bank": "on",
        "nor_fallback": "off",
        "baud": "57600",
        "interrupt": "ctrl-c",
    }
    assert p.backup_scope("uboot") == "target"
    assert p.link_params("sim") == {} and p.backup_scope("sim") == "full"
    builtin = dict(builtin_profile_sources())
    router = load_profile(builtin["builtin:sim-router.toml"], "builtin:sim-router.toml")
    assert router.link_params("uboot") == {"boot_bank": "on"}
    assert router.backup_scope("uboot") == "target"


@pytest.mark.parametrize(
    ("table", "fragments"),
    [
        ("[link.serialport]\nbaud = 1\n", ("unknown link [link.serialport]", "uboot")),
        ("[link.uboot]\n'Bad Key' = 1\n", ("'Bad Key' in [link.uboot] is not a URI parameter",)),
        ("[link.uboot]\nbaud = 1.5\n", ("'baud' in [link.uboot] must be a string, number",)),
        ('[link.uboot]\nbackup_scope = "half"\n', ("must be one of full, target",)),
        ("link = 3\n", ("'link' in the top level must be tables",)),
        ("[link]\nuboot = 3\n", ("[link.uboot] must be a table",)),
    ],
)
def test_bad_link_tables_are_refused(table: str, fragments: tuple[str, ...]) -> None:
    text = table + BASE if table.startswith("link =") else BASE + "\n" + table
    refused(text, *fragments)


def test_oem_allow_is_a_typed_list_and_never_a_uri_parameter() -> None:
    p = load(
        BASE + '\n[link.fastboot]\noem_allow = ["device-info", "get-log all"]\nwait = 30\n'
        'backup_scope = "target"\n'
    )
    assert p.oem_allow("fastboot") == ("device-info", "get-log all")
    assert p.link_params("fastboot") == {"wait": "30"}
    assert p.backup_scope("fastboot") == "target"
    assert p.oem_allow("uboot") == () and load(BASE).oem_allow("fastboot") == ()
    builtin = dict(builtin_profile_sources())
    generic = load_profile(
        builtin["builtin:android-fastboot-generic.toml"], "builtin:android-fastboot-generic.toml"
    )
    assert generic.oem_allow("fastboot") == ("device-info",)
    assert "oem_allow" not in generic.link_params("fastboot")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"device-info"', "must be a list of non-empty strings, not 'device-info'"),
        ("[3]", "must be a list of non-empty strings, not [3]"),
        ('["device-info", ""]', "must be a list of non-empty strings"),
        ('["device  info"]', "has 'device  info'; each item is an oem command"),
        ('["device-info\\n"]', "each item is an oem command"),
        ('["it\'s"]', "each item is an oem command"),
        ('["oem device-info"]', "write the command without 'oem'"),
        ('["device-info", "device-info"]', "lists an item twice"),
    ],
)
def test_bad_oem_allow_lists_are_refused(value: str, fragment: str) -> None:
    msg = refused(
        BASE + f"\n[link.fastboot]\noem_allow = {value}\n",
        "'oem_allow' in [link.fastboot]",
        fragment,
        source="my-phone.toml",
    )
    assert "\n" not in msg


def test_oem_allow_only_on_links_with_oem_commands() -> None:
    refused(
        BASE + '\n[link.uboot]\noem_allow = ["device-info"]\n',
        "'oem_allow' in [link.uboot]: uboot links have no oem commands (only fastboot)",
    )
