"""NMRP sessions over a veth pair between two private network namespaces.

The real nmrpflash against our simulated router validates the simulator; our server against
the same simulator must then reach the same outcome: the image in the router's firmware
region, the router booting it. Faults: a router that never answers, lost TFTP DATA blocks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need
from tests.nmrp.conftest import NsThread, VethPair, run_in_ns
from unbrick.errors import DeviceError, SourceError, TransportError, UsageError
from unbrick.sim.device import SimDevice
from unbrick.sim.firmware import build_firmware
from unbrick.sim.nmrp_client import (
    NmrpClient,
    NmrpClientConfig,
    NmrpClientFaults,
    NmrpClientResult,
)
from unbrick.transports.nmrp.server import NmrpConfig, NmrpEvent, NmrpTimeouts, flash_nmrp

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024


def image_file(tmp_path: Path, version: str = "2.0.0", size: int = 300 * KIB) -> Path:
    """A firmware image the simulated router boots (model, revision and region match)."""
    path = tmp_path / f"R7000-V{version}.chk"
    path.write_bytes(
        build_firmware(
            "SimRouter",
            version,
            security_version=1,
            hw_revisions=("B2",),
            regions=("EU",),
            size_bytes=size,
        )
    )
    return path


def start_router(
    veth: VethPair,
    dev: SimDevice,
    *,
    file_name: str | None = None,
    tftp_port: int = 69,
    faults: NmrpClientFaults | None = None,
) -> NsThread:
    """The simulated router's NMRP client, listening in the router namespace."""
    config = NmrpClientConfig(
        interface=veth.router_if,
        file_name=file_name,
        listen_s=20.0,
        step_timeout_s=2.0,
        keepalive_interval_s=0.5,
        tftp_port=tftp_port,
        faults=faults or NmrpClientFaults(),
    )
    return NsThread(veth.router_ns, NmrpClient(dev, config).serve)


def assert_flashed(dev: SimDevice, result: NmrpClientResult, image: Path, version: str) -> None:
    data = image.read_bytes()
    fw = dev.config.find_region("firmware")
    assert fw is not None
    assert result.size_bytes == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert dev.spi_read(fw.offset, len(data)) == data
    assert result.closed
    assert result.keepalives_acked >= 1
    assert result.state_after == "firmware"
    assert dev.status()["firmware_version"] == version


@pytest.mark.peer
def test_nmrpflash_flashes_the_simulated_router(
    veth: VethPair, router: SimDevice, tmp_path: Path
) -> None:
    need("nmrpflash")
    image = image_file(tmp_path)
    sim = start_router(veth, router)
    proc = run_in_ns(veth.host_ns, ["nmrpflash", "-v", "-i", veth.host_if, "-f", image])
    result = sim.result()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"Received configuration request from {veth.mac('router')}" in out
    assert "Sending configuration: 10.164.183.252/24" in out
    assert "Remote finished. Closing connection." in out
    assert "Reboot your device now." in out
    assert result.server_mac == veth.mac("host")
    assert (result.ip, result.netmask) == ("10.164.183.252", "255.255.255.0")
    assert result.firmware_upgrade
    assert result.region is None
    assert result.file_name == image.name
    assert result.blksize == 1456
    assert result.dropped_blocks == ()
    assert_flashed(router, result, image, "2.0.0")
    # nmrpflash removed what it added; the simulated router removed its address too.
    assert "10.164.183" not in veth.addresses("host") + veth.addresses("router")


@pytest.mark.peer
def test_nmrpflash_options_file_name_region_and_a_lost_block(
    veth: VethPair, router: SimDevice, tmp_path: Path
) -> None:
    need("nmrpflash")
    image = image_file(tmp_path, "2.1.0", size=5000)
    faults = NmrpClientFaults(drop_data_blocks=frozenset({2}))
    sim = start_router(veth, router, file_name="firmware", faults=faults)
    argv: list[str | Path] = ["nmrpflash", "-i", veth.host_if, "-f", image]
    argv += ["-a", "192.168.77.2", "-A", "192.168.77.1", "-M", "255.255.255.0", "-R", "NA"]
    proc = run_in_ns(veth.host_ns, argv)
    result = sim.result()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Received upload request: filename 'firmware'." in out
    assert (result.ip, result.netmask, result.region) == ("192.168.77.2", "255.255.255.0", 1)
    assert result.file_name == "firmware"
    assert result.dropped_blocks == (2,)
    assert result.repeated_blocks >= 1
    assert_flashed(router, result, image, "2.1.0")


