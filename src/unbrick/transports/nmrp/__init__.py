"""NMRP, NETGEAR's router recovery protocol: raw Ethernet (ethertype 0x0912), then TFTP.

``codec`` is the pure message and frame codec; ``server`` is the host side
(:func:`~unbrick.transports.nmrp.server.flash_nmrp`) and the raw packet link it runs on. The
simulated router's side lives in ``unbrick.sim.nmrp_client``. See docs/transports/nmrp.md.
"""
