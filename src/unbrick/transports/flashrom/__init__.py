"""SPI (and other) flash chips through the ``flashrom`` program: ``flashrom://PROGRAMMER?params``.

``output.py`` parses what flashrom prints (pure, fuzzed), ``runner.py`` is the one wrapper that
runs it, ``layout.py`` writes and reads layout regions, ``driver.py`` is the device driver;
:func:`open_flashrom` opens one. See ``docs/transports/spi.md``.
"""

from unbrick.transports.flashrom.driver import (
    FlashChip,
    FlashromDriver,
    FlashromOptions,
    ReadResult,
    VerifyResult,
    WriteResult,
    open_flashrom,
)
from unbrick.transports.flashrom.layout import LayoutRegion
from unbrick.transports.flashrom.runner import Flashrom, Programmer, TimeoutPolicy

__all__ = [
    "FlashChip",
    "Flashrom",
    "FlashromDriver",
    "FlashromOptions",
    "LayoutRegion",
    "Programmer",
    "ReadResult",
    "TimeoutPolicy",
    "VerifyResult",
    "WriteResult",
    "open_flashrom",
]
