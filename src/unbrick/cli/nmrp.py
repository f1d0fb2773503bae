"""``unbrick nmrp --interface IFACE --image FILE``: flash a NETGEAR router over NMRP.

Start the command, then power the router on: its bootloader answers the advertisement, takes
an address, asks for the image over TFTP, writes it and closes the session. Needs root (raw
Ethernet frames, and an address on the interface). Progress goes to stderr (or JSON Lines with
``--json``); the result is printed at the end.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from unbrick.transports.nmrp.server import NmrpEvent


@click.command("nmrp")
@click.option("-i", "--interface", required=True, help="Ethernet interface cabled to the router.")
@click.option(
    "-f",
    "--image",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Firmware image for this exact model.",
)
@click.option(
    "--ip", "router_ip", default="10.164.183.252", show_default=True, help="Router's address."
)
@click.option("--host-ip", default="10.164.183.253", show_default=True, help="This host's address.")
@click.option("--netmask", default="255.255.255.0", show_default=True)
@click.option("--region", default=None, help="Set the router's region (NA, WW, GR, PR, RU...).")
@click.option("--remote-name", default=None, help="TFTP file name (default: what the router asks).")
@click.option("--router-mac", default=None, help="Only talk to this router (xx:xx:xx:xx:xx:xx).")
@click.option("--port", "tftp_port", default=69, show_default=True, help="Router's TFTP port.")
@click.option("--blksize", default=1456, show_default=True, help="TFTP block size.")
@click.option("--windowsize", default=1, show_default=True, help="TFTP window size.")
@click.option(
    "--timeout",
    "advertise_s",
    default=60.0,
    show_default=True,
    help="Seconds to wait for the router to answer.",
)
@click.option(
    "--flash-timeout",
    "flash_s",
    default=300.0,
    show_default=True,
    help="Seconds of silence allowed while the router writes.",
)
@click.option(
    "--no-configure-host",
    is_flag=True,
    help="Leave the interface's addresses alone (it already has one in the router's subnet).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON Lines events and result.")
def nmrp(
    interface: str,
    image: Path,
    router_ip: str,
    host_ip: str,
    netmask: str,
    region: str | None,
    remote_name: str | None,
    router_mac: str | None,
    tftp_port: int,
    blksize: int,
    windowsize: int,
    advertise_s: float,
    flash_s: float,
    no_configure_host: bool,
    as_json: bool,
) -> int:
    """Flash a NETGEAR router with its NMRP recovery (start this, then power the router on)."""
    from unbrick.cli.render import print_json
    from unbrick.transports.nmrp.server import NmrpConfig, NmrpTimeouts, flash_nmrp

    config = NmrpConfig(
        interface=interface,
        image=image,
        router_ip=router_ip,
        host_ip=host_ip,
        netmask=netmask,
        region=region,
        remote_name=remote_name,
        router_mac=router_mac,
        tftp_port=tftp_port,
        blksize=blksize,
        windowsize=windowsize,
        configure_host=not no_configure_host,
        timeouts=NmrpTimeouts(advertise_s=advertise_s, flash_s=flash_s),
    )

    def show(event: NmrpEvent) -> None:
        if as_json:
            print_json(
                {"kind": "event", "step": event.step, "message": event.message, **event.data}
            )
        else:
            click.echo(f"nmrp {event.step}: {event.message}", err=True)

    result = flash_nmrp(config, on_event=show)
    if as_json:
        print_json({"kind": "result", **dataclasses.asdict(result)})
    else:
        sys.stdout.write(
            f"flashed {image.name} ({result.size_bytes} bytes) to router {result.router_mac} "
            f"at {result.router_ip}: upload {result.upload_s:.1f} s, "
            f"{result.keepalives} keep-alives, done in {result.total_s:.1f} s\n"
        )
    return 0
