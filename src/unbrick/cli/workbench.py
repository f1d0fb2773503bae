"""Workbench commands: device probe, flash, backup, restore, backups, resume, log, rescue."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click

from unbrick.errors import UsageError

_image = click.Path(path_type=Path, dir_okay=False)


def _int(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError as e:
        raise UsageError(f"{name} {text!r} is not a number (e.g. 0x80000 or 524288)") from e


def _sink(as_json: bool) -> Any:
    from unbrick.cli.live import ConsoleSink, JsonLinesSink

    return JsonLinesSink() if as_json else ConsoleSink()


def _confirm(question: str, yes: bool, as_json: bool) -> None:
    if yes:
        return
    if as_json or not sys.stdin.isatty():
        raise UsageError("this writes to the device and needs confirmation", hint="pass --yes")
    if not click.confirm(question, default=False, err=True):
        raise UsageError("not confirmed; nothing was written")


def _forced(force: tuple[str, ...], reason: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if len(force) != len(reason):
        raise UsageError(
            "every --force CHECK_ID needs its own --reason TEXT",
            hint="e.g. --force firmware.downgrade --reason 'known-good release for RMA'",
        )
    for r in reason:
        if not r.strip():
            raise UsageError("--reason must say why the check is overridden")
    return tuple(zip(force, reason, strict=True))


# ------------------------------------------------------------------------------- device


@click.group()
def device() -> None:
    """Talk to a device: identify it, find its profile, send allowed vendor commands."""


@device.command()
@click.argument("uri")
@click.option("--profile", help="Profile id or TOML file to use instead of matching.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def probe(uri: str, profile: str | None, as_json: bool) -> int:
    """Read the identity of the device at URI and show its matching profile."""
    from unbrick.cli.context import workbench
    from unbrick.cli.render import print_json, stdout_console
    from unbrick.engine.events import NullSink

    with workbench(NullSink(), profile) as (wb, chosen):
        identity, prof = wb.probe(uri, chosen)
    if as_json:
        print_json(
            {"device": uri, "identity": identity.to_dict(), "profile": prof.id if prof else None}
        )
        return 0
    con = stdout_console()
    con.print(f"[bold]{uri}[/]: {identity.model} (serial {identity.serial})")
    rows = identity.to_dict()
    for key in (
        "hw_revision",
        "region",
        "bootloader_version",
        "firmware_version",
        "security_version",
    ):
        con.print(f"  {key:<20} {rows[key] if rows[key] is not None else '-'}")
    if identity.storage:
        st = identity.storage
        con.print(
            f"  {'storage':<20} {st.type}, {st.size_bytes} bytes, "
            f"erase block {st.erase_block_bytes}"
        )
    con.print(f"  {'profile':<20} {prof.id + ' (' + prof.name + ')' if prof else 'none matches'}")
    return 0


@device.command()
@click.argument("uri")
@click.argument("command", nargs=-1, required=True)
@click.option("--profile", help="Profile id or TOML file to use instead of matching.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def oem(uri: str, command: tuple[str, ...], profile: str | None, as_json: bool) -> int:
    """Send the vendor command 'oem COMMAND' to the fastboot device at URI.

    Only commands in the device profile's allow-list ([link.fastboot] oem_allow) are sent;
    commands that lock or unlock the bootloader never are. Prints the device's messages and
    its final answer.
    """
    from unbrick.cli.context import workbench
    from unbrick.cli.render import print_json
    from unbrick.engine.events import NullSink

    with workbench(NullSink(), profile) as (wb, chosen):
        result = wb.oem(uri, " ".join(command), profile_id=chosen)
    if as_json:
        print_json(result.to_dict())
        return 0
    for line in result.lines:
        click.echo(line)
    click.echo(f"OKAY {result.value}".rstrip())
    return 0


# ------------------------------------------------------------------------------- flash


def _print_plan(plan: Any) -> None:
    from unbrick.cli.render import stdout_console

    con = stdout_console()
    d = plan.to_dict()
    t = d["target"]
    con.print(
        f"[bold]Plan[/] for {d['device']} ({plan.identity.model}, serial "
        f"{plan.identity.serial}), profile {d['profile']}"
    )
    con.print(
        f"  write {d['image']['path']} ({d['image']['format']}, {t['size']} bytes, "
        f"version {d['image']['version'] or '?'})"
    )
    slot = f", slot {t['slot']}" if t["slot"] else ""
    con.print(f"  to    region {t['region']} at 0x{t['offset']:x}{slot}")
    con.print(f"  steps {' -> '.join(d['steps'])}  (about {d['estimate_s']:.0f} s)")
    for c in d["checks"]:
        mark = "[green]pass[/]" if c["passed"] else "[red]FAIL[/]"
        if c.get("forced"):
            mark = "[yellow]forced[/]"
        con.print(f"  {mark} {c['id']:<22} {c['message']}")


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="URI [URI...] IMAGE")
@click.option("--partition", "region", help="Region (partition) to write, from the profile.")
@click.option("--offset", help="Absolute offset to write at instead of a region.")
@click.option("--profile", help="Profile id or TOML file to use instead of matching.")
@click.option("--manifest", type=_image, help="Firmware manifest (default IMAGE.manifest.toml).")
@click.option(
    "--android-info", type=_image, help="android-info.txt whose require/reject lines must hold."
)
@click.option("--loader", type=_image, help="Two-pass devices: the loader staged first.")
@click.option(
    "--bmap",
    type=_image,
    help="Block devices: the image's bmap (default: IMAGE.bmap beside it, if any).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and the checks; write nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines events and result.")
@click.option("--force", multiple=True, metavar="CHECK_ID", help="Override one check.")
@click.option("--reason", multiple=True, metavar="TEXT", help="Why (one per --force).")
@click.option("--allow-downgrade", is_flag=True, help="Allow an older firmware version.")
@click.option("--allow-critical", is_flag=True, help="Allow writing a critical region.")
@click.option(
    "--backup-scope",
    type=click.Choice(["full", "target", "none"]),
    default=None,
    help="Back up the whole flash, only what is written, or nothing [default: the profile's "
    "choice for the link, else full].",
)
@click.option("--sha256", metavar="HEX", help="Expected SHA-256 of IMAGE.")
@click.option("--sums", type=_image, help="Checksum file listing IMAGE.")
@click.option("--sig", type=_image, help="Detached signature of IMAGE.")
@click.option("--minisign-key", type=_image)
@click.option("--gpg-keyring", type=_image)
@click.option("--cms-ca", type=_image)
def flash(
    targets: tuple[str, ...],
    region: str | None,
    offset: str | None,
    profile: str | None,
    manifest: Path | None,
    android_info: Path | None,
    loader: Path | None,
    bmap: Path | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
    force: tuple[str, ...],
    reason: tuple[str, ...],
    allow_downgrade: bool,
    allow_critical: bool,
    backup_scope: str | None,
    sha256: str | None,
    sums: Path | None,
    sig: Path | None,
    minisign_key: Path | None,
    gpg_keyring: Path | None,
    cms_ca: Path | None,
) -> int:
    """Flash IMAGE to the device at URI through the safe workflow.

    Plan, pre-flight checks, verified backup, write, verify, reboot, validate, commit; on a
    failed verification or first boot the backup is restored (exit 7). Several block:// URIs
    write the same image to each target at once, each with its own result.
    """
    from unbrick.cli.context import workbench
    from unbrick.cli.render import print_json
    from unbrick.engine.workflow import FlashRequest, IntegrityRequest

    if len(targets) < 2:
        raise UsageError("give the device URI and the image", hint="unbrick flash URI IMAGE")
    *uris, image_text = targets
    image = Path(image_text)
    if not image.is_file():
        raise UsageError(f"{image}: no such image file")
    if bmap is not None:
        uris = [_with_bmap(u, bmap) for u in uris]
    if region is not None and offset is not None:
        raise UsageError("give --partition or --offset, not both")
    request = FlashRequest(
        image=image,
        region=region,
        offset=_int(offset, "--offset"),
        manifest=manifest,
        android_info=android_info,
        loader=loader,
        integrity=IntegrityRequest(
            sha256=sha256,
            sums=sums,
            signature=sig,
            minisign_key=minisign_key,
            gpg_keyring=gpg_keyring,
            cms_ca=cms_ca,
        ),
        allow_downgrade=allow_downgrade,
        allow_critical=allow_critical,
        forced=_forced(force, reason),
        backup_scope=backup_scope,
    )
    if len(uris) > 1:
        return _flash_many(uris, request, profile, yes, as_json)
    uri = uris[0]
    sink = _sink(as_json)
    if _is_update_package(uri, image, region, offset):
        with sink, workbench(sink, profile) as (wb, _):
            _confirm(f"Flash the update package {image.name} to {uri}?", yes, as_json)
            result = wb.flash_update(uri, image, forced=dict(request.forced))
            _report(result.to_dict(), as_json, sink)
        return 0
    with sink, workbench(sink, profile, dict(request.forced)) as (wb, chosen):
        request = _with_profile(request, chosen)
        plan = wb.plan(uri, request)
        if dry_run:
            if as_json:
                print_json({"kind": "plan", "plan": plan.to_dict()})
            else:
                _print_plan(plan)
            refusal = plan.preflight.refusal()
            return 0 if refusal is None else refusal.exit_code
        if not as_json:
            _print_plan(plan)
        refusal = plan.preflight.refusal()
        if refusal is None:
            _confirm(
                f"Write {image.name} to {plan.target.region} of {plan.identity.model} "
                f"{plan.identity.serial}?",
                yes,
                as_json,
            )
        result = wb.flash(uri, request, plan=plan)
        _report(result.to_dict(), as_json, sink)
    return 0


def _with_bmap(uri: str, bmap: Path) -> str:
    from urllib.parse import quote

    if not uri.startswith("block:"):
        raise UsageError(f"--bmap is for block:// devices, not {uri}")
    return uri + ("&" if "?" in uri else "?") + "bmap=" + quote(str(bmap.resolve()), safe="/")


def _flash_many(
    uris: list[str], request: Any, profile: str | None, yes: bool, as_json: bool
) -> int:
    """The same image to several block devices at once (a job each, run side by side)."""
    import threading

    from unbrick.cli.context import workbench
    from unbrick.cli.render import print_json, stdout_console
    from unbrick.engine.events import ListSink
    from unbrick.errors import UnbrickError
    from unbrick.model.uri import parse_device_uri
    from unbrick.ops.images import ReportCache
    from unbrick.transports.block.engine import group_key
    from unbrick.transports.block.group import WriteGroup

    if any(not u.startswith("block:") for u in uris):
        raise UsageError("several targets at once are for block:// devices only")
    if len(set(uris)) != len(uris):
        raise UsageError("a target is named twice")
    _confirm(f"Write {request.image.name} to {len(uris)} devices: {', '.join(uris)}?", yes, as_json)
    results: dict[str, dict[str, Any]] = {}
    # The image is read (and decompressed) once and goes to every target that gets to write.
    group = WriteGroup(len(uris))
    reports = ReportCache()  # and it is checked (hashed, decompressed) once for all the jobs
    opening = threading.Lock()
    printing = threading.Lock()

    class TargetSink(ListSink):
        """Each target's steps, as they end, on lines of their own (JSON: events)."""

        def __init__(self, uri: str) -> None:
            super().__init__()
            self.uri = uri

        def emit(self, event: Any) -> None:
            super().emit(event)
            if event.kind not in ("step-end", "step-error", "progress"):
                return
            with printing, contextlib.suppress(OSError):  # a closed pipe stops no job
                if as_json:
                    print_json({"target": self.uri, **event.to_dict()})
                elif event.kind != "progress":
                    mark = "ok  " if event.kind == "step-end" else "FAIL"
                    stdout_console().print(f"{self.uri}: {mark} {event.name}", highlight=False)

    def one(uri: str) -> None:
        try:
            with contextlib.ExitStack() as stack:
                with opening:  # one job database connection opens at a time
                    wb, chosen = stack.enter_context(
                        workbench(TargetSink(uri), profile, dict(request.forced), group, reports)
                    )
                result = wb.flash(uri, _with_profile(request, chosen))
            results[uri] = {"outcome": result.outcome, "job": result.job_id, "exit": 0}
        except UnbrickError as e:
            results[uri] = {"outcome": "failed", "error": e.one_line(), "exit": e.exit_code}
        finally:  # a job that never got to its write does not hold the others back
            group.leave(group_key(parse_device_uri(uri)))

    threads = [threading.Thread(target=one, args=(u,), name=f"flash {u}") for u in uris]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if as_json:
        print_json({"kind": "result", "targets": results})
    else:
        con = stdout_console()
        for uri in uris:
            r = results[uri]
            if r["exit"] == 0:
                con.print(f"[green]{r['outcome']}[/]: {uri} (job {r['job']})")
            else:
                con.print(f"[red]failed[/]: {uri}: {r['error']}")
    codes = [r["exit"] for r in results.values() if r["exit"]]
    return int(codes[0]) if codes else 0


