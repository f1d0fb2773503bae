"""``unbrick sim KIND --name NAME``: run a simulated device in the foreground.

``unbrick sim fastboot-phone --listen HOST:PORT --state-dir DIR`` runs a phone in fastboot mode
instead (``unbrick.sim.fastboot_phone``): fastboot over TCP and UDP on the same port number, each
partition the file ``DIR/<partition>.img``; ``--name`` is not needed.

The simulator serves the device's recovery interface, its SPI face and its serial console (as
U-Boot shows it: ``uboot+tcp://HOST:CONSOLE_PORT``) on TCP, the bootloader's TFTP recovery
server on UDP (``unbrick tftp put HOST:TFTP_PORT IMAGE`` while it is in recovery), publishes
``REGISTRY/NAME.json`` so that ``sim://NAME`` finds it, and runs until SIGTERM or SIGINT, when
it stops cleanly and removes the registry file. The device's flash and config persist in the
state directory between runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from unbrick.errors import UnbrickError, UsageError

_FAULT_KEYS = (
    "power-cut-after",
    "bit-error-rate",
    "disconnect-after",
    "slow",
    "power-on-delay",
    "seed",
)
_FLOAT_KEYS = ("bit-error-rate", "power-on-delay")

if TYPE_CHECKING:
    from unbrick.sim.device import Faults
    from unbrick.sim.fastboot_phone import PhoneFaults


def parse_faults(specs: tuple[str, ...]) -> Faults:
    """``KEY=VALUE`` fault options (keys in ``_FAULT_KEYS``) into a ``Faults``."""
    from unbrick.sim.device import Faults

    values: dict[str, float] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or key not in _FAULT_KEYS:
            raise UsageError(
                f"--fault {spec!r} is not KEY=VALUE with a known KEY",
                hint=f"keys: {', '.join(_FAULT_KEYS)}",
            )
        try:
            values[key] = float(text) if key in _FLOAT_KEYS else int(text, 0)
        except ValueError as e:
            raise UsageError(f"--fault {spec!r}: {text!r} is not a number") from e

    def opt_int(key: str) -> int | None:
        return int(values[key]) if key in values else None

    return Faults(
        power_cut_after_ops=opt_int("power-cut-after"),
        link_bit_error_rate=values.get("bit-error-rate", 0.0),
        disconnect_after_frames=opt_int("disconnect-after"),
        slow_link_bytes_per_s=opt_int("slow"),
        power_on_delay_s=values.get("power-on-delay", 0.05),
        seed=opt_int("seed") or 0,
    )


def parse_block_list(text: str) -> tuple[int, ...]:
    """``--bad-blocks 20,21,0x40``: erase block indexes."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            out.append(int(item, 0))
        except ValueError as e:
            raise UsageError(
                f"--bad-blocks {text!r}: {item!r} is not a block number",
                hint="give erase block indexes separated by commas, e.g. 20,21",
            ) from e
    return tuple(out)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--listen {text!r} is not HOST:PORT", hint="e.g. 127.0.0.1:0")
    try:
        number = int(port)
    except ValueError as e:
        raise UsageError(f"--listen {text!r}: port {port!r} is not a number") from e
    if not 0 <= number <= 65535:
        raise UsageError(f"--listen {text!r}: port out of range")
    return host, number


FASTBOOT_PHONE = "fastboot-phone"
_PHONE_FAULT_KEYS = (
    "disconnect-after-bytes",
    "offline",
    "reboot-delay",
    "flash-delay",
    "fail-partition",
    "corrupt-partition",
    "no-fetch",
)


