"""fastboot: ``fastboot+tcp://HOST:PORT``, ``fastboot+udp://HOST:PORT``, ``fastboot+usb://SERIAL``.

Layers: :mod:`.protocol` (pure codec of commands, responses and the TCP/UDP framing),
:mod:`.links` (TCP, UDP and USB links), :mod:`.client` (the host side of the protocol),
:mod:`.update` (update.zip packages: android-info.txt, fastboot-info.txt, the flashing plan),
:mod:`.driver` (:class:`FastbootDriver`, opened by :func:`open_fastboot`). See
``docs/transports/fastboot.md``.
"""
