"""ESP32/ESP8266 boards over their serial download mode: ``esp:///dev/ttyUSB0?baud=460800``.

``open_esp(address, timeout_s=...)`` connects through esptool (the optional ``esp`` extra,
imported only when a device is opened) and returns an :class:`EspDriver`; the pure protocol
codec is :mod:`unbrick.transports.esp.protocol`. See ``docs/transports/esp.md``.
"""

from unbrick.transports.esp.driver import (
    EspDriver,
    EspOptions,
    boot_report,
    load_esptool,
    open_esp,
    translate_error,
)

__all__ = [
    "EspDriver",
    "EspOptions",
    "boot_report",
    "load_esptool",
    "open_esp",
    "translate_error",
]