def parse_phone_faults(specs: tuple[str, ...]) -> PhoneFaults:
    """``KEY=VALUE`` fault options of the fastboot phone into a ``PhoneFaults``."""
    from unbrick.sim.fastboot_phone import PhoneFaults

    faults = PhoneFaults()
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or key not in _PHONE_FAULT_KEYS:
            raise UsageError(
                f"--fault {spec!r} is not KEY=VALUE with a known KEY",
                hint=f"keys for {FASTBOOT_PHONE}: {', '.join(_PHONE_FAULT_KEYS)}",
            )
        try:
            if key == "disconnect-after-bytes":
                faults = replace(faults, disconnect_after_bytes=int(text, 0))
            elif key == "offline":
                faults = replace(faults, offline_s=float(text))
            elif key == "reboot-delay":
                faults = replace(faults, reboot_offline_s=float(text))
            elif key == "flash-delay":
                faults = replace(faults, flash_delay_s=float(text))
            elif key == "fail-partition":
                faults = replace(faults, fail_partition=text or None)
            elif key == "corrupt-partition":
                faults = replace(faults, corrupt_partition=text or None)
            else:
                faults = replace(faults, no_fetch=text.strip().lower() in ("1", "yes", "true"))
        except ValueError as e:
            raise UsageError(f"--fault {spec!r}: {text!r} is not a number") from e
    return faults


