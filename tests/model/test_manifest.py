"""Firmware manifests: unbrick's TOML sidecar and Android's android-info.txt."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import UsageError
from unbrick.model.manifest import (
    AndroidInfo,
    parse_android_info,
    parse_manifest,
    value_matches,
)
from unbrick.model.manifest import (
    evaluate as evaluate_info,
)

pytestmark = pytest.mark.unit

SHA = "ab" * 32

FULL = f"""\
format = "unbrick-manifest-1"
model = "SimRouter"
version = "2.1.0"
security_version = 3
hw_revisions = ["B1", "B2"]
regions = ["EU"]
min_bootloader = "2023.01"
target = "firmware"
sha256 = "{SHA.upper()}"
"""


def test_full_manifest() -> None:
    m = parse_manifest(FULL.encode(), "fw.bin.toml")
    assert (m.model, m.version, m.security_version) == ("SimRouter", "2.1.0", 3)
    assert m.hw_revisions == ("B1", "B2")
    assert m.regions == ("EU",)
    assert m.min_bootloader == "2023.01"
    assert m.target == "firmware"
    assert m.sha256 == SHA
    assert m.source == "fw.bin.toml"
    req = m.requirements()
    assert req.source == "manifest fw.bin.toml"
    assert req.models == ("SimRouter",)
    assert (req.version, req.security_version, req.min_bootloader) == ("2.1.0", 3, "2023.01")
    assert m.to_dict()["sha256"] == SHA


def test_minimal_manifest_defaults() -> None:
    m = parse_manifest(b'format = "unbrick-manifest-1"\nmodel = "X"\nversion = "1"\n', "m.toml")
    assert m.security_version == 0
    assert m.hw_revisions == () and m.regions == ()
    assert m.min_bootloader is None and m.target is None and m.sha256 is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (FULL + "modle = 'x'\n", "unknown key 'modle'; known keys: format, model"),
        (
            FULL.replace('"unbrick-manifest-1"', '"unbrick-manifest-2"'),
            "format is 'unbrick-manifest-2'",
        ),
        (FULL.replace('model = "SimRouter"\n', ""), "missing key 'model'"),
        (FULL.replace('version = "2.1.0"', "version = 2"), "'version' must be a non-empty string"),
        (FULL.replace("security_version = 3", "security_version = -1"), "'security_version'"),
        (FULL.replace("security_version = 3", "security_version = true"), "'security_version'"),
        (FULL.replace('["B1", "B2"]', '"B1"'), "'hw_revisions' must be a list"),
        (FULL.replace(SHA.upper(), "abc"), "'sha256' must be 64 hex digits"),
        ("format = ", "not valid TOML"),
    ],
)
def test_manifest_refusals(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse_manifest(text.encode(), "fw.toml")
    assert ei.value.message.startswith("manifest fw.toml: ")
    assert fragment in ei.value.message


def test_manifest_not_utf8() -> None:
    with pytest.raises(UsageError, match="not UTF-8"):
        parse_manifest(b"\xff", "fw.toml")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_manifest_fuzz_gives_usage_errors_only(data: bytes) -> None:
    with contextlib.suppress(UsageError):
        parse_manifest(data, "fuzz.toml")


# ---------------------------------------------------------------------------------------------
# android-info.txt


def failures(text: str, getvar: dict[str, str], product: str | None = None) -> list[str]:
    return [f.requirement.text for f in evaluate_info(parse_android_info(text), getvar, product)]


def test_parse_each_directive() -> None:
    info = parse_android_info(
        "require board=sailfish|marlin\n"
        "require version-bootloader=8996-012001-1904111134 | 8996-012001-1908071822\n"
        "require version-baseband=8996-130181-1905270421\n"
        "require-for-product:marlin version-baseband=X\n"
        "reject version-bootloader=old*\n"
        "require partition-exists=vendor\n"
        "# a comment = not a requirement\n"
        "\n"
        "bogus line without equals\n"
        "version-bootloader=bare\n"
    )
    reqs = info.requirements
    assert [(r.name, r.values, r.invert, r.product) for r in reqs] == [
        ("product", ("sailfish", "marlin"), False, None),
        ("version-bootloader", ("8996-012001-1904111134", "8996-012001-1908071822"), False, None),
        ("version-baseband", ("8996-130181-1905270421",), False, None),
        ("version-baseband", ("X",), False, "marlin"),
        ("version-bootloader", ("old*",), True, None),
        ("partition-exists", ("vendor",), False, None),
        ("version-bootloader", ("bare",), False, None),
    ]
    assert info.ignored == ((9, "bogus line without equals"),)
    assert info.boards() == ("sailfish", "marlin")
    assert info.variables() == (
        "product",
        "version-bootloader",
        "version-baseband",
        "has-slot:vendor",
    )


def test_require_board_maps_to_product_with_alternatives() -> None:
    text = "require board=sailfish|marlin\n"
    assert failures(text, {"product": "marlin"}) == []
    assert failures(text, {"product": "sailfish"}) == []
    assert failures(text, {"product": "walleye"}) == ["require board=sailfish|marlin"]
    assert failures("require product=walleye", {"product": "walleye"}) == []


def test_failure_message_names_found_and_expected() -> None:
    info = parse_android_info("require version-bootloader=A|B\n")
    (f,) = evaluate_info(info, {"product": "p", "version-bootloader": "C"})
    assert f.found == "C"
    assert f.message == "device version-bootloader is 'C'; the update requires 'A' or 'B' (line 1)"
    assert f.overridable


def test_wildcard_only_as_trailing_star() -> None:
    assert value_matches("8996-*", "8996-0120")
    assert value_matches("*", "anything")
    assert value_matches("*", "")
    assert not value_matches("8996-*", "8997-0120")
    assert not value_matches("*-0120", "8996-0120")  # a leading * is literal
    assert value_matches("*-0120", "*-0120")
    assert failures("require version-baseband=g8996-*", {"version-baseband": "g8996-1"}) == []


def test_reject_fails_when_any_value_matches() -> None:
    text = "reject version-bootloader=bad1|bad*\n"
    assert failures(text, {"version-bootloader": "good"}) == []
    assert failures(text, {"version-bootloader": "bad1"}) == [text.strip()]
    assert failures(text, {"version-bootloader": "bad7"}) == [text.strip()]
    (f,) = evaluate_info(parse_android_info(text), {"version-bootloader": "bad1"})
    assert "the update rejects 'bad1' or 'bad*'" in f.message


def test_require_for_product_applies_only_to_that_product() -> None:
    text = "require-for-product:marlin version-bootloader=M1\n"
    assert failures(text, {"product": "sailfish", "version-bootloader": "S1"}) == []
    assert failures(text, {"product": "marlin", "version-bootloader": "M1"}) == []
    assert failures(text, {"product": "marlin", "version-bootloader": "M0"}) == [text.strip()]
    # The product given explicitly wins over getvar's.
    assert failures(text, {"product": "marlin", "version-bootloader": "M0"}, "sailfish") == []
    # Without a product, only a require-for-product: line for "" would apply.
    assert failures(text, {"version-bootloader": "M0"}) == []
    # Spaces allowed after the colon, as fastboot's pattern allows.
    assert failures(
        "require-for-product: marlin version-bootloader=M1",
        {"product": "marlin", "version-bootloader": "x"},
    )


def test_unanswered_variable_fails_even_for_reject() -> None:
    assert failures("require version-baseband=1", {}) == ["require version-baseband=1"]
    assert failures("reject version-baseband=1", {}) == ["reject version-baseband=1"]
    (f,) = evaluate_info(parse_android_info("require version-baseband=1"), {})
    assert f.found is None
    assert "did not answer getvar 'version-baseband'" in f.message


def test_partition_exists_needs_has_slot_yes_or_no_and_cannot_be_forced() -> None:
    text = "require partition-exists=vendor_boot\n"
    assert failures(text, {"has-slot:vendor_boot": "yes"}) == []
    assert failures(text, {"has-slot:vendor_boot": "no"}) == []
    for answer in ({}, {"has-slot:vendor_boot": ""}):
        (f,) = evaluate_info(parse_android_info(text), answer)
        assert not f.overridable
        assert "no partition 'vendor_boot'" in f.message
    # Whatever the keyword or product, partition-exists is always checked.
    assert failures("reject partition-exists=x", {}) == ["reject partition-exists=x"]
    assert failures("require-for-product:other partition-exists=x", {"product": "p"}) == [
        "require-for-product:other partition-exists=x"
    ]


def test_line_shapes_as_fastboots_pattern_reads_them() -> None:
    info = parse_android_info(
        "require   board =  a | b  \n"  # spaces around = and values are trimmed
        "require a=b=c\n"  # the name is the longest non-space run before an '='
        "board=x y|z\n"  # no keyword: a require line; values keep inner spaces
        "  require board=q\n"  # leading spaces: not a directive fastboot recognises
        "require board=crlf\r\n"
        "reject  product=\n"
    )
    got = [(r.name, r.values, r.invert) for r in info.requirements]
    assert got == [
        ("product", ("a", "b"), False),
        ("a=b", ("c",), False),
        ("product", ("x y", "z"), False),
        ("product", ("crlf",), False),
        ("product", ("",), True),
    ]
    assert info.ignored == ((4, "  require board=q"),)


def test_evaluate_returns_every_failure_in_file_order() -> None:
    text = "require board=a\nrequire version-bootloader=1\nrequire version-baseband=2\n"
    got = failures(text, {"product": "b", "version-bootloader": "1", "version-baseband": "3"})
    assert got == ["require board=a", "require version-baseband=2"]


def test_too_large_android_info() -> None:
    with pytest.raises(UsageError, match="too large"):
        parse_android_info("x" * ((1 << 20) + 1))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.dictionaries(st.text(max_size=10), st.text(max_size=10)))
def test_android_info_fuzz(text: str, getvar: dict[str, str]) -> None:
    info = parse_android_info(text)
    assert isinstance(info, AndroidInfo)
    for f in evaluate_info(info, getvar):
        assert f.message
