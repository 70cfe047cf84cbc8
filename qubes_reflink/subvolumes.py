"""Snapshot volumes started from btrfs subvolume snapshots.

A snapshot volume (an AppVM's root, a DispVM's root and private) starts
from its source's committed image and throws its running image away at
stop.  With reflinks, each start clones that image and each stop deletes
the clone: both walk every extent, and many starts at once queue on the
source file.  On btrfs this mechanism instead keeps, per committed
version of a source that has snapshot volumes, one read-only subvolume
``<source>.img~snapbase.<key>`` holding a reflink of that version as
``image.img`` (made once per commit, in the background, like a spare);
a start is one snapshot of it as ``<vid>.img~running`` in the volume's
own directory, and a stop destroys that subvolume: O(1) in the image's
size and in the number of VMs starting, the cleaner's later work
proportional to what the VM changed.

The volume calls `start`, `stop`, `want`, `prepare`, `remove_stale` and
`remove_all`; where the ioctls are refused (not btrfs, no permission, an
old kernel) the first refusal is logged with its reason and from then on
`start` returns False, the volume clones as before, and nothing else is
made.  Committed images stay plain files at their usual names.
"""

import errno
import logging
import os

from . import btrfs, fileops, layout

log = logging.getLogger("qubes.storage.reflink")


class SubvolumeSnapshots:
    """The subvolume mechanism of one pool."""

    def __init__(self, pool_name):
        self.pool_name = pool_name
        #: why the ioctls can't be used here, once one was refused
        self.refused = None

    def _refuse(self, err, path):
        """Give up on subvolumes for this pool if `err` says they can't
        work here; True if it did."""
        if err.errno not in btrfs.UNSUPPORTED:
            return False
        # expected on XFS and ext4 (ENOTTY), a surprise on btrfs
        level = logging.INFO if err.errno == errno.ENOTTY else logging.WARNING
        self.disable(f"{err.strerror} ({path})", level)
        return True

    def disable(self, reason, level=logging.WARNING):
        """Start snapshot volumes from reflink clones from now on (as where
        the ioctls are refused; the benchmarks' baseline); logged once."""
        if self.refused is None:
            self.refused = reason
            log.log(
                level,
                "pool %s: btrfs subvolume snapshots are not available: %s; "
                "snapshot volumes start from reflink clones instead",
                self.pool_name,
                reason,
            )

    def start(self, files, source, key):
        """Make `files`' running image a snapshot of the snapbase of
        `source`'s committed version `key`.  False when there is none
        (or subvolumes can't be used): then the caller clones."""
        if self.refused is not None:
            return False
        self.stop(files)
        base = source.snapbase(key)
        if not btrfs.is_subvolume(base):
            return False
        try:
            btrfs.snapshot(base, files.running)
        except FileNotFoundError:  # replaced by a newer version meanwhile
            return False
        except OSError as err:
            if self._refuse(err, files.running):
                return False
            raise
        return True

    def stop(self, files):
        """Destroy the running image's subvolume, if there is one."""
        if btrfs.is_subvolume(files.running):
            btrfs.destroy(files.running)

    def prepare(self, files, stat_result, wanted):
        """Make the snapbase of the committed version `stat_result`, if
        snapshot volumes start from this one (`wanted`, or a snapbase of
        an older version exists), and destroy the older ones."""
        listing = files.scan()
        if self.refused is not None or not (wanted or listing.snapbases):
            return
        key = layout.spare_key(stat_result)
        if key not in listing.snapbases:
            self._make_snapbase(files, key, stat_result)
        self.remove_stale(files, key)

    def _make_snapbase(self, files, key, stat_result):
        """Fill a new subvolume with a reflink of the committed image, then
        publish it as a read-only snapshot (durable: made in a transaction
        commit), so that a snapbase is complete or absent."""
        temp = files.snaptemp()
        try:
            btrfs.create(temp)
        except OSError as err:
            if self._refuse(err, temp):
                return
            raise
        try:
            image = os.path.join(temp, layout.SUBVOLUME_IMAGE)
            try:
                fileops.make_copy(files.committed, image, expected=stat_result)
            except fileops.SourceChanged:  # committed anew meanwhile
                return
            btrfs.snapshot(temp, files.snapbase(key), read_only=True)
        finally:
            btrfs.destroy(temp)

    def remove_stale(self, files, fresh_key):
        """Destroy subvolumes of `files`' volume that no start will use:
        snapbases of other versions than `fresh_key` (None: all) and
        unfinished ones."""
        listing = files.scan()
        stale = [p for k, p in listing.snapbases.items() if k != fresh_key]
        for path in stale + listing.snaptemps:
            btrfs.destroy(path)

    def remove_all(self, files):
        """Destroy every subvolume of `files`' volume (its removal)."""
        self.stop(files)
        self.remove_stale(files, None)
