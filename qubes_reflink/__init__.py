"""qubes-reflink: a Qubes OS storage pool driver that keeps VM disks as
image files and snapshots them with reflinks (btrfs, XFS).

qubesd loads `ReflinkPool` through the entry point group ``qubes.storage``.
"""

from .pool import ReflinkPool
from .volume import ReflinkVolume

__all__ = ["ReflinkPool", "ReflinkVolume"]
