"""U-Boot console driver: ``uboot+serial://``, ``uboot+tcp://``, ``uboot+rfc2217://``.

``open_uboot(address, timeout_s=...)`` reaches the ``=>`` prompt and returns a
:class:`UBootDriver`; see ``docs/transports/uboot.md``.
"""

from unbrick.transports.uboot.console import Console, ConsoleOptions, PortLink
from unbrick.transports.uboot.driver import UBootDriver, UBootOptions, open_uboot

__all__ = ["Console", "ConsoleOptions", "PortLink", "UBootDriver", "UBootOptions", "open_uboot"]
