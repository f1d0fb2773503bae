"""``unbrick image``: inspect, verify and convert firmware image files."""

from __future__ import annotations

from pathlib import Path

import click

from unbrick.errors import ALL_ERRORS, IntegrityError, SignatureError, UnbrickError, UsageError
from unbrick.formats.base import Limits
from unbrick.formats.memmap import DEFAULT_MAX_SPAN

# The heavier modules (parsers, crypto, rich) are imported inside each command so that a
# command starts quickly: `image convert` on a large file is measured against C tools.

_path = click.Path(path_type=Path, dir_okay=False)
_ERRORS_BY_NAME: dict[str, type[UnbrickError]] = {c.__name__: c for c in ALL_ERRORS}
_TARGETS = ("raw", "sparse", "ihex", "srec", "uf2")
_SIGNATURE_CHECKS = frozenset({"minisign", "signify", "openpgp", "cms", "sums-openpgp"})


def _int_option(name: str, text: str, lo: int, hi: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise UsageError(f"{name} {text!r} is not a number from {lo:#x} to {hi:#x}")
    return value


def _limits(max_expanded: int | None, max_depth: int | None) -> Limits:
    base = Limits()
    return Limits(
        max_depth=max_depth if max_depth is not None else base.max_depth,
        max_expanded_bytes=max_expanded if max_expanded is not None else base.max_expanded_bytes,
    )


@click.group()
def image() -> None:
    """Inspect, verify and convert firmware image files."""


@image.command()
@click.argument("file", type=_path)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--image", "companion", type=_path, help="Image described by a bmap file.")
@click.option("--max-expanded", type=int, help="Bytes decompression may produce.")
@click.option("--max-depth", type=int, help="Container nesting allowed.")
def inspect(
    file: Path,
    as_json: bool,
    companion: Path | None,
    max_expanded: int | None,
    max_depth: int | None,
) -> int:
    """Detect FILE's format by content and check it.

    Exit status: 0 valid, 1 parsed but invalid, other codes for refusals.
    """
    from unbrick.cli.render import details_table, print_json, stdout_console
    from unbrick.ops import images

    report = images.inspect_path(file, limits=_limits(max_expanded, max_depth), companion=companion)
    if as_json:
        print_json(report.to_dict())
    else:
        con = stdout_console()
        verdict = "[green]valid[/]" if report.valid else "[red]INVALID[/]"
        con.print(f"[bold]{file}[/]: {report.format}, {report.size} bytes, {verdict}")
        con.print(f"  sha256 {report.sha256}")
        for p in report.problems:
            con.print(f"  [red]problem:[/] {p}")
        for w in report.warnings:
            con.print(f"  [yellow]warning:[/] {w}")
        if report.details:
            con.print(details_table(report.details))
    return 0 if report.valid else 1


@image.command()
@click.argument("file", type=_path)
@click.option("--sha256", "sha256", metavar="HEX", help="Expected SHA-256 of FILE.")
@click.option("--sums", type=_path, help="Checksum file (GNU or BSD format) listing FILE.")
@click.option("--sig", type=_path, help="Detached signature of FILE.")
@click.option("--minisign-key", type=_path, help="minisign/signify/usign public key.")
@click.option("--gpg-keyring", type=_path, help="OpenPGP keyring trusted for --sig.")
@click.option("--cms-ca", type=_path, help="CA certificate (PEM) trusted for a CMS --sig.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify(
    file: Path,
    sha256: str | None,
    sums: Path | None,
    sig: Path | None,
    minisign_key: Path | None,
    gpg_keyring: Path | None,
    cms_ca: Path | None,
    as_json: bool,
) -> int:
    """Check FILE against checksums and signatures; exit 0 only if every check passed."""
    from unbrick.cli.render import print_json, stdout_console
    from unbrick.trust.verify import verify_file

    report = verify_file(
        file,
        sha256=sha256,
        sums=sums,
        signature=sig,
        minisign_key=minisign_key,
        gpg_keyring=gpg_keyring,
        cms_ca=cms_ca,
    )
    if as_json:
        print_json(report.to_dict())
    else:
        con = stdout_console()
        for check in report.checks:
            mark = "[green]ok[/]" if check.passed else "[red]FAILED[/]"
            weak = " [yellow](weak algorithm)[/]" if check.weak else ""
            con.print(f"{mark} {check.id}: {check.detail}{weak}")
    for w in report.warnings:
        click.echo(f"unbrick: warning: {w}", err=True)
    if report.ok:
        return 0
    failed = [c for c in report.checks if not c.passed]
    if not failed:
        raise UsageError("no check requested", hint="give --sha256, --sums or --sig with a key")
    first = failed[0]
    # The failed check's own error class decides the exit status (docs/exit-codes.md).
    cls = _ERRORS_BY_NAME.get(first.error or "", IntegrityError)
    if first.error is None and first.id in _SIGNATURE_CHECKS:
        cls = SignatureError
    more = f" (and {len(failed) - 1} more failed check(s))" if len(failed) > 1 else ""
    # Signature check details already say what to do; checksum details only state the facts.
    hint = "" if cls is SignatureError else None
    raise cls(f"{file}: {first.id} check failed: {first.detail}{more}", hint=hint)


@image.command()
@click.argument("file", type=_path)
@click.option("-o", "--output", type=_path, required=True, help="Output file.")
@click.option("--to", "target", type=click.Choice(_TARGETS), required=True)
@click.option(
    "--block-size", type=int, default=4096, show_default=True, help="Block size of a sparse output."
)
@click.option(
    "--fill",
    type=str,
    default="0xff",
    show_default=True,
    help="Byte for gaps between HEX/SREC/UF2/ELF segments.",
)
@click.option(
    "--max-span",
    type=int,
    default=DEFAULT_MAX_SPAN,
    show_default=True,
    help="Largest address span a HEX/SREC/UF2/ELF file may expand to.",
)
@click.option("--family", type=str, help="UF2 family id to extract or write (e.g. 0xe48bff56).")
@click.option(
    "--base", "base", type=str, help="Address of the first byte of a HEX/SREC/UF2 output."
)
@click.option("--entry", type=str, help="Entry point written into a HEX/SREC output.")
@click.option("--max-expanded", type=int, help="Bytes decompression may produce.")
@click.option("--hash", "hash_output", is_flag=True, help="Report the output's SHA-256.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert(
    file: Path,
    output: Path,
    target: str,
    block_size: int,
    fill: str,
    max_span: int,
    family: str | None,
    base: str | None,
    entry: str | None,
    max_expanded: int | None,
    hash_output: bool,
    as_json: bool,
) -> int:
    """Expand FILE to raw, or write it as Android sparse, Intel HEX, S-record or UF2.

    raw accepts Android sparse, Intel HEX, S-record, UF2, ELF and gzip/xz/zstd/bzip2
    (of any of these). The output is written to a temporary file and renamed into place
    only when complete.
    """
    from unbrick.cli.render import print_json
    from unbrick.ops import images

    fill_byte = _int_option("--fill", fill, 0, 0xFF)
    family_id = _int_option("--family", family, 0, 0xFFFFFFFF) if family else None
    base_address = _int_option("--base", base, 0, 0xFFFFFFFF) if base else None
    entry_point = _int_option("--entry", entry, 0, 0xFFFFFFFF) if entry else None
    if block_size < 4 or block_size % 4 or block_size > 1 << 24:
        raise UsageError(f"--block-size {block_size} is not a multiple of 4 up to 16 MiB")
    report = images.convert_path(
        file,
        output,
        target,
        limits=_limits(max_expanded, None),
        block_size=block_size,
        raw_options=images.RawOptions(
            fill=fill_byte,
            max_span=max_span,
            family_id=family_id,
            base_address=base_address,
            entry=entry_point,
        ),
        hash_output=hash_output,
    )
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(
            f"{report.source} ({report.source_format}) -> {report.output} ({report.target}), "
            f"{report.size} bytes" + (f", sha256 {report.sha256}" if report.sha256 else "")
        )
    return 0


@image.command(name="bmap")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the bmap (default: IMAGE.bmap).",
)
@click.option("--block-size", default=4096, show_default=True, help="Bytes per bmap block.")
@click.option(
    "--skip-zero-blocks", is_flag=True, help="Leave out blocks that hold only zero bytes."
)
def bmap(path: Path, output: Path | None, block_size: int, skip_zero_blocks: bool) -> int:
    """Write the bmap of a raw image: the ranges that hold data, with their SHA-256, so that
    `unbrick flash block://...` (and bmaptool) write only those."""
    from unbrick.cli.render import stdout_console
    from unbrick.transports.block.bmapgen import write_bmap

    report = write_bmap(path, output, block_size=block_size, skip_zero_blocks=skip_zero_blocks)
    stdout_console().print(
        f"{report.path}: {report.mapped_blocks} of {-(-report.image_size // report.block_size)}"
        f" blocks mapped in {report.ranges} ranges (block size {report.block_size})"
    )
    return 0


@image.command(name="formats")
def list_formats() -> int:
    """List the formats unbrick recognises."""
    from unbrick.cli.render import stdout_console
    from unbrick.formats.raw import SPEC as RAW_SPEC
    from unbrick.formats.registry import FORMATS

    con = stdout_console()
    for spec in (*FORMATS, RAW_SPEC):
        con.print(f"[bold]{spec.name:15}[/] {spec.summary}")
    return 0
