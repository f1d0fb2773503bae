"""``unbrick tftp``: the TFTP server and client on the command line.

* ``unbrick tftp serve --root DIR --listen 127.0.0.1:PORT [--allow-write]`` serves DIR in the
  foreground: it prints the bound address, one line per finished transfer, and stops cleanly
  on SIGTERM or SIGINT. Uploads are refused unless ``--allow-write``.
* ``unbrick tftp get HOST[:PORT] REMOTE LOCAL`` and ``unbrick tftp put HOST[:PORT] LOCAL
  [REMOTE]`` transfer one file (port 69 unless given).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from unbrick.errors import UnbrickError, UsageError

if TYPE_CHECKING:
    from unbrick.transports.tftp import TransferRecord, TransferResult


def parse_address(text: str, *, default_port: int | None, what: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or (with a default port) ``HOST``."""
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UsageError(f"{what} {text!r}: missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"{what} {text!r} is not [HOST]:PORT")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise UsageError(f"{what} {text!r} has no host", hint="e.g. 127.0.0.1:6969")
    if not port_text:
        if default_port is None:
            raise UsageError(f"{what} {text!r} is not HOST:PORT", hint="e.g. 127.0.0.1:0")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError as e:
        raise UsageError(f"{what} {text!r}: port {port_text!r} is not a number") from e
    if not 0 <= port <= 65535:
        raise UsageError(f"{what} {text!r}: port out of range")
    return host, port


def _describe_record(record: TransferRecord) -> str:
    who = f"{record.client[0]}:{record.client[1]}"
    if not record.ok:
        return f"{record.direction} {record.filename!r} by {who} failed: {record.error}"
    rate = record.size_bytes / record.duration_s / (1 << 20) if record.duration_s > 0 else 0.0
    return (
        f"{record.direction} {record.filename!r} by {who}: {record.size_bytes} bytes in "
        f"{record.duration_s:.2f} s ({rate:.1f} MiB/s, blksize {record.options.blksize}, "
        f"windowsize {record.options.windowsize})"
    )


def _describe_result(verb: str, result: TransferResult) -> str:
    rate = result.bytes_per_s / (1 << 20)
    how = (
        f"blksize {result.options.blksize}, windowsize {result.options.windowsize}"
        if result.negotiated
        else "server ignored options: blksize 512, windowsize 1"
    )
    return (
        f"{verb} {result.remote!r}: {result.size_bytes} bytes in {result.duration_s:.2f} s "
        f"({rate:.1f} MiB/s, {how})"
    )


@click.group("tftp")
def tftp() -> None:
    """TFTP server and client (RFC 1350, 2347, 2348, 2349, 7440)."""


@tftp.command("serve")
@click.option(
    "--root",
    required=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Directory to serve; nothing outside it is reachable.",
)
@click.option("--listen", default="127.0.0.1:69", show_default=True, help="HOST:PORT to bind.")
@click.option("--allow-write", is_flag=True, help="Accept uploads (WRQ) into the root.")
@click.option("--overwrite", is_flag=True, help="Let uploads replace existing files.")
@click.option("--blksize-max", type=int, default=65464, show_default=True, help="Largest blksize.")
@click.option(
    "--windowsize-max", type=int, default=64, show_default=True, help="Largest windowsize."
)
@click.option(
    "--window-bytes-max",
    type=int,
    default=128 * 1024,
    show_default=True,
    help="Cut windows to this many bytes (0: no cap); bigger bursts overflow receivers.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=1.0,
    show_default=True,
    help="First retransmission timeout in seconds (doubles on each retry).",
)
@click.option("--retries", type=int, default=5, show_default=True, help="Retransmissions.")
@click.option(
    "--max-sessions", type=int, default=64, show_default=True, help="Concurrent transfers."
)
def serve(
    root: Path,
    listen: str,
    allow_write: bool,
    overwrite: bool,
    blksize_max: int,
    windowsize_max: int,
    window_bytes_max: int,
    timeout_s: float,
    retries: int,
    max_sessions: int,
) -> int:
    """Serve ROOT over TFTP until SIGTERM or SIGINT."""
    from unbrick.transports.tftp import TftpServer

    host, port = parse_address(listen, default_port=None, what="--listen")
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_transfer(record: TransferRecord) -> None:
        click.echo(_describe_record(record))
        sys.stdout.flush()

    server = TftpServer(
        root,
        host=host,
        port=port,
        allow_write=allow_write,
        overwrite=overwrite,
        max_sessions=max_sessions,
        timeout_s=timeout_s,
        retries=retries,
        blksize_max=blksize_max,
        windowsize_max=windowsize_max,
        window_bytes_max=window_bytes_max,
        on_transfer=on_transfer,
    )
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
        bound_host, bound_port = server.start()
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        access = "uploads allowed" if allow_write else "read-only"
        click.echo(f"tftp server listening on {shown}:{bound_port}, root {root} ({access})")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    return 0


def _client_options(f: Any) -> Any:
    f = click.option("--blksize", type=int, default=1468, show_default=True)(f)
    f = click.option("--windowsize", type=int, default=1, show_default=True)(f)
    f = click.option("--timeout", "timeout_s", type=float, default=1.0, show_default=True)(f)
    f = click.option("--retries", type=int, default=5, show_default=True)(f)
    f = click.option(
        "--mode", type=click.Choice(["octet", "netascii"]), default="octet", show_default=True
    )(f)
    return f


@tftp.command("get")
@click.argument("server")
@click.argument("remote")
@click.argument("local", type=click.Path(path_type=Path, dir_okay=False))
@_client_options
def get(
    server: str,
    remote: str,
    local: Path,
    blksize: int,
    windowsize: int,
    timeout_s: float,
    retries: int,
    mode: str,
) -> int:
    """Read REMOTE from the TFTP SERVER (HOST[:PORT]) into LOCAL."""
    from unbrick.transports.tftp import tftp_get

    host, port = parse_address(server, default_port=69, what="server")
    result = tftp_get(
        host,
        port,
        remote,
        local,
        blksize=blksize,
        windowsize=windowsize,
        timeout_s=timeout_s,
        retries=retries,
        mode=mode,
    )
    click.echo(_describe_result("received", result))
    return 0


@tftp.command("put")
@click.argument("server")
@click.argument("local", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.argument("remote", required=False)
@_client_options
def put(
    server: str,
    local: Path,
    remote: str | None,
    blksize: int,
    windowsize: int,
    timeout_s: float,
    retries: int,
    mode: str,
) -> int:
    """Write LOCAL to the TFTP SERVER (HOST[:PORT]) as REMOTE (default: LOCAL's name)."""
    from unbrick.transports.tftp import tftp_put

    host, port = parse_address(server, default_port=69, what="server")
    result = tftp_put(
        host,
        port,
        remote or local.name,
        local,
        blksize=blksize,
        windowsize=windowsize,
        timeout_s=timeout_s,
        retries=retries,
        mode=mode,
    )
    click.echo(_describe_result("sent", result))
    return 0


def _standalone(argv: list[str]) -> int:
    """``python -m unbrick.cli.tftp``: the command group without the rest of the CLI."""
    try:
        rv = tftp.main(args=argv, prog_name="unbrick tftp", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"unbrick: error: {e.format_message()}", err=True)
        return UsageError.exit_code
    except UnbrickError as e:
        click.echo(f"unbrick: error: {e.one_line()}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(_standalone(sys.argv[1:]))
