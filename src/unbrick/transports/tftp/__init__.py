"""TFTP (RFC 1350) with option negotiation (RFC 2347), blksize (RFC 2348), timeout and tsize
(RFC 2349) and windowsize (RFC 7440): a server for devices that pull files and a client for
devices whose recovery mode is a TFTP server.

Layers: :mod:`.codec` (pure packets and negotiation), :mod:`.transfer` (the sending and
receiving halves of a transfer over one UDP socket), :mod:`.server` and :mod:`.client`.
"""

from __future__ import annotations

from unbrick.transports.tftp.client import TransferResult, tftp_get, tftp_put
from unbrick.transports.tftp.codec import ErrorCode, TftpRemoteError, TransferOptions
from unbrick.transports.tftp.server import PathRefused, TftpServer, TransferRecord
from unbrick.transports.tftp.transfer import LossHook

__all__ = [
    "ErrorCode",
    "LossHook",
    "PathRefused",
    "TftpRemoteError",
    "TftpServer",
    "TransferOptions",
    "TransferRecord",
    "TransferResult",
    "tftp_get",
    "tftp_put",
]
