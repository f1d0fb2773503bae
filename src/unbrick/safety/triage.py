"""Brick triage as data: questions about the symptoms, rules that classify them, recovery paths.

The knowledge lives in ``unbrick/data/triage.toml`` (layout in docs/profiles.md, "Brick
triage"); this module is the engine, pure: :meth:`Triage.from_toml` validates the data strictly
(unknown keys, references to unknown questions, answers, paths, classes or families), then

* :meth:`Triage.next_question` gives the first unanswered question whose ``ask_if`` conditions
  hold for the answers so far (and that applies to the device family, when one is given);
* :meth:`Triage.diagnose` applies the first rule whose ``when`` conditions all hold, giving the
  brick class, then lists the family's recovery paths that fit the class, in the family's
  order of preference, those the answers confirm first and those they rule out dropped.

Conditions map a question id to an answer id, a list of answer ids (any of them), or
``{ not = ... }`` (none of them). A condition on an unanswered question never holds.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from unbrick.errors import UsageError

TRIAGE_FORMAT = "unbrick-triage-1"
LEVELS = ("soft", "hard")
RISKS = ("low", "medium", "high")
MAX_TRIAGE_BYTES = 1 << 20
_ID = re.compile(r"[a-z][a-z0-9_-]{0,63}")

_TOP_KEYS = ("format", "classes", "question", "path", "families", "rule")
_CLASS_KEYS = ("label", "levels")
_QUESTION_KEYS = ("id", "text", "help", "families", "ask_if", "answers")
_PATH_KEYS = (
    "id",
    "name",
    "levels",
    "risk",
    "tools",
    "steps",
    "methods",
    "confirmed_by",
    "ruled_out_by",
)
_RULE_KEYS = ("id", "when", "families", "class", "risk", "summary", "professional")


@dataclass(frozen=True)
class Condition:
    question: str
    answers: frozenset[str]
    negate: bool = False

    def holds(self, answers: Mapping[str, str]) -> bool:
        given = answers.get(self.question)
        if given is None:
            return False
        return (given in self.answers) != self.negate


@dataclass(frozen=True)
class Answer:
    id: str
    text: str


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    answers: tuple[Answer, ...]
    help: str = ""
    #: Empty: every family.
    families: tuple[str, ...] = ()
    ask_if: tuple[Condition, ...] = ()

    def answer_ids(self) -> tuple[str, ...]:
        return tuple(a.id for a in self.answers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "help": self.help,
            "answers": {a.id: a.text for a in self.answers},
        }


@dataclass(frozen=True)
class RecoveryPath:
    id: str
    name: str
    levels: tuple[str, ...]
    risk: str
    tools: tuple[str, ...]
    steps: tuple[str, ...]
    #: unbrick transport methods that carry out this path, if any.
    methods: tuple[str, ...] = ()
    #: Any of these answers shows the path is available.
    confirmed_by: tuple[Condition, ...] = ()
    #: Any of these answers shows the path cannot work.
    ruled_out_by: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class BrickClass:
    id: str
    label: str
    #: Path levels offered for this class; empty: no recovery path (hardware).
    levels: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    id: str
    when: tuple[Condition, ...]
    brick_class: str
    risk: str
    summary: str
    professional: str
    families: tuple[str, ...] = ()

    def applies(self, answers: Mapping[str, str], family: str | None) -> bool:
        if self.families and family not in self.families:
            return False
        return all(c.holds(answers) for c in self.when)


@dataclass(frozen=True)
class SuggestedPath:
    path: RecoveryPath
    #: The answers show this path is available (it is listed first).
    confirmed: bool

    def to_dict(self) -> dict[str, Any]:
        p = self.path
        return {
            "id": p.id,
            "name": p.name,
            "confirmed": self.confirmed,
            "risk": p.risk,
            "tools": list(p.tools),
            "steps": list(p.steps),
            "methods": list(p.methods),
        }


@dataclass(frozen=True)
class Diagnosis:
    brick_class: str
    class_label: str
    rule: str
    summary: str
    risk: str
    professional: str
    family: str | None
    paths: tuple[SuggestedPath, ...]
    #: Every tool the suggested paths need, in order of first use.
    tools: tuple[str, ...]
    answers: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.brick_class,
            "class_label": self.class_label,
            "rule": self.rule,
            "summary": self.summary,
            "risk": self.risk,
            "professional": self.professional,
            "family": self.family,
            "paths": [p.to_dict() for p in self.paths],
            "tools": list(self.tools),
            "answers": dict(self.answers),
        }


# ---------------------------------------------------------------------------------------------
# Loading


def _error(what: str) -> UsageError:
    return UsageError(f"triage data: {what}", hint="see docs/profiles.md, 'Brick triage'")


def _keys(where: str, data: Any, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise _error(f"{where} must be a table")
    for key in data:
        if key not in known:
            raise _error(f"unknown key '{key}' in {where}; known keys: {', '.join(known)}")
    return data


def _text(where: str, data: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise _error(f"'{key}' in {where} must be a non-empty string")
    return value


def _ident(where: str, data: Mapping[str, Any], key: str = "id") -> str:
    value = _text(where, data, key)
    if not _ID.fullmatch(value):
        raise _error(f"'{key}' {value!r} in {where} must match {_ID.pattern}")
    return value


def _texts(where: str, data: Mapping[str, Any], key: str, *, required: bool) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _error(f"'{key}' in {where} must be a list of non-empty strings")
    if required and not value:
        raise _error(f"'{key}' in {where} must not be empty")
    if len(set(value)) != len(value):
        raise _error(f"'{key}' in {where} lists an item twice")
    return tuple(value)


def _choices(where: str, key: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for v in values:
        if v not in allowed:
            raise _error(f"'{key}' in {where} names unknown {v!r}; known: {', '.join(allowed)}")


def _conditions(where: str, data: Any, questions: Mapping[str, Question]) -> tuple[Condition, ...]:
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise _error(f"{where} must be a table of question = answer")
    out: list[Condition] = []
    for qid, raw in data.items():
        question = questions.get(qid)
        if question is None:
            raise _error(
                f"{where} refers to unknown question '{qid}'; known: {', '.join(questions)}"
            )
        negate = False
        spec = raw
        if isinstance(raw, dict):
            _keys(f"{where} '{qid}'", raw, ("not",))
            if "not" not in raw:
                raise _error(f"{where} '{qid}' must be {{ not = ... }}")
            spec, negate = raw["not"], True
        values = [spec] if isinstance(spec, str) else spec
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) for v in values)
        ):
            raise _error(f"{where} '{qid}' must be an answer id or a list of answer ids")
        for v in values:
            if v not in question.answer_ids():
                raise _error(
                    f"{where} refers to unknown answer '{v}' of question '{qid}'; "
                    f"known: {', '.join(question.answer_ids())}"
                )
        out.append(Condition(qid, frozenset(values), negate))
    return tuple(out)


def _tables(doc: Mapping[str, Any], key: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list) or not value:
        raise _error(f"needs one or more [[{key}]] tables")
    return value


@dataclass(frozen=True)
class Triage:
    questions: tuple[Question, ...]
    paths: Mapping[str, RecoveryPath]
    classes: Mapping[str, BrickClass]
    #: Family -> path ids in order of preference.
    families: Mapping[str, tuple[str, ...]]
    rules: tuple[Rule, ...]

    @classmethod
    def from_toml(cls, data: bytes) -> Triage:
        """Parse and validate triage data; every problem is a UsageError naming it."""
        if len(data) > MAX_TRIAGE_BYTES:
            raise _error(f"{len(data)} bytes is too large")
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _error(f"not UTF-8 text ({e.reason} at byte {e.start})") from e
        except tomllib.TOMLDecodeError as e:
            raise _error(f"not valid TOML: {e}") from e
        _keys("the top level", doc, _TOP_KEYS)
        if doc.get("format") != TRIAGE_FORMAT:
            raise _error(f"format is {doc.get('format')!r}, expected {TRIAGE_FORMAT!r}")

        classes: dict[str, BrickClass] = {}
        raw_classes = doc.get("classes")
        if not isinstance(raw_classes, dict) or not raw_classes:
            raise _error("needs a [classes] table with one table per brick class")
        for cid, raw in raw_classes.items():
            where = f"[classes.{cid}]"
            if not _ID.fullmatch(cid):
                raise _error(f"class id {cid!r} must match {_ID.pattern}")
            spec = _keys(where, raw, _CLASS_KEYS)
            levels = _texts(where, spec, "levels", required=False)
            _choices(where, "levels", levels, LEVELS)
            classes[cid] = BrickClass(cid, _text(where, spec, "label"), levels)

        questions: dict[str, Question] = {}
        family_names: set[str] = set()
        raw_families = doc.get("families")
        if not isinstance(raw_families, dict) or not raw_families:
            raise _error("needs a [families] table of family = [path ids]")
        family_names.update(raw_families)
        for i, raw in enumerate(_tables(doc, "question"), start=1):
            where = f"[[question]] #{i}"
            spec = _keys(where, raw, _QUESTION_KEYS)
            qid = _ident(where, spec)
            where = f"[[question]] '{qid}'"
            if qid in questions:
                raise _error(f"two questions have id '{qid}'")
            raw_answers = spec.get("answers")
            if not isinstance(raw_answers, dict) or len(raw_answers) < 2:
                raise _error(f"{where} needs an answers table with at least two answers")
            answers: list[Answer] = []
            for aid, text in raw_answers.items():
                if not _ID.fullmatch(aid):
                    raise _error(f"answer id {aid!r} in {where} must match {_ID.pattern}")
                if not isinstance(text, str) or not text.strip():
                    raise _error(f"answer '{aid}' in {where} must have a non-empty text")
                answers.append(Answer(aid, text))
            fams = _texts(where, spec, "families", required=False)
            _choices(where, "families", fams, sorted(family_names))
            # ask_if may refer only to earlier questions: the flow is in file order.
            ask_if = _conditions(f"'ask_if' of {where}", spec.get("ask_if"), questions)
            questions[qid] = Question(
                id=qid,
                text=_text(where, spec, "text"),
                answers=tuple(answers),
                help=_text(where, spec, "help", required=False),
                families=fams,
                ask_if=ask_if,
            )

        paths: dict[str, RecoveryPath] = {}
        for i, raw in enumerate(_tables(doc, "path"), start=1):
            where = f"[[path]] #{i}"
            spec = _keys(where, raw, _PATH_KEYS)
            pid = _ident(where, spec)
            where = f"[[path]] '{pid}'"
            if pid in paths:
                raise _error(f"two paths have id '{pid}'")
            levels = _texts(where, spec, "levels", required=True)
            _choices(where, "levels", levels, LEVELS)
            risk = _text(where, spec, "risk")
            _choices(where, "risk", [risk], RISKS)
            paths[pid] = RecoveryPath(
                id=pid,
                name=_text(where, spec, "name"),
                levels=levels,
                risk=risk,
                tools=_texts(where, spec, "tools", required=True),
                steps=_texts(where, spec, "steps", required=True),
                methods=_texts(where, spec, "methods", required=False),
                confirmed_by=_conditions(
                    f"'confirmed_by' of {where}", spec.get("confirmed_by"), questions
                ),
                ruled_out_by=_conditions(
                    f"'ruled_out_by' of {where}", spec.get("ruled_out_by"), questions
                ),
            )

        families: dict[str, tuple[str, ...]] = {}
        for fam in raw_families:
            if not _ID.fullmatch(fam):
                raise _error(f"family {fam!r} must match {_ID.pattern}")
            listed = _texts("[families]", raw_families, fam, required=True)
            _choices("[families]", fam, listed, paths)
            families[fam] = listed

        rules: list[Rule] = []
        seen_rules: set[str] = set()
        for i, raw in enumerate(_tables(doc, "rule"), start=1):
            where = f"[[rule]] #{i}"
            spec = _keys(where, raw, _RULE_KEYS)
            rid = _ident(where, spec)
            where = f"[[rule]] '{rid}'"
            if rid in seen_rules:
                raise _error(f"two rules have id '{rid}'")
            seen_rules.add(rid)
            bclass = _text(where, spec, "class")
            _choices(where, "class", [bclass], classes)
            risk = _text(where, spec, "risk")
            _choices(where, "risk", [risk], RISKS)
            fams = _texts(where, spec, "families", required=False)
            _choices(where, "families", fams, families)
            rules.append(
                Rule(
                    id=rid,
                    when=_conditions(f"'when' of {where}", spec.get("when"), questions),
                    brick_class=bclass,
                    risk=risk,
                    summary=_text(where, spec, "summary"),
                    professional=_text(where, spec, "professional"),
                    families=fams,
                )
            )
        last = rules[-1]
        if last.when or last.families:
            raise _error(
                f"the last rule ('{last.id}') must have no 'when' and no 'families', so that "
                "every set of answers gets a diagnosis"
            )
        return cls(tuple(questions.values()), paths, classes, families, tuple(rules))

    # -----------------------------------------------------------------------------------------

    def question(self, question_id: str) -> Question:
        for q in self.questions:
            if q.id == question_id:
                return q
        raise UsageError(
            f"no triage question '{question_id}'",
            hint=f"questions: {', '.join(q.id for q in self.questions)}",
        )

    def check_answers(self, answers: Mapping[str, str]) -> None:
        """UsageError for an unknown question id or an answer the question does not offer."""
        for qid, aid in answers.items():
            q = self.question(qid)
            if aid not in q.answer_ids():
                raise UsageError(
                    f"'{aid}' is not an answer to '{qid}'",
                    hint=f"answers to '{qid}': {', '.join(q.answer_ids())}",
                )

    def check_family(self, family: str | None) -> None:
        if family is not None and family not in self.families:
            raise UsageError(
                f"unknown device family '{family}'",
                hint=f"families: {', '.join(self.families)}",
            )

    def next_question(
        self, answers: Mapping[str, str], family: str | None = None
    ) -> Question | None:
        """The next question to ask, or None when nothing more is worth asking."""
        self.check_answers(answers)
        self.check_family(family)
        for q in self.questions:
            if q.id in answers:
                continue
            if family is not None and q.families and family not in q.families:
                continue
            if all(c.holds(answers) for c in q.ask_if):
                return q
        return None

    def diagnose(self, answers: Mapping[str, str], family: str | None) -> Diagnosis:
        """Classify the answers and list the recovery paths (none without a family)."""
        self.check_answers(answers)
        self.check_family(family)
        rule = next(r for r in self.rules if r.applies(answers, family))
        bclass = self.classes[rule.brick_class]
        suggested: list[SuggestedPath] = []
        if family is not None:
            for pid in self.families[family]:
                path = self.paths[pid]
                if not set(path.levels) & set(bclass.levels):
                    continue
                if any(c.holds(answers) for c in path.ruled_out_by):
                    continue
                confirmed = any(c.holds(answers) for c in path.confirmed_by)
                suggested.append(SuggestedPath(path, confirmed))
        suggested.sort(key=lambda s: not s.confirmed)  # stable: preference order within
        tools: list[str] = []
        for s in suggested:
            tools.extend(t for t in s.path.tools if t not in tools)
        return Diagnosis(
            brick_class=bclass.id,
            class_label=bclass.label,
            rule=rule.id,
            summary=rule.summary,
            risk=rule.risk,
            professional=rule.professional,
            family=family,
            paths=tuple(suggested),
            tools=tuple(tools),
            answers=dict(answers),
        )
