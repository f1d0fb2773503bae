"""Block storage: SD cards, USB sticks, eMMC in mass-storage mode, loop devices and image files.

- :mod:`~unbrick.transports.block.target`: what a target is and whether it may be written
  (mounted, system disk, fixed disk checks), opened with O_EXCL;
- :mod:`~unbrick.transports.block.image`: images (raw, compressed, zip, Android sparse, bmap);
- :mod:`~unbrick.transports.block.writer`: the streaming writer with read-back verification,
  one image to several targets;
- :mod:`~unbrick.transports.block.bmapgen`: bmap files for images (SEEK_DATA/SEEK_HOLE);
- :mod:`~unbrick.transports.block.driver`: the ``block://`` device driver for the engine.
"""
