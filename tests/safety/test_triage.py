"""Brick triage: question flow, diagnoses from symptom sets, strict data validation."""

from __future__ import annotations

from importlib import resources

import pytest

from unbrick.errors import UsageError
from unbrick.safety.triage import Triage

pytestmark = pytest.mark.unit

DATA = resources.files("unbrick.data").joinpath("triage.toml").read_bytes()
TRIAGE = Triage.from_toml(DATA)


def flow(answers_in_order: dict[str, str], family: str | None) -> list[str]:
    """Answer the questions as they come; returns the ids asked, in order."""
    answers: dict[str, str] = {}
    asked: list[str] = []
    while (q := TRIAGE.next_question(answers, family)) is not None:
        asked.append(q.id)
        answers[q.id] = answers_in_order[q.id]
    return asked


def test_question_flow_follows_the_answers() -> None:
    alive = {
        "power": "yes",
        "damage": "no",
        "cause": "during_update",
        "behaviour": "stuck_leds",
        "mode": "none",
        "usb": "no_port",
        "network": "link_only",
        "serial": "silent",
    }
    assert flow(alive, "router") == [
        "power",
        "damage",
        "cause",
        "behaviour",
        "mode",
        "usb",
        "network",
        "serial",
    ]
    # Phones are not asked about the LAN port or the serial console.
    assert flow(alive, "phone") == ["power", "damage", "cause", "behaviour", "mode", "usb"]
    dead = {
        "power": "no",
        "power_checked": "yes",
        "damage": "no",
        "cause": "by_itself",
        "usb": "no",
    }
    # No power: asked about the supply, not about the screen, modes or network.
    assert flow({**dead, "serial": "silent"}, "router") == [
        "power",
        "power_checked",
        "damage",
        "cause",
        "usb",
        "serial",
    ]


def test_next_question_with_everything_answered_is_none() -> None:
    answers = {
        "power": "no",
        "power_checked": "no",
        "damage": "no",
        "cause": "by_itself",
        "usb": "no",
    }
    assert TRIAGE.next_question(answers, "phone") is None
    q = TRIAGE.next_question({}, None)
    assert q is not None and q.id == "power"
    assert q.answer_ids() == ("yes", "no")


ALIVE = {"power": "yes", "damage": "no"}

CASES: list[tuple[str, dict[str, str], str, str, list[str]]] = [
    # family, answers, class, rule, paths (in order)
    (
        "router",
        {**ALIVE, "cause": "during_update", "behaviour": "stuck_leds", "mode": "uboot"},
        "soft",
        "bootloader-mode",
        ["uboot-tftp", "vendor-tftp", "web-recovery", "nmrp", "spi-clip"],
    ),
    (
        "router",
        {**ALIVE, "behaviour": "dark", "mode": "none", "network": "recovery_page"},
        "soft",
        "recovery-page",
        ["web-recovery", "uboot-tftp", "vendor-tftp", "nmrp", "spi-clip"],
    ),
    (
        "router",
        {
            **ALIVE,
            "cause": "during_update",
            "behaviour": "stuck_leds",
            "mode": "none",
            "usb": "no_port",
            "network": "nothing",
            "serial": "silent",
        },
        "hard",
        "dark-after-flash",
        ["spi-clip"],
    ),
    (
        "router",
        {**ALIVE, "behaviour": "boot_loop", "mode": "vendor_recovery"},
        "soft",
        "bootloader-mode",
        # Confirmed first; web-recovery stays, as no network answer rules it out.
        ["vendor-tftp", "uboot-tftp", "web-recovery", "nmrp", "spi-clip"],
    ),
    (
        "phone",
        {**ALIVE, "behaviour": "boot_loop", "mode": "fastboot"},
        "soft",
        "bootloader-mode",
        ["fastboot", "recovery-sideload", "odin", "edl"],
    ),
    (
        "phone",
        {**ALIVE, "behaviour": "dark", "mode": "edl", "usb": "yes"},
        "hard",
        "emergency-mode-only",
        ["edl", "isp-jtag"],
    ),
    (
        "phone",
        {
            "power": "no",
            "power_checked": "yes",
            "damage": "no",
            "cause": "wrong_image",
            "usb": "yes",
        },
        "hard",
        "usb-rom-no-power",
        ["edl", "isp-jtag"],
    ),
    (
        "phone",
        {"power": "no", "power_checked": "no", "damage": "no", "usb": "no"},
        "hardware",
        "power-unchecked",
        [],
    ),
    (
        "phone",
        {"power": "no", "power_checked": "yes", "damage": "no", "usb": "no"},
        "hardware",
        "no-power",
        [],
    ),
    (
        "phone",
        {**ALIVE, "damage": "yes", "behaviour": "dark", "mode": "none", "usb": "no"},
        "hardware",
        "damage",
        [],
    ),
    (
        "sbc",
        {
            **ALIVE,
            "behaviour": "dark",
            "mode": "none",
            "usb": "no",
            "network": "nothing",
            "serial": "not_tried",
            "cause": "after_change",
        },
        "hard",
        "dark",
        ["reimage-sd", "eeprom-recovery", "usb-rom", "spi-clip"],
    ),
    (
        "sbc",
        {**ALIVE, "behaviour": "logo_freeze"},
        "soft",
        "firmware-fails",
        ["reimage-sd", "usb-rom", "uboot-tftp", "spi-clip"],
    ),
    (
        "mcu",
        {**ALIVE, "behaviour": "dark", "mode": "rom_bootloader"},
        "soft",
        "rom-bootloader",
        ["rom-bootloader", "swd-jtag"],
    ),
    (
        "mcu",
        {
            **ALIVE,
            "behaviour": "dark",
            "mode": "none",
            "serial": "silent",
            "cause": "during_update",
        },
        "hard",
        "dark-after-flash",
        ["rom-bootloader", "swd-jtag"],
    ),
    (
        "nas",
        {**ALIVE, "behaviour": "stuck_leds", "mode": "none", "serial": "stops"},
        "soft",
        "serial-stops",
        ["vendor-reinstall", "uboot-tftp", "vendor-tftp", "spi-clip"],
    ),
    (
        "iot",
        {**ALIVE, "behaviour": "dark", "mode": "not_tried"},
        "unknown",
        "try-modes-first",
        ["rom-bootloader", "uboot-tftp", "vendor-tftp", "spi-clip", "swd-jtag"],
    ),
    (
        "router",
        {
            **ALIVE,
            "behaviour": "stuck_leds",
            "mode": "none",
            "cause": "by_itself",
            "serial": "silent",
        },
        "hardware",
        "died-by-itself",
        [],
    ),
    (
        "router",
        {},
        "unknown",
        "unsure",
        ["uboot-tftp", "vendor-tftp", "web-recovery", "nmrp", "spi-clip"],
    ),
]


