"""What hurts a pool, for ``qubes-reflink check``: read-only findings.

* btrfs metadata nearly full: btrfs reports "no space left" once its
  metadata chunks are full and no unallocated space is left for another,
  however much data space remains;
* images with ``nodatacow`` (chattr +C): no checksums, and no reflinks
  with the pool's other files;
* fragmented committed images: every clone of them (spares, AppVM
  starts, exports) costs time in proportion to their extents;
* whether the pool directory is a btrfs subvolume of its own (what backup
  tools that snapshot a pool, such as Wyng, want).
"""

import fcntl
import os
import struct
from typing import NamedTuple

from . import btrfs, defrag, inspect, layout

GIB = 1024**3
#: metadata this full (its global reserve counted as used), and less than
#: `METADATA_ROOM` unallocated: btrfs refuses new metadata well before
#: 100 %, as it reserves room for each operation in advance (a small
#: btrfs filled with small files here refused more at 71 % used, 82 %
#: with the reserve)
METADATA_FULL = 0.75
#: unallocated bytes under which btrfs may find no room for a new
#: metadata chunk (256 MiB to 1 GiB each)
METADATA_ROOM = GIB

FS_IOC_GETFLAGS = 0x80086601
FS_NOCOW_FL = 0x00800000

#: the kinds of files checked for nodatacow
_IMAGE_KINDS = frozenset(
    {layout.COMMITTED, layout.DIRTY, layout.REVISION, layout.SPARE}
)


class Finding(NamedTuple):
    """One warning: what kind, the message, the volume (or "")."""

    kind: str
    message: str
    vid: str = ""


class Health(NamedTuple):
    """What `check` found of a pool directory."""

    subvolume: object  # True/False on btrfs, None elsewhere
    space: object  # btrfs.Space or None
    findings: list


def metadata_findings(space):
    """A finding if the btrfs `space` has its metadata nearly full."""
    if space is None or space.metadata_size == 0:
        return []
    taken = space.metadata_usage + space.global_reserve
    share = taken / space.metadata_size
    if share < METADATA_FULL or space.unallocated >= METADATA_ROOM:
        return []
    return [
        Finding(
            "metadata",
            f"btrfs metadata is {share:.0%} full ({taken} of "
            f"{space.metadata_size} bytes, its reserve included) and only "
            f"{space.unallocated} "
            "bytes of the disk are unallocated: writes will fail with 'no "
            "space left' although data space remains. Free chunks with "
            "'btrfs balance start -dusage=50 DIR', and remove revisions "
            "or qubes you no longer need",
        )
    ]


def nocow(path):
    """Whether the file `path` has the nodatacow attribute."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
    except OSError:
        return False  # a filesystem without attributes has no nodatacow
    finally:
        os.close(fd)
    return bool(struct.unpack("=q", flags)[0] & FS_NOCOW_FL)


def nocow_findings(pool_dir):
    """A finding per image file with nodatacow."""
    return [
        Finding(
            "nodatacow",
            f"{path} has nodatacow (chattr +C): no checksums, and clones "
            "of it cost a full copy. Make a copy without it (cp "
            "--reflink=never to a new file, then rename it into place "
            "while the qube is stopped) and clear +C on its directory "
            "('chattr -C')",
            vid,
        )
        for vid, kind, path in inspect.pool_images(pool_dir)
        if kind in _IMAGE_KINDS and nocow(path)
    ]


def fragmentation_findings(pool_dir, threshold):
    """A finding per committed image fragmented past `threshold`."""
    found = []
    for vid in defrag.committed_vids(pool_dir):
        try:
            the_plan = defrag.plan(pool_dir, vid)
        except layout.VANISHED:
            continue
        if the_plan.excess >= threshold:
            found.append(
                Finding(
                    "fragmented",
                    f"{vid} is fragmented: {the_plan.extents} extents; "
                    "clones of it (starts, spares, backups) are slow. "
                    f"Run: qubes-reflink defrag {pool_dir} {vid}",
                    vid,
                )
            )
    return found


def check(pool_dir, threshold):
    """The `Health` of the pool in `pool_dir`."""
    space = btrfs.space(pool_dir)
    findings = metadata_findings(space)
    if any(True for _ in layout.volume_dirs(pool_dir)):
        findings += nocow_findings(pool_dir)
        findings += fragmentation_findings(pool_dir, threshold)
    subvolume = btrfs.is_subvolume(pool_dir) if space is not None else None
    return Health(subvolume, space, findings)
