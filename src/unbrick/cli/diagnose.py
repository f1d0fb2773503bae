"""``unbrick diagnose``: ask about the symptoms, classify the brick, list the recovery paths."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from unbrick.errors import UsageError

if TYPE_CHECKING:
    from unbrick.safety.triage import Diagnosis, Question, Triage

FAMILIES = ("router", "phone", "sbc", "mcu", "nas", "iot")


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def load_triage() -> Triage:
    """The triage data shipped with unbrick."""
    from importlib import resources

    from unbrick.safety.triage import Triage

    data = resources.files("unbrick.data").joinpath("triage.toml").read_bytes()
    return Triage.from_toml(data)


def _parse_symptoms(triage: Triage, symptoms: tuple[str, ...]) -> dict[str, str]:
    answers: dict[str, str] = {}
    for item in symptoms:
        qid, sep, aid = item.partition("=")
        qid, aid = qid.strip(), aid.strip()
        if not sep or not qid or not aid:
            raise UsageError(
                f"--symptom {item!r} is not QUESTION=ANSWER",
                hint=f"questions: {', '.join(q.id for q in triage.questions)}",
            )
        if qid in answers and answers[qid] != aid:
            raise UsageError(f"--symptom {qid} is given twice ({answers[qid]!r} and {aid!r})")
        answers[qid] = aid
    triage.check_answers(answers)
    return answers


def _ask(question: Question, *, err: bool) -> str:
    """Ask one question; ``err`` sends the conversation to stderr (keeping stdout for JSON)."""
    click.echo("", err=err)
    click.echo(question.text, err=err)
    if question.help:
        click.echo(f"  ({question.help})", err=err)
    for a in question.answers:
        click.echo(f"  {a.id:<16} {a.text}", err=err)
    choice: str = click.prompt(
        "answer",
        type=click.Choice(question.answer_ids()),
        show_choices=False,
        err=err,
    )
    return choice


def _render(d: Diagnosis) -> None:
    click.echo(f"Diagnosis: {d.class_label}")
    click.echo(f"  {d.summary}")
    click.echo(f"Risk: {d.risk}")
    if d.family is None:
        click.echo("Recovery paths: give --family to list the paths for your kind of device.")
    elif not d.paths:
        click.echo("Recovery paths: none; flashing tools cannot fix this.")
    else:
        click.echo("Recovery paths, in order of preference:")
        for n, s in enumerate(d.paths, start=1):
            mark = " (available: your answers show it)" if s.confirmed else ""
            click.echo(f"  {n}. {s.path.name}{mark} [risk: {s.path.risk}]")
            for step in s.path.steps:
                click.echo(f"     - {step}")
            click.echo(f"     tools: {'; '.join(s.path.tools)}")
    click.echo(f"When to get professional help: {d.professional}")


@click.command()
@click.option(
    "--family",
    type=click.Choice(FAMILIES),
    help="Kind of device; decides the recovery paths offered.",
)
@click.option(
    "--symptom",
    "symptoms",
    multiple=True,
    metavar="QUESTION=ANSWER",
    help="Answer a question in advance (repeatable), e.g. --symptom power=yes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as one JSON object.")
def diagnose(family: str | None, symptoms: tuple[str, ...], as_json: bool) -> int:
    """Work out what kind of brick a device is and how to recover it.

    Asks the questions not answered with --symptom (on stderr with --json), unless standard
    input is not a terminal; then diagnoses from the answers given.

    Questions and answers: power (yes, no), power_checked, damage, cause, behaviour, mode,
    usb, network, serial; run interactively to see their answers.
    """
    triage = load_triage()
    answers = _parse_symptoms(triage, symptoms)
    triage.check_family(family)
    if _stdin_is_tty():
        if family is None:
            family = click.prompt("Kind of device", type=click.Choice(FAMILIES), err=as_json)
        while (q := triage.next_question(answers, family)) is not None:
            answers[q.id] = _ask(q, err=as_json)
        click.echo("", err=as_json)
    result = triage.diagnose(answers, family)
    if as_json:
        from unbrick.cli.render import print_json

        print_json(result.to_dict())
    else:
        _render(result)
    return 0