def test_our_server_flashes_the_simulated_router(
    veth: VethPair, router: SimDevice, tmp_path: Path
) -> None:
    image = image_file(tmp_path)
    sim = start_router(veth, router)
    events: list[NmrpEvent] = []
    config = NmrpConfig(
        interface=veth.host_if, image=image, timeouts=NmrpTimeouts(advertise_s=10.0)
    )
    result = NsThread(veth.host_ns, lambda: flash_nmrp(config, on_event=events.append)).result()
    sim_result = sim.result()
    assert result.router_mac == veth.mac("router")
    assert (result.size_bytes, result.uploads, result.remote_name) == (
        image.stat().st_size,
        1,
        image.name,
    )
    assert result.keepalives >= 1
    assert sim_result.server_mac == veth.mac("host")
    assert (sim_result.ip, sim_result.netmask) == ("10.164.183.252", "255.255.255.0")
    assert sim_result.file_name == image.name
    assert_flashed(router, sim_result, image, "2.0.0")
    steps = [e.step for e in events]
    assert steps.index("advertise") < steps.index("configure") < steps.index("flash")
    assert "10.164.183" not in veth.addresses("host") + veth.addresses("router")


def test_our_server_retransmits_lost_data_blocks_and_sends_the_region(
    veth: VethPair, router: SimDevice, tmp_path: Path
) -> None:
    image = image_file(tmp_path, "2.2.0", size=40 * KIB)
    faults = NmrpClientFaults(drop_data_blocks=frozenset({1, 7}))
    sim = start_router(veth, router, file_name="firmware", faults=faults)
    config = NmrpConfig(
        interface=veth.host_if,
        image=image,
        region="WW",
        timeouts=NmrpTimeouts(advertise_s=10.0, tftp_timeout_s=0.2),
    )
    result = NsThread(veth.host_ns, lambda: flash_nmrp(config)).result()
    sim_result = sim.result()
    assert result.remote_name == "firmware"
    assert sim_result.region == 2
    assert sim_result.dropped_blocks == (1, 7)
    assert_flashed(router, sim_result, image, "2.2.0")


def test_a_rejected_image_is_uploaded_again(
    veth: VethPair, router: SimDevice, tmp_path: Path
) -> None:
    image = image_file(tmp_path, "2.4.0", size=20 * KIB)
    sim = start_router(veth, router, faults=NmrpClientFaults(reject_uploads=1))
    config = NmrpConfig(
        interface=veth.host_if, image=image, timeouts=NmrpTimeouts(advertise_s=10.0)
    )
    result = NsThread(veth.host_ns, lambda: flash_nmrp(config)).result()
    sim_result = sim.result()
    assert (result.uploads, sim_result.rejected_uploads) == (2, 1)
    assert_flashed(router, sim_result, image, "2.4.0")


def test_an_image_rejected_every_time_stops_and_closes_the_session(
    veth: VethPair, router: SimDevice, tmp_path: Path
) -> None:
    image = image_file(tmp_path, "2.4.0", size=20 * KIB)
    sim = start_router(veth, router, faults=NmrpClientFaults(reject_uploads=5))
    config = NmrpConfig(
        interface=veth.host_if, image=image, timeouts=NmrpTimeouts(advertise_s=10.0)
    )
    with pytest.raises(DeviceError) as err:
        NsThread(veth.host_ns, lambda: flash_nmrp(config)).result()
    assert "asked for the firmware 3 times: it rejects the image" in err.value.message
    assert "this exact model" in err.value.hint
    with pytest.raises(DeviceError, match="the server closed the session"):
        sim.result()
    assert router.status()["firmware_version"] is None  # still in its bootloader, unwritten
    fw = router.config.find_region("firmware")
    assert fw is not None
    assert router.spi_read(fw.offset, 64) != image.read_bytes()[:64]


def test_a_router_that_never_answers_times_out_naming_the_step(
    veth: VethPair, tmp_path: Path
) -> None:
    image = image_file(tmp_path, size=4 * KIB)
    config = NmrpConfig(
        interface=veth.host_if,
        image=image,
        timeouts=NmrpTimeouts(advertise_s=0.6, advertise_interval_s=0.1),
    )
    with pytest.raises(TransportError) as err:
        NsThread(veth.host_ns, lambda: flash_nmrp(config)).result()
    assert "NMRP step 'advertise' timed out" in err.value.message
    assert veth.host_if in err.value.message
    assert "power the router on" in err.value.hint
    assert "10.164.183.253" not in veth.addresses("host")


def test_a_failed_upload_names_the_step_and_closes_the_session(
    veth: VethPair, router: SimDevice, tmp_path: Path
) -> None:
    # The simulated router's TFTP port is one our server does not use: it asks for the image
    # and waits for a write request that never comes; our server's upload fails, names the
    # step, and closes the session, which the router sees.
    image = image_file(tmp_path, size=4 * KIB)
    sim = start_router(veth, router, tftp_port=6969)
    config = NmrpConfig(
        interface=veth.host_if,
        image=image,
        timeouts=NmrpTimeouts(advertise_s=10.0, tftp_timeout_s=0.1, tftp_retries=2),
    )
    with pytest.raises(TransportError, match="NMRP step 'upload' failed") as err:
        NsThread(veth.host_ns, lambda: flash_nmrp(config)).result()
    assert "10.164.183.252:69" in err.value.message
    with pytest.raises(DeviceError, match="the server closed the session"):
        sim.result()
    fw = router.config.find_region("firmware")
    assert fw is not None
    assert router.spi_read(fw.offset, 64) != image.read_bytes()[:64]


