"""The workbench engine: the safe flash workflow, its journal, backups and repair log.

No global state: every job gets its store, vault, device and event sink passed in.
"""
