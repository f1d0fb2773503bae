"""Placeholder until the parser lands."""

from __future__ import annotations

from unbrick.formats.base import FormatSpec

SPECS: tuple[FormatSpec, ...] = ()