def test_a_router_that_never_asks_for_the_image_times_out_naming_the_step(
    veth: VethPair, tmp_path: Path
) -> None:
    # A bare NMRP peer that answers ADVERTISE with CONF_REQ and then stays silent.
    from unbrick.transports.nmrp import codec
    from unbrick.transports.nmrp.server import RawLink

    def half_router() -> int:
        with RawLink(veth.router_if) as link:
            while True:
                frame = link.recv(5.0)
                if frame is None:
                    return 0
                if frame.message.code == codec.Code.ADVERTISE:
                    link.send(frame.src, codec.conf_req())
                if frame.message.code == codec.Code.CLOSE_REQ:
                    link.send(frame.src, codec.simple(codec.Code.CLOSE_ACK))
                    return 1

    peer = NsThread(veth.router_ns, half_router)
    image = image_file(tmp_path, size=4 * KIB)
    config = NmrpConfig(
        interface=veth.host_if, image=image, timeouts=NmrpTimeouts(advertise_s=5, request_s=0.5)
    )
    with pytest.raises(TransportError) as err:
        NsThread(veth.host_ns, lambda: flash_nmrp(config)).result()
    assert "NMRP step 'configure' timed out" in err.value.message
    assert "did not ask for the firmware" in err.value.message
    assert peer.result() == 1  # the server closed the session


def test_not_root_is_refused_with_a_clear_error(veth: VethPair, tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    image = image_file(tmp_path, size=4 * KIB)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from unbrick.errors import TransportError\n"
        "from unbrick.transports.nmrp.server import NmrpConfig, flash_nmrp\n"
        "try:\n    flash_nmrp(NmrpConfig(sys.argv[1], Path(sys.argv[2])))\n"
        "except TransportError as e:\n    print(e.one_line())\n"
    )
    # Without CAP_NET_RAW, as an ordinary user would be.
    drop_raw = ["--bounding-set", "-net_raw", "--inh-caps", "-net_raw"]
    argv: list[str | Path] = [setpriv, *drop_raw, sys.executable, "-c", code, veth.host_if, image]
    proc = run_in_ns(veth.host_ns, argv)
    assert proc.returncode == 0, proc.stderr
    assert "raw Ethernet frames (NMRP) need root" in proc.stdout
    assert "run unbrick as root" in proc.stdout


def test_unknown_interface_missing_or_empty_image(veth: VethPair, tmp_path: Path) -> None:
    image = image_file(tmp_path, size=4 * KIB)
    config = NmrpConfig(interface="nosuch0", image=image)
    with pytest.raises(TransportError, match="'nosuch0' does not exist"):
        NsThread(veth.host_ns, lambda: flash_nmrp(config)).result()
    missing = NmrpConfig(interface=veth.host_if, image=tmp_path / "missing.chk")
    with pytest.raises(SourceError, match="cannot read image"):
        NsThread(veth.host_ns, lambda: flash_nmrp(missing)).result()
    (tmp_path / "empty.chk").write_bytes(b"")
    empty = NmrpConfig(interface=veth.host_if, image=tmp_path / "empty.chk")
    with pytest.raises(UsageError, match="is empty"):
        NsThread(veth.host_ns, lambda: flash_nmrp(empty)).result()


def _cli(veth: VethPair, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``unbrick nmrp ...`` in the host namespace (the command group registers it here)."""
    code = (
        "import sys\n"
        "from unbrick.cli.main import cli, main\n"
        "from unbrick.cli.nmrp import nmrp\n"
        "if 'nmrp' not in cli.commands:\n    cli.add_command(nmrp)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return run_in_ns(veth.host_ns, [sys.executable, "-c", code, "nmrp", *args])


def test_cli_flashes_and_reports_json(veth: VethPair, router: SimDevice, tmp_path: Path) -> None:
    image = image_file(tmp_path, "2.3.0", size=64 * KIB)
    sim = start_router(veth, router)
    proc = _cli(veth, "--interface", veth.host_if, "--image", image, "--timeout", "10", "--json")
    sim_result = sim.result()
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[-1]["kind"] == "result"
    assert lines[-1]["size_bytes"] == image.stat().st_size
    assert lines[-1]["router_mac"] == veth.mac("router")
    assert any(e.get("step") == "flash" for e in lines[:-1])
    assert_flashed(router, sim_result, image, "2.3.0")


def test_cli_timeout_exit_code_and_message(veth: VethPair, tmp_path: Path) -> None:
    image = image_file(tmp_path, size=4 * KIB)
    proc = _cli(veth, "-i", veth.host_if, "-f", image, "--timeout", "0.5")
    assert proc.returncode == TransportError.exit_code
    assert "unbrick: error: NMRP step 'advertise' timed out" in proc.stderr
