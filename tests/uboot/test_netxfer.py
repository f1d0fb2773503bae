"""The U-Boot driver's network settings, its reading of U-Boot's TFTP output, and the session
server (offer a file, take an upload)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unbrick.errors import TransportError, UsageError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.tftp import tftp_get, tftp_put
from unbrick.transports.uboot.driver import UBootOptions
from unbrick.transports.uboot.netxfer import (
    NetConfig,
    NetworkError,
    SessionServer,
    parse_tftp_transfer,
)
from unbrick.transports.uboot.parse import UBootParseError

pytestmark = pytest.mark.unit

LOADED = """Using virtio-net#31 device
TFTP from server 10.0.2.2; our IP address is 10.0.2.15
Filename 'ubk-1-1.bin'.
Load address: 0x40400000
Loading: *##################################################
\t 3.5 MiB/s
done
Bytes transferred = 262144 (40000 hex)
"""


def config(query: str) -> NetConfig | None:
    return NetConfig.from_address(parse_device_uri("uboot+tcp://127.0.0.1:5000" + query))


def test_serverip_turns_the_network_on_with_uboot_friendly_defaults() -> None:
    assert config("") is None
    net = config("?serverip=192.168.1.10&ipaddr=192.168.1.1")
    assert net == NetConfig(serverip="192.168.1.10", ipaddr="192.168.1.1")
    assert (net.bind_host, net.listen_port, net.blksize, net.windowsize) == (
        "192.168.1.10",
        69,
        1468,
        8,
    )
    env = dict(net.env(69))
    assert env["serverip"] == "192.168.1.10" and env["ipaddr"] == "192.168.1.1"
    assert env["tftpblocksize"] == "1468" and env["netretry"] == "no"
    assert "tftpdstp" not in env
    assert dict(net.env(6969))["tftpdstp"] == "6969"
    tuned = config("?serverip=10.0.2.2&tftp_listen=127.0.0.1:7000&tftp_window=1&tftp_blksize=512")
    assert tuned is not None
    assert (tuned.bind_host, tuned.listen_port, tuned.windowsize, tuned.blksize) == (
        "127.0.0.1",
        7000,
        1,
        512,
    )
    assert "ipaddr" not in dict(tuned.env(69))  # the device keeps its own
    opts = UBootOptions.from_address(parse_device_uri("uboot+tcp://h:1?serverip=10.0.0.1"))
    assert opts.net == NetConfig(serverip="10.0.0.1")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?ipaddr=10.0.0.2", "ipaddr= needs serverip="),
        ("?tftp_listen=0.0.0.0:69", "tftp_listen= needs serverip="),
        ("?serverip=router.lan", "serverip='router.lan' is not an IPv4 address"),
        ("?serverip=fe80::1", "is not an IPv4 address"),
        ("?serverip=10.0.0.1&ipaddr=10.0.0.300", "ipaddr='10.0.0.300' is not an IPv4"),
        ("?serverip=10.0.0.1&tftp_blksize=8192", "tftp_blksize=8192 is outside 512..1468"),
        ("?serverip=10.0.0.1&tftp_window=65", "tftp_window=65 is outside 1..64"),
        ("?serverip=10.0.0.1&tftp_listen=69", "tftp_listen='69': give HOST:PORT"),
    ],
)
def test_bad_network_settings_are_refused(query: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        config(query)


def test_transfer_count_is_read_and_cross_checked() -> None:
    assert parse_tftp_transfer(LOADED) == 262144
    put = LOADED.replace("Load address", "Save address").replace("40000 hex", "40000 hex")
    assert parse_tftp_transfer(put) == 262144
    with pytest.raises(UBootParseError, match="garbled transfer count"):
        parse_tftp_transfer(LOADED.replace("(40000 hex)", "(40001 hex)"))
    with pytest.raises(UBootParseError, match="no 'Bytes transferred'"):
        parse_tftp_transfer("Loading: *####")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "Loading: *\nTFTP error: 'File not found' (1)\nNot retrying...\n",
            "TFTP error: 'File not found' (1)",
        ),
        ("Loading: *T T T T T T \nRetry count exceeded; starting again\n", "Retry count"),
        ("*** ERROR: `serverip' not set\n", "*** ERROR: `serverip' not set"),
        ("ARP Retry count exceeded; starting again\n", "ARP Retry count exceeded"),
        ("No ethernet found.\n", "No ethernet found."),
        ("Unknown command 'tftpput' - try 'help'\n", "Unknown command 'tftpput'"),
    ],
)
def test_uboot_network_errors_become_one_line_transport_errors(text: str, line: str) -> None:
    with pytest.raises(NetworkError, match=r"U-Boot: ") as e:
        parse_tftp_transfer(text)
    assert line in e.value.message


def test_the_session_server_serves_offers_and_takes_uploads(tmp_path: Path) -> None:
    server = SessionServer(NetConfig(serverip="127.0.0.1", listen_port=0))
    try:
        port = server.start()
        assert server.port == port  # started once
        name = server.offer(b"image piece" * 1000)
        out = tmp_path / "got.bin"
        tftp_get("127.0.0.1", port, name, out, blksize=1468)
        assert out.read_bytes() == b"image piece" * 1000
        server.withdraw(name)
        up = server.upload_name()
        tftp_put("127.0.0.1", port, up, b"flash contents" * 500)
        assert server.take(up, timeout_s=5) == b"flash contents" * 500
        with pytest.raises(TransportError, match=r"no TFTP transfer of 'nothing\.up'"):
            server.take("nothing.up", timeout_s=0.2)
        root = server._root
        assert root is not None and root.is_dir()
    finally:
        server.close()
    assert not root.exists()