@pytest.mark.parametrize(("family", "answers", "klass", "rule", "paths"), CASES)
def test_symptoms_to_diagnosis(
    family: str, answers: dict[str, str], klass: str, rule: str, paths: list[str]
) -> None:
    d = TRIAGE.diagnose(answers, family)
    assert (d.brick_class, d.rule) == (klass, rule)
    assert [p.path.id for p in d.paths] == paths
    assert d.summary and d.professional and d.risk in ("low", "medium", "high")


def test_confirmed_paths_come_first_and_tools_are_collected() -> None:
    d = TRIAGE.diagnose({**ALIVE, "mode": "uboot", "serial": "prompt"}, "router")
    assert d.paths[0].path.id == "uboot-tftp" and d.paths[0].confirmed
    assert not any(p.confirmed for p in d.paths[1:])
    assert d.tools[0].startswith("USB-serial adapter at 3.3 V")
    assert len(d.tools) == len(set(d.tools))
    assert "TFTP server on this computer" in d.tools
    out = d.to_dict()
    assert out["class"] == "soft" and out["paths"][0]["confirmed"] is True
    assert out["answers"] == {**ALIVE, "mode": "uboot", "serial": "prompt"}


def test_ruled_out_paths_are_dropped() -> None:
    d = TRIAGE.diagnose({**ALIVE, "behaviour": "boot_loop", "network": "nothing"}, "router")
    assert "web-recovery" not in [p.path.id for p in d.paths]


def test_without_a_family_there_are_no_paths() -> None:
    d = TRIAGE.diagnose({**ALIVE, "mode": "fastboot"}, None)
    assert d.brick_class == "soft" and d.paths == () and d.family is None


def test_unknown_question_answer_or_family() -> None:
    with pytest.raises(UsageError) as ei:
        TRIAGE.diagnose({"colour": "red"}, "router")
    assert "no triage question 'colour'" in ei.value.message
    assert "power" in ei.value.hint and "serial" in ei.value.hint
    with pytest.raises(UsageError) as ei:
        TRIAGE.next_question({"power": "maybe"})
    assert ei.value.message == "'maybe' is not an answer to 'power'"
    assert ei.value.hint == "answers to 'power': yes, no"
    with pytest.raises(UsageError, match="unknown device family 'toaster'"):
        TRIAGE.diagnose({}, "toaster")


