"""``unbrick rescue``: the guided path for a person at the bench.

diagnose -> how to enter recovery mode (from the profile) -> wait for the device (live, with
a timeout) -> probe -> plan -> confirm -> flash -> the repair log, with the next step when
anything failed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from unbrick.cli.diagnose import _ask, _parse_symptoms, _render, _stdin_is_tty, load_triage
from unbrick.errors import TransportError, UnbrickError, UsageError


def _say(text: str = "") -> None:
    click.echo(text, err=True)


def _wait_for_device(wb: object, uri: str, profile_id: str | None, wait_s: float) -> object:
    """Probe until the device answers or ``wait_s`` passes; a live line shows the wait."""
    from unbrick.engine.workflow import Workbench

    assert isinstance(wb, Workbench)
    deadline = time.monotonic() + wait_s
    spinner = "|/-\\"
    n = 0
    last: UnbrickError | None = None
    while True:
        try:
            identity, _ = wb.probe(uri, profile_id)
        except (TransportError, UsageError) as e:
            if (
                isinstance(e, UsageError)
                and "registry" not in e.message
                and "no simulated" not in e.message
            ):
                raise
            last = e
        else:
            if sys.stderr.isatty():
                _say("\r" + " " * 60 + "\r")
            return identity
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError(
                f"{uri} did not appear within {wait_s:g} s"
                + (f" (last: {last.message})" if last else ""),
                hint="check the cable and power, repeat the recovery-mode steps, "
                "or give --wait with more seconds",
            )
        if sys.stderr.isatty():
            click.echo(
                f"\rwaiting for {uri} {spinner[n % 4]} {left:4.0f} s left ", nl=False, err=True
            )
        n += 1
        time.sleep(min(0.5, max(0.05, left)))


def run_rescue(
    uri: str | None,
    image: Path | None,
    *,
    family: str | None,
    symptoms: tuple[str, ...],
    profile: str | None,
    wait_s: float | None,
    yes: bool,
) -> int:
    from unbrick.cli.context import workbench
    from unbrick.cli.live import ConsoleSink
    from unbrick.engine.replog import RepairLog
    from unbrick.engine.workflow import FlashRequest

    interactive = _stdin_is_tty()
    # 1. What kind of brick is it?
    triage = load_triage()
    answers = _parse_symptoms(triage, symptoms)
    triage.check_family(family)
    if interactive:
        while (q := triage.next_question(answers, family)) is not None:
            answers[q.id] = _ask(q, err=True)
    diagnosis = triage.diagnose(answers, family)
    _say("== Diagnosis")
    _render(diagnosis)
    if diagnosis.brick_class == "hardware":
        _say("This looks like a hardware fault: stop here and get the board repaired.")
        return 0
    if uri is None:
        if not interactive:
            raise UsageError(
                "rescue needs the device URI", hint="e.g. unbrick rescue sim://r1 fw.bin"
            )
        uri = click.prompt("Device URI (e.g. sim://router1, uboot+serial:///dev/ttyUSB0)", err=True)
    assert uri is not None
    sink = ConsoleSink()
    with sink, workbench(sink, profile) as (wb, chosen):
        # 2. How to put it into recovery mode.
        prof = wb.profiles.find(chosen) if chosen else None
        if prof is not None:
            _instructions(prof.name, prof.recovery.instructions)
        timeout = wait_s if wait_s is not None else (prof.recovery.wait_s if prof else 60.0)
        # 3. Wait for it, then 4. probe.
        _say(f"== Waiting for {uri} (up to {timeout:g} s)")
        _wait_for_device(wb, uri, chosen, timeout)
        identity, matched = wb.probe(uri, chosen)
        _say(
            f"== Found {identity.model} serial {identity.serial}, firmware "
            f"{identity.firmware_version or 'none that boots'}, profile "
            f"{matched.id if matched else 'none'}"
        )
        if prof is None and matched is not None:
            _instructions(matched.name, matched.recovery.instructions)
        if image is None:
            if not interactive:
                raise UsageError("rescue needs the firmware IMAGE to flash")
            image = Path(click.prompt("Firmware image to flash", err=True))
        # 5. Plan and confirm, 6. run.
        request = FlashRequest(image=image, profile_id=chosen)
        plan = wb.plan(uri, request)
        from unbrick.cli.workbench import _confirm, _print_plan

        _print_plan(plan)
        refusal = plan.preflight.refusal()
        if refusal is not None:
            raise refusal
        _confirm(f"Flash {image.name} to {identity.model} {identity.serial}?", yes, False)
        job_id = ""
        try:
            result = wb.flash(uri, request, plan=plan)
            job_id = result.job_id
        except UnbrickError as e:
            job_id = _job_of(wb, identity.serial) or ""
            if job_id:
                _say("== Repair log")
                click.echo(RepairLog.from_store(wb.store, job_id).to_markdown())
            _say(f"== Next step: {e.hint or 'see the repair log above'}")
            raise
        # 7. The repair log.
        _say("== Repair log")
        click.echo(RepairLog.from_store(wb.store, job_id).to_markdown())
    return 0


def _instructions(name: str, steps: tuple[str, ...]) -> None:
    _say(f"== Put the {name} into recovery mode")
    for n, step in enumerate(steps, start=1):
        _say(f"  {n}. {step}")


def _job_of(wb: object, serial: str) -> str | None:
    from unbrick.engine.workflow import Workbench

    assert isinstance(wb, Workbench)
    jobs = wb.store.list_jobs(device_serial=serial, limit=1)
    return jobs[0].id if jobs else None
