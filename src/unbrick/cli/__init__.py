"""The ``unbrick`` command line: a thin layer over :mod:`unbrick.ops`."""
