"""Firmware and bootloader version comparison: a total order over version strings.

Vendors write versions in many ways ("2023.01", "2.1.0", "1.0.0-rc1", "v2.3", "2023.01-sim",
"V1.0.0 Build 20200101"). :func:`parse_version` turns any string into a :class:`Version` whose
comparison follows these rules, in order:

1. Surrounding whitespace is ignored, and so is one leading ``v`` or ``V`` before a digit
   ("v2.3" is "2.3").
2. Build metadata after a ``+`` is ignored, as in Semantic Versioning ("2.1.0+git5" is "2.1.0").
3. The *release* is the leading run of dot-separated numbers, compared numerically component by
   component; missing trailing components count as zero ("2.1" == "2.1.0", "2023.01" ==
   "2023.1", "2.10" > "2.9").
4. What follows the release (after one optional ``-``, ``_``, ``~`` or ``.``) is the *suffix*.
   A suffix starting with a pre-release word sorts *before* the plain release, by word
   (``dev`` = ``snapshot`` < ``alpha`` < ``beta`` < ``pre`` = ``preview`` < ``rc``) and then by
   what follows the word ("1.0.0-rc1" < "1.0.0-rc2" < "1.0.0-rc10" < "1.0.0").
   Any other suffix marks a variant or a later build of the same release and sorts *after* it
   ("2023.01" < "2023.01-sim", "1.1.1" < "1.1.1a" < "1.1.1b").
5. Suffixes are compared case-insensitively in natural order: they are split into runs of
   digits (compared as numbers) and runs of letters (compared as text), separators ignored; a
   number sorts after text at the same position, and a shorter suffix that is a prefix of a
   longer one sorts first.
6. A string with no leading number ("unknown", "b1c1-0.4-7617406" after its letters) sorts
   before every version that has one, and such strings compare among themselves by rule 5 over
   the whole text.

Different strings may compare equal ("2.1" and "v2.1.0"); :class:`Version` equality is this
comparison, not string equality, so a ``Version`` keeps its original text in ``text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: Pre-release words and their rank (lower sorts first); every rank is below a plain release.
PRERELEASE_WORDS: dict[str, int] = {
    "dev": 0,
    "snapshot": 0,
    "alpha": 1,
    "beta": 2,
    "pre": 3,
    "preview": 3,
    "rc": 4,
}
_PLAIN_RANK = 10
_VARIANT_RANK = 20

_RELEASE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_TOKENS = re.compile(r"[0-9]+|[a-z]+")
_PRE = re.compile(r"([a-z]+)(?![a-z])")

#: One natural-order token: (0, 0, text) for letters, (1, number, "") for digits.
Token = tuple[int, int, str]


def _natural(text: str) -> tuple[Token, ...]:
    out: list[Token] = []
    for tok in _TOKENS.findall(text.lower()):
        if tok.isdigit():
            out.append((1, int(tok), ""))
        else:
            out.append((0, 0, tok))
    return tuple(out)


@dataclass(frozen=True, order=True)
class Version:
    """A parsed version. Compare with ``<``, ``==``... or :func:`compare`.

    ``release`` has its trailing zero components removed; ``suffix`` is the text after the
    release (lower-cased, build metadata removed).
    """

    #: 1 when the text starts with a number (rule 6).
    numbered: int
    release: tuple[int, ...]
    #: Pre-release word rank, ``_PLAIN_RANK`` for a plain release, ``_VARIANT_RANK`` otherwise.
    rank: int
    suffix_key: tuple[Token, ...]
    text: str = field(compare=False)
    suffix: str = field(compare=False, default="")

    @property
    def is_prerelease(self) -> bool:
        return self.rank < _PLAIN_RANK

    def __str__(self) -> str:
        return self.text


def parse_version(s: str) -> Version:
    """Parse any string as a version (never fails; see the module's rules)."""
    text = s
    body = s.strip()
    if len(body) > 1 and body[0] in "vV" and body[1].isdigit():
        body = body[1:]
    body = body.split("+", 1)[0]
    m = _RELEASE.match(body)
    if m is None:
        return Version(0, (), _PLAIN_RANK, _natural(body), text, body.lower())
    parts = [int(p) for p in m.group(0).split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    rest = body[m.end() :]
    if rest[:1] in ("-", "_", "~", "."):
        rest = rest[1:]
    suffix = rest.lower()
    if not suffix:
        return Version(1, tuple(parts), _PLAIN_RANK, (), text, "")
    word = _PRE.match(suffix)
    if word is not None and word.group(1) in PRERELEASE_WORDS:
        return Version(
            1,
            tuple(parts),
            PRERELEASE_WORDS[word.group(1)],
            _natural(suffix[word.end() :]),
            text,
            suffix,
        )
    return Version(1, tuple(parts), _VARIANT_RANK, _natural(suffix), text, suffix)


def compare(a: str | Version, b: str | Version) -> int:
    """-1, 0 or 1 as ``a`` sorts before, equal to or after ``b``."""
    va = a if isinstance(a, Version) else parse_version(a)
    vb = b if isinstance(b, Version) else parse_version(b)
    return (va > vb) - (va < vb)


def at_least(version: str, minimum: str) -> bool:
    """True when ``version`` is ``minimum`` or later."""
    return compare(version, minimum) >= 0