# ---------------------------------------------------------------------------------------------
# Data validation

MINI = """\
format = "unbrick-triage-1"

[classes.soft]
label = "soft"
levels = ["soft"]

[[question]]
id = "power"
text = "Power?"
[question.answers]
yes = "yes"
no = "no"

[[question]]
id = "mode"
text = "Mode?"
ask_if = { power = "yes" }
[question.answers]
a = "a"
b = "b"

[[path]]
id = "p1"
name = "Path one"
levels = ["soft"]
risk = "low"
tools = ["t"]
steps = ["s"]
confirmed_by = { mode = "a" }

[families]
router = ["p1"]

[[rule]]
id = "r1"
when = { power = "no" }
class = "soft"
risk = "low"
summary = "s"
professional = "p"

[[rule]]
id = "last"
class = "soft"
risk = "low"
summary = "s"
professional = "p"
"""


def test_minimal_data_loads() -> None:
    t = Triage.from_toml(MINI.encode())
    assert [q.id for q in t.questions] == ["power", "mode"]
    assert t.next_question({"power": "no"}) is None
    assert t.diagnose({"power": "yes", "mode": "a"}, "router").paths[0].confirmed


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ('format = "unbrick-triage-1"', 'format = "x"', "format is 'x'"),
        (
            'format = "unbrick-triage-1"\n',
            'format = "unbrick-triage-1"\nextra = 1\n',
            "unknown key 'extra' in the top level",
        ),
        (
            'levels = ["soft"]\n\n[[question]]',
            'levels = ["soft"]\ncolour = 1\n\n[[question]]',
            "unknown key 'colour' in [classes.soft]",
        ),
        (
            'text = "Power?"',
            'text = "Power?"\nhelpp = "x"',
            "unknown key 'helpp' in [[question]] #1",
        ),
        (
            'risk = "low"\ntools',
            'risk = "low"\ntool = ["x"]\ntools',
            "unknown key 'tool' in [[path]] #1",
        ),
        ('id = "r1"', 'id = "r1"\nclas = "x"', "unknown key 'clas' in [[rule]] #1"),
        (
            'ask_if = { power = "yes" }',
            'ask_if = { powr = "yes" }',
            "refers to unknown question 'powr'",
        ),
        (
            'ask_if = { power = "yes" }',
            'ask_if = { power = "maybe" }',
            "unknown answer 'maybe' of question 'power'",
        ),
        (
            'ask_if = { power = "yes" }',
            'ask_if = { mode = "a" }',
            "refers to unknown question 'mode'",
        ),
        (
            'when = { power = "no" }',
            'when = { mode = "c" }',
            "unknown answer 'c' of question 'mode'",
        ),
        ('when = { power = "no" }', 'when = { power = { nt = "no" } }', "unknown key 'nt'"),
        (
            'confirmed_by = { mode = "a" }',
            'confirmed_by = { moder = "a" }',
            "'confirmed_by' of [[path]] 'p1' refers to unknown question",
        ),
        ('router = ["p1"]', 'router = ["p2"]', "names unknown 'p2'"),
        (
            'class = "soft"\nrisk = "low"\nsummary = "s"\nprofessional = "p"\n\n[[rule]]',
            'class = "hard"\nrisk = "low"\nsummary = "s"\nprofessional = "p"\n\n[[rule]]',
            "names unknown 'hard'",
        ),
        (
            'id = "last"\nclass = "soft"\nrisk = "low"',
            'id = "last"\nclass = "soft"\nrisk = "extreme"',
            "names unknown 'extreme'",
        ),
        ('levels = ["soft"]\nrisk', 'levels = ["medium"]\nrisk', "names unknown 'medium'"),
        (
            'id = "last"\n',
            'id = "last"\nwhen = { power = "yes" }\n',
            "the last rule ('last') must have no 'when'",
        ),
        ('id = "mode"', 'id = "power"', "two questions have id 'power'"),
        (
            '[question.answers]\na = "a"\nb = "b"',
            '[question.answers]\na = "a"',
            "at least two answers",
        ),
        ('id = "r1"', 'id = "last"', "two rules have id 'last'"),
    ],
)
def test_data_validation_errors(old: str, new: str, fragment: str) -> None:
    assert old in MINI
    with pytest.raises(UsageError) as ei:
        Triage.from_toml(MINI.replace(old, new, 1).encode())
    assert ei.value.message.startswith("triage data: ")
    assert fragment in ei.value.message


def test_not_toml() -> None:
    with pytest.raises(UsageError, match="not valid TOML"):
        Triage.from_toml(b"format = ")
