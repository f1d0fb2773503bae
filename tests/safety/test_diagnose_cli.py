"""``unbrick diagnose`` in-process: answers from --symptom, prompts, JSON output, refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from unbrick.cli import diagnose as diagnose_module
from unbrick.cli.diagnose import diagnose
from unbrick.errors import UsageError

pytestmark = pytest.mark.unit


def run(args: list[str], stdin: str | None = None) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(diagnose, args, input=stdin)
    return result.exit_code, result.output, result.exception


def test_json_from_symptoms() -> None:
    code, out, exc = run(
        [
            "--family",
            "router",
            "--symptom",
            "power=yes",
            "--symptom",
            "mode=uboot",
            "--json",
        ]
    )
    assert (code, exc) == (0, None)
    d = json.loads(out)
    assert d["class"] == "soft"
    assert d["rule"] == "bootloader-mode"
    assert d["family"] == "router"
    assert [p["id"] for p in d["paths"]][:2] == ["uboot-tftp", "vendor-tftp"]
    assert d["paths"][0]["confirmed"] is True
    assert d["answers"] == {"power": "yes", "mode": "uboot"}
    assert d["tools"] and d["professional"]


def test_text_output_names_class_paths_tools_risk_and_help() -> None:
    code, out, _ = run(["--family", "phone", "--symptom", "power=yes", "--symptom", "mode=edl"])
    assert code == 0
    assert out.startswith("Diagnosis: hard brick")
    assert "Risk: high" in out
    assert "1. Emergency download mode (Qualcomm EDL, MediaTek BROM) (available" in out
    assert "2. Direct eMMC/UFS access" in out
    assert "tools: the signed programmer" in out
    assert "When to get professional help:" in out


def test_no_family_no_paths() -> None:
    code, out, _ = run(["--symptom", "power=no", "--symptom", "power_checked=no"])
    assert code == 0
    assert "probably not a brick" in out
    assert "give --family" in out


def test_unknown_question_or_answer_is_a_usage_error() -> None:
    code, _, exc = run(["--symptom", "colour=red"])
    assert isinstance(exc, UsageError)
    assert "no triage question 'colour'" in exc.message
    assert "power, power_checked" in exc.hint
    _, _, exc = run(["--symptom", "power=maybe"])
    assert isinstance(exc, UsageError)
    assert exc.hint == "answers to 'power': yes, no"
    _, _, exc = run(["--symptom", "power"])
    assert isinstance(exc, UsageError) and "not QUESTION=ANSWER" in exc.message
    _, _, exc = run(["--symptom", "power=yes", "--symptom", "power=no"])
    assert isinstance(exc, UsageError) and "given twice" in exc.message
    code, out, _ = run(["--family", "toaster"])
    assert code == 2 and "toaster" in out


def test_interactive_asks_the_remaining_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagnose_module, "_stdin_is_tty", lambda: True)
    # Family, then: damage, cause, behaviour, mode, usb (power given; phone skips LAN/serial).
    answers = "phone\nno\nduring_update\nbogus\nboot_loop\nfastboot\nyes\n"
    code, out, exc = run(["--symptom", "power=yes"], stdin=answers)
    assert (code, exc) == (0, None)
    assert "Kind of device" in out
    assert "What does it do after you switch it on?" in out
    assert "dark             nothing more" in out
    assert "Error: 'bogus' is not one of" in out  # click re-asks an invalid answer
    assert "Diagnosis: soft brick" in out
    assert "1. Fastboot (bootloader mode) (available" in out


def test_interactive_json_keeps_stdout_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagnose_module, "_stdin_is_tty", lambda: True)
    answers = "no\nby_itself\nrom_bootloader\nyes\nnot_tried\n"
    result = CliRunner().invoke(
        diagnose,
        ["--family", "mcu", "--symptom", "power=yes", "--symptom", "behaviour=dark", "--json"],
        input=answers,
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["class"] == "soft" and d["rule"] == "rom-bootloader"
    assert d["answers"]["serial"] == "not_tried"
    assert "Can you get it into a bootloader" in result.stderr


def test_not_a_tty_asks_nothing() -> None:
    code, out, _ = run(["--family", "router", "--json"], stdin="yes\n")
    assert code == 0
    d = json.loads(out)
    assert d["answers"] == {} and d["class"] == "unknown"