def _is_update_package(uri: str, image: Path, region: str | None, offset: str | None) -> bool:
    """A fastboot ``update.zip`` given without a partition: flashed image by image."""
    import zipfile

    scheme = uri.split(":", 1)[0]
    return (
        scheme.startswith("fastboot")
        and region is None
        and offset is None
        and zipfile.is_zipfile(image)
    )


def _with_profile(request: Any, chosen: str | None) -> Any:
    from dataclasses import replace

    return replace(request, profile_id=chosen) if chosen else request


def _report(result: dict[str, Any], as_json: bool, sink: Any) -> None:
    from unbrick.cli.render import stdout_console

    if as_json:
        sink.result(result)
        return
    con = stdout_console()
    boot = result.get("boot") or {}
    ver = f", running {boot.get('firmware_version')}" if boot.get("firmware_version") else ""
    con.print(
        f"[green]{result['outcome']}[/]: job {result['job']}{ver}"
        + (f", backup {result['backup'][:12]}" if result.get("backup") else "")
    )


# ------------------------------------------------------------------------------- backups


@click.command()
@click.argument("uri")
@click.option("--region", "regions", multiple=True, help="Only this region (repeatable).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the backup's plain content to this file (mode 0600).",
)
@click.option("--json", "as_json", is_flag=True)
def backup(uri: str, regions: tuple[str, ...], output: Path | None, as_json: bool) -> int:
    """Read the device's flash into the encrypted backup vault, verified."""
    from unbrick.cli.context import paths, workbench
    from unbrick.engine.vault import BackupVault

    sink = _sink(as_json)
    with sink, workbench(sink) as (wb, _):
        result = wb.backup(uri, list(regions) or None)
        if output is not None and result.backup_id:
            p = paths()
            _export(BackupVault(p.vault_dir, p.key_file), result.backup_id, output, as_json)
        _report(result.to_dict(), as_json, sink)
    return 0