@click.command("sim")
@click.argument("kind")
@click.option("--name", help="Device name: sim://NAME opens it (router kinds).")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to serve.")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), help="Flash/config.")
@click.option("--registry", type=click.Path(path_type=Path, file_okay=False), help="Registry dir.")
@click.option("--fault", "faults", multiple=True, help="KEY=VALUE fault (repeatable).")
@click.option("--reset-factory", is_flag=True, help="Start from a factory-fresh device.")
@click.option("--brick", type=click.Choice(["soft", "hard"]), help="Damage the device first.")
@click.option(
    "--autoboot-delay",
    type=click.FloatRange(min=0.0),
    help="Seconds the console's autoboot countdown lasts (default: bootdelay seconds).",
)
@click.option(
    "--bad-blocks",
    help="NAND kinds: erase blocks the chip reports bad, e.g. 20,21,40 (a new device).",
)
@click.option("--product", help="fastboot-phone: the product name (getvar product).")
@click.option("--serial", help="fastboot-phone: the serial number (getvar serialno).")
@click.option(
    "--max-download-size",
    help="fastboot-phone: max-download-size in bytes (256M, 0x10000000...).",
)
@click.option(
    "--locked/--unlocked",
    default=None,
    help="fastboot-phone: lock or unlock the bootloader (kept in the state directory).",
)
def sim(
    kind: str,
    name: str | None,
    listen: str,
    state_dir: Path | None,
    registry: Path | None,
    faults: tuple[str, ...],
    reset_factory: bool,
    brick: str | None,
    autoboot_delay: float | None,
    bad_blocks: str | None,
    product: str | None,
    serial: str | None,
    max_download_size: str | None,
    locked: bool | None,
) -> int:
    """Run a simulated device of KIND (router, router-ab, router-spi, router-nand,
    fastboot-phone) until SIGTERM/SIGINT.

    Faults: power-cut-after=N (the Nth flash operation is cut short by a power loss),
    bit-error-rate=P (per answer frame), disconnect-after=N (frames per connection),
    slow=BYTES_PER_S, power-on-delay=S, seed=N. fastboot-phone faults:
    disconnect-after-bytes=N (vanish mid-download), offline=S, reboot-delay=S,
    flash-delay=S, fail-partition=NAME, corrupt-partition=NAME (once), no-fetch=1.
    """
    if kind == FASTBOOT_PHONE:
        if brick or bad_blocks is not None or reset_factory or autoboot_delay is not None:
            raise UsageError(
                f"--brick, --bad-blocks, --reset-factory and --autoboot-delay are for the "
                f"router kinds, not {FASTBOOT_PHONE}"
            )
        return _run_fastboot_phone(
            listen, state_dir, faults, product, serial, max_download_size, locked
        )
    if product or serial or max_download_size or locked is not None:
        raise UsageError(
            f"--product, --serial, --max-download-size and --locked are for {FASTBOOT_PHONE} only"
        )
    if not name:
        raise UsageError(f"--name is required for a {kind}", hint="e.g. --name r1")
    from unbrick.sim.device import check_name
    from unbrick.sim.kinds import (
        check_bad_blocks,
        create_device,
        device_exists,
        get_kind,
        load_device,
    )
    from unbrick.sim.server import SimServer
    from unbrick.sim.uboot_face import ConsoleConfig
    from unbrick.transports.sim import (
        RegistryEntry,
        default_registry_dir,
        read_registry,
        registry_path,
        write_registry,
    )

    spec = get_kind(kind)
    check_name(name)
    bad = check_bad_blocks(spec, parse_block_list(bad_blocks or ""))
    host, port = parse_listen(listen)
    fault_set = parse_faults(faults)
    registry_dir = registry or default_registry_dir(os.environ, Path.home())
    devices_dir = state_dir or registry_dir / "devices"

    if reset_factory or not device_exists(devices_dir, name):
        device = create_device(kind, devices_dir, name, power_on=False, bad_blocks=bad)
    else:
        device = load_device(devices_dir, name, power_on=False)
        if device.kind != kind:
            device.close()
            raise UsageError(
                f"device {name!r} in {devices_dir} is a {device.kind}, not a {kind}",
                hint="use --reset-factory to recreate it, or another --name",
            )
        if bad_blocks is not None and device.config.geometry.bad_blocks != bad:
            device.close()
            raise UsageError(
                f"device {name!r} was made with bad blocks "
                f"{list(device.config.geometry.bad_blocks) or 'none'}, not {list(bad)}",
                hint="use --reset-factory to recreate it with these bad blocks",
            )
    stop = threading.Event()
    server = None
    reg_file: Path | None = None
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
        device.power_on()
        if brick:
            device.simulate_brick(brick)
        device.set_faults(fault_set)
        server = SimServer(
            device, host, port, console=ConsoleConfig(autoboot_delay_s=autoboot_delay)
        )
        ports = server.start()
        reg_file = write_registry(
            registry_dir,
            RegistryEntry(
                name,
                ports.host,
                ports.port,
                ports.spi_port,
                os.getpid(),
                kind,
                console_port=ports.console_port,
                tftp_port=ports.tftp_port,
            ),
        )
        click.echo(
            f"sim {name} ({kind}) listening on {ports.host}:{ports.port}, "
            f"spi {ports.host}:{ports.spi_port}, console {ports.host}:{ports.console_port}, "
            f"tftp {ports.host}:{ports.tftp_port}"
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        if server is not None:
            server.stop()
        device.close()
        if reg_file is not None:
            try:
                if read_registry(registry_dir, name).pid == os.getpid():
                    registry_path(registry_dir, name).unlink(missing_ok=True)
            except (UnbrickError, OSError):
                pass
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    return 0


def _run_fastboot_phone(
    listen: str,
    state_dir: Path | None,
    faults: tuple[str, ...],
    product: str | None,
    serial: str | None,
    max_download_size: str | None,
    locked: bool | None,
) -> int:
    from unbrick.sim.fastboot_phone import FastbootPhone, FastbootServer, parse_byte_size

    if state_dir is None:
        raise UsageError(
            f"{FASTBOOT_PHONE} needs --state-dir DIR",
            hint="each partition is the file DIR/<partition>.img",
        )
    host, port = parse_listen(listen)
    phone = FastbootPhone.open(
        state_dir,
        product=product,
        serialno=serial,
        max_download_size=parse_byte_size(max_download_size) if max_download_size else None,
        unlocked=None if locked is None else not locked,
        faults=parse_phone_faults(faults),
    )
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    server = FastbootServer(phone, host, port)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
        ports = server.start()
        click.echo(
            f"{FASTBOOT_PHONE} {phone.state.product} ({phone.state.serialno}) listening on "
            f"tcp {ports.host}:{ports.tcp_port} and udp {ports.host}:{ports.udp_port}, "
            f"state {state_dir}"
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    return 0


def _standalone(argv: list[str]) -> int:
    """``python -m unbrick.cli.sim``: the command without the rest of the CLI."""
    try:
        rv = sim.main(args=argv, prog_name="unbrick sim", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"unbrick: error: {e.format_message()}", err=True)
        return UsageError.exit_code
    except UnbrickError as e:
        click.echo(f"unbrick: error: {e.one_line()}", err=True)
        return e.exit_code
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(_standalone(sys.argv[1:]))
