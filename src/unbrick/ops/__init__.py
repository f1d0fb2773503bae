"""Library operations on files: the calls the CLI (and later the server) make.

This layer opens files and runs the pure parsers and trust checks on them. It never prints.
"""