def _export(vault: Any, backup_id: str, output: Path, quiet: bool) -> None:
    """Write a backup's plaintext to ``output`` atomically (0600: flash dumps hold keys and
    calibration data)."""
    import os
    import tempfile

    from unbrick.cli.render import stdout_console

    full = vault.resolve(backup_id)
    directory = output.resolve().parent
    fd, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=directory)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in vault.open(full):
                f.write(piece)
                size += len(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if not quiet:
        stdout_console().print(f"backup {full[:12]} written to {output} ({size} bytes)")


@click.command()
@click.argument("uri")
@click.argument("backup_id")
@click.option("--yes", is_flag=True)
@click.option("--allow-critical", is_flag=True, help="Allow rewriting the bootloader.")
@click.option("--profile", help="Profile id or TOML file (needed through a flash programmer).")
@click.option("--force", multiple=True, metavar="CHECK_ID")
@click.option("--reason", multiple=True, metavar="TEXT")
@click.option("--json", "as_json", is_flag=True)
def restore(
    uri: str,
    backup_id: str,
    yes: bool,
    allow_critical: bool,
    profile: str | None,
    force: tuple[str, ...],
    reason: tuple[str, ...],
    as_json: bool,
) -> int:
    """Write BACKUP_ID back to the device at URI (only regions that differ), verified."""
    from unbrick.cli.context import workbench

    forced = dict(_forced(force, reason))
    sink = _sink(as_json)
    with sink, workbench(sink, profile) as (wb, chosen):
        _confirm(f"Restore backup {backup_id} to {uri}?", yes, as_json)
        result = wb.restore(
            uri, backup_id, profile_id=chosen, allow_critical=allow_critical, forced=forced
        )
        _report(result.to_dict(), as_json, sink)
    return 0


@click.group()
def backups() -> None:
    """The encrypted backup vault."""


@backups.command(name="export")
@click.argument("backup_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write the backup's plain content to (mode 0600).",
)
def export_backup(backup_id: str, output: Path) -> int:
    """Write a backup's plain content (checked against its id) to a file."""
    from unbrick.cli.context import paths
    from unbrick.engine.vault import BackupVault

    p = paths()
    _export(BackupVault(p.vault_dir, p.key_file), backup_id, output, quiet=False)
    return 0


@backups.command(name="list")
@click.option("--device", "serial", help="Only backups of this device serial.")
@click.option("--json", "as_json", is_flag=True)
def list_backups(serial: str | None, as_json: bool) -> int:
    """List backups, newest first."""
    from unbrick.cli.context import paths
    from unbrick.cli.render import print_json, stdout_console
    from unbrick.engine.vault import BackupVault

    p = paths()
    records = BackupVault(p.vault_dir, p.key_file).list(device_serial=serial)
    if as_json:
        print_json([r.to_dict() for r in records])
        return 0
    con = stdout_console()
    if not records:
        con.print("no backups")
    for r in records:
        ident = r.meta.get("device_identity", {})
        con.print(
            f"{r.id[:16]}  {r.created_iso}  {ident.get('model')} {ident.get('serial')}  "
            f"{r.size_bytes} bytes  fw {ident.get('firmware_version') or '?'}"
        )
    return 0


# ------------------------------------------------------------------------------- jobs


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def resume(job_id: str, as_json: bool) -> int:
    """Continue an interrupted job after re-reading the device (or roll it back)."""
    from unbrick.cli.context import workbench

    sink = _sink(as_json)
    with sink, workbench(sink) as (wb, _):
        result = wb.resume(job_id)
        _report(result.to_dict(), as_json, sink)
    return 0


@click.command(name="log")
@click.argument("job_id", required=False)
@click.option("--device", "serial", help="Only jobs on this device serial.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines.")
@click.option(
    "--export",
    "export",
    type=click.Choice(["jsonl", "markdown"]),
    help="Write the repair log of JOB_ID in this format.",
)
@click.option("-o", "--output", type=_image, help="File for --export (default stdout).")
def log_cmd(
    job_id: str | None, serial: str | None, as_json: bool, export: str | None, output: Path | None
) -> int:
    """Show the repair log: the jobs, or every step of one job."""
    import json

    from unbrick.cli.context import paths
    from unbrick.engine.replog import RepairLog, summary_line
    from unbrick.engine.store import SQLiteStore

    store = SQLiteStore(paths().db_path)
    try:
        if job_id is None:
            if export:
                raise UsageError("--export needs a JOB_ID", hint="see 'unbrick log' for ids")
            jobs = store.list_jobs(device_serial=serial)
            for job in jobs:
                if as_json:
                    click.echo(json.dumps(job.to_dict(), default=str))
                else:
                    click.echo(summary_line(job))
            if not jobs and not as_json:
                click.echo("no jobs yet")
            return 0
        rep = RepairLog.from_store(store, job_id)
        fmt = export or ("jsonl" if as_json else "markdown")
        text = rep.to_jsonl() if fmt == "jsonl" else rep.to_markdown()
        if output is not None:
            try:
                output.write_text(text)
            except OSError as e:
                from unbrick.errors import SourceError

                raise SourceError(f"{output}: cannot write: {e.strerror}") from e
        else:
            click.echo(text, nl=not text.endswith("\n"))
    finally:
        store.close()
    return 0


# ------------------------------------------------------------------------------- rescue


@click.command()
@click.argument("uri", required=False)
@click.argument("image", type=_image, required=False)
@click.option("--family", help="Device family for the triage questions (router, phone...).")
@click.option(
    "--symptom",
    "symptoms",
    multiple=True,
    metavar="QUESTION=ANSWER",
    help="Answer a triage question (repeatable).",
)
@click.option("--profile", help="Profile id or TOML file (for recovery instructions).")
@click.option("--wait", "wait_s", type=float, default=None, help="Seconds to wait for the device.")
@click.option("--yes", is_flag=True, help="Do not ask before flashing.")
def rescue(
    uri: str | None,
    image: Path | None,
    family: str | None,
    symptoms: tuple[str, ...],
    profile: str | None,
    wait_s: float | None,
    yes: bool,
) -> int:
    """The guided rescue: diagnose, enter recovery, wait, probe, plan, flash, report."""
    from unbrick.cli.rescue import run_rescue

    return run_rescue(
        uri, image, family=family, symptoms=symptoms, profile=profile, wait_s=wait_s, yes=yes
    )


COMMANDS = (device, flash, backup, restore, backups, resume, log_cmd, rescue)
