"""`unbrick device oem URI COMMAND`: vendor commands only from the profile's allow-list
(`[link.fastboot] oem_allow`), never a lock or unlock command, against the simulated phone.
The simulator counts the commands it receives, which shows that a refused command never left
the host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fastboot.conftest import Served, ServeFactory
from unbrick.cli.main import main
from unbrick.model.profile_toml import builtin_profile_sources

GENERIC = "builtin:android-fastboot-generic.toml"


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path, *args: str
) -> tuple[int, str, str]:
    monkeypatch.setenv("UNBRICK_HOME", str(home))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def phone_profile(tmp_path: Path, oem_allow: str) -> Path:
    """The generic fastboot profile under another id, with its own ``oem_allow`` value."""
    text = dict(builtin_profile_sources())[GENERIC].decode()
    text = text.replace('id = "android-fastboot-generic"', 'id = "test-phone"')
    head, _, _ = text.partition("[link.fastboot]")
    path = tmp_path / "test-phone.toml"
    path.write_text(f"{head}[link.fastboot]\noem_allow = {oem_allow}\n")
    return path


def test_an_allowed_command_prints_the_devices_lines(
    phone: Served,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run(
        capsys, monkeypatch, tmp_path / "h", "device", "oem", phone.url(), "device-info"
    )
    assert code == 0, err
    assert out.splitlines() == [
        "Device product: unbrick-phone",
        "Device unlocked: true",
        "Current slot: a",
        "OKAY",
    ]
    code, out, err = run(
        capsys, monkeypatch, tmp_path / "h", "device", "oem", phone.url(), "device-info", "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["profile"] == "android-fastboot-generic"
    assert doc["command"] == "device-info" and doc["allowed"] == ["device-info"]
    assert doc["lines"][0] == "Device product: unbrick-phone" and doc["value"] == ""
    assert phone.phone.received["oem"] == 2


def test_a_command_not_in_the_list_is_refused_and_never_sent(
    phone: Served,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for uri in (phone.url(), phone.url() + "?oem_allow=stage-log"):
        code, _out, err = run(
            capsys, monkeypatch, tmp_path / "h", "device", "oem", uri, "stage-log"
        )
        assert code == 2, err
        assert err.count("\n") == 1
        assert "'oem stage-log' is not in this device's allow-list of oem commands" in err
        assert "allowed: device-info" in err
    assert phone.phone.received["oem"] == 0
    assert phone.phone.received["getvar"] > 0  # the device was identified


def test_lock_commands_are_refused_even_when_the_profile_lists_them(
    serve: ServeFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = serve(unlocked=False)
    profile = phone_profile(tmp_path, '["device-info", "unlock", "lock", "flashing"]')
    for command in (["unlock"], ["flashing", "unlock"], ["lock"], ["Unlock_Critical"]):
        code, out, err = run(
            capsys,
            monkeypatch,
            tmp_path / "h",
            "device",
            "oem",
            served.url(),
            *command,
            "--profile",
            str(profile),
        )
        assert code == 2, (command, err)
        assert "would change the bootloader's lock state; unbrick never does that" in err
        assert "run 'fastboot flashing unlock'" in err and "erases all user data" in err
    assert served.phone.received["oem"] == 0
    assert served.phone.received["flashing"] == 0
    assert served.phone.state.unlocked is False
    # The listed harmless command still goes through with that profile.
    code, out, err = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "device",
        "oem",
        served.url(),
        "device-info",
        "--profile",
        str(profile),
    )
    assert code == 0, err
    assert "Device unlocked: false" in out
    assert served.phone.received["oem"] == 1


def test_a_device_fail_for_an_allowed_command_is_a_device_error(
    phone: Served,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profile = phone_profile(tmp_path, '["frobnicate"]')
    code, _out, err = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "device",
        "oem",
        phone.url(),
        "frobnicate",
        "now",
        "--profile",
        str(profile),
    )
    assert code == 5, err
    assert "refused 'oem frobnicate now': unknown command" in err
    assert phone.phone.received["oem"] == 1


def test_a_bad_allow_list_is_refused_by_the_profile_loader(
    phone: Served,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profile = phone_profile(tmp_path, '"device-info"')
    code, _out, err = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "device",
        "oem",
        phone.url(),
        "device-info",
        "--profile",
        str(profile),
    )
    assert code == 2
    assert err.startswith(f"unbrick: error: profile {profile}: 'oem_allow' in [link.fastboot]")
    assert "must be a list of non-empty strings" in err and err.count("\n") == 1
    assert sum(phone.phone.received.values()) == 0
