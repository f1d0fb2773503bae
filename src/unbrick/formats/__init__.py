"""Firmware image formats: detection by content and pure, bounded parsers.

Nothing in this package opens files, sockets or programs. See ``docs/formats.md``.
"""
