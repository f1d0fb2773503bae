"""``unbrick sim`` in a subprocess: start, registry file, answers, clean stop on SIGTERM."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from unbrick.cli.sim import parse_faults, parse_listen
from unbrick.errors import TransportError, UsageError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.sim import SimDriver, open_sim

LINE = (
    "sim {name} ({kind}) listening on 127.0.0.1:{port}, spi 127.0.0.1:{spi}, "
    "console 127.0.0.1:{console}, tftp 127.0.0.1:{tftp}"
)


def _argv(tmp_path: Path, kind: str, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "unbrick.cli.sim",
        kind,
        "--name",
        name,
        "--registry",
        str(tmp_path / "reg"),
        "--state-dir",
        str(tmp_path / "state"),
        *extra,
    ]


def _first_line(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        proc.kill()
        pytest.fail("the simulator printed nothing")
    return proc.stdout.readline().rstrip("\n")


@contextmanager
def running(
    tmp_path: Path, kind: str, name: str, *extra: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with subprocess.Popen(
        _argv(tmp_path, kind, name, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield _first_line(proc), proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _open(tmp_path: Path, name: str, query: str = "") -> SimDriver:
    return open_sim(
        parse_device_uri(f"sim://{name}{query}"),
        registry_dir=tmp_path / "reg",
        timeout_s=5.0,
        connect_wait_s=0.3,
    )


def test_sim_runs_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    registry = tmp_path / "reg" / "c1.json"
    with running(tmp_path, "router", "c1") as (line, proc):
        entry = json.loads(registry.read_text())
        assert line == LINE.format(
            name="c1",
            kind="router",
            port=entry["port"],
            spi=entry["spi_port"],
            console=entry["console_port"],
            tftp=entry["tftp_port"],
        )
        assert (entry["host"], entry["pid"], entry["kind"]) == ("127.0.0.1", proc.pid, "router")
        drv = _open(tmp_path, "c1")
        ident = drv.identify()
        assert (ident.model, ident.firmware_version) == ("SimRouter", "1.0.0")
        drv.enter_recovery(5.0)
        drv.program(0x7F0000, b"written over tcp")
        drv.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert not registry.exists()
    assert (tmp_path / "state" / "c1.flash").exists()
    # A second run keeps the flash; --reset-factory starts again from a fresh device.
    with running(tmp_path, "router", "c1"):
        drv = _open(tmp_path, "c1")
        drv.enter_recovery(5.0)
        assert drv.read(0x7F0000, 16) == b"written over tcp"
        drv.close()
    with running(tmp_path, "router", "c1", "--reset-factory") as (_, proc):
        drv = _open(tmp_path, "c1")
        drv.enter_recovery(5.0)
        assert drv.read(0x7F0000, 16) == b"\xff" * 16
        drv.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    assert not registry.exists()


def test_sim_hard_brick_answers_only_on_spi(tmp_path: Path) -> None:
    with running(tmp_path, "router-ab", "hb", "--brick", "hard") as (line, _):
        assert line.startswith("sim hb (router-ab) listening on 127.0.0.1:")
        with pytest.raises(TransportError, match="device does not answer"):
            _open(tmp_path, "hb")
        spi = _open(tmp_path, "hb", "?via=spi")
        assert spi.identify().extra["jedec_id"] == "ef4017"
        spi.close()


def test_sim_soft_brick_stays_in_the_bootloader(tmp_path: Path) -> None:
    with running(tmp_path, "router", "sb", "--brick", "soft", "--fault", "seed=3"):
        drv = _open(tmp_path, "sb")
        assert drv.identify().extra["state"] == "bootloader"
        drv.close()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--fault", "meltdown=1"), "not KEY=VALUE with a known KEY"),
        (("--fault", "slow=fast"), "is not a number"),
        (("--listen", "nowhere"), "is not HOST:PORT"),
    ],
)
def test_sim_refuses_bad_options_with_exit_code_2(
    tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    proc = subprocess.run(
        _argv(tmp_path, "router", "x", *extra), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.startswith("unbrick: error:")
    assert not (tmp_path / "reg" / "x.json").exists()


def test_sim_refuses_an_unknown_kind(tmp_path: Path) -> None:
    proc = subprocess.run(
        _argv(tmp_path, "toaster", "x"), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "unknown sim device kind 'toaster'" in proc.stderr


@pytest.mark.unit
def test_option_parsers() -> None:
    f = parse_faults(
        (
            "power-cut-after=5",
            "bit-error-rate=0.001",
            "disconnect-after=9",
            "slow=1000",
            "seed=4",
            "power-on-delay=0.2",
        )
    )
    assert (f.power_cut_after_ops, f.link_bit_error_rate, f.disconnect_after_frames) == (
        5,
        0.001,
        9,
    )
    assert (f.slow_link_bytes_per_s, f.seed, f.power_on_delay_s) == (1000, 4, 0.2)
    assert parse_faults(()).power_cut_after_ops is None
    with pytest.raises(UsageError, match="must be 1 or more"):
        parse_faults(("power-cut-after=0",))
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(UsageError, match="out of range"):
        parse_listen("127.0.0.1:70000")


def test_sim_command_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same command run in this process (the signal handler is the command's own)."""
    import os
    import threading
    import time

    from unbrick.cli.sim import _standalone

    registry = tmp_path / "reg" / "ip.json"
    seen: list[str] = []

    def stopper() -> None:
        deadline = time.monotonic() + 20
        while not registry.exists():
            if time.monotonic() > deadline:
                return  # the command failed to start; nothing to stop
            time.sleep(0.01)
        try:
            with _open(tmp_path, "ip") as drv:
                seen.append(drv.identify().model)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=stopper)
    thread.start()
    code = _standalone(_argv(tmp_path, "router-ab", "ip", "--fault", "slow=10000000")[3:])
    thread.join(20)
    assert code == 0
    assert seen == ["SimRouterAB"]
    assert not registry.exists()
    assert capsys.readouterr().out.startswith("sim ip (router-ab) listening on 127.0.0.1:")


def test_sim_command_refuses_another_kind_for_an_existing_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unbrick.cli.sim import _standalone
    from unbrick.sim.kinds import create_device

    create_device("router", tmp_path / "state", "k").close()
    assert _standalone(_argv(tmp_path, "router-ab", "k")[3:]) == 2
    assert "is a router, not a router-ab" in capsys.readouterr().err
