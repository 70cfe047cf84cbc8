"""Snapshot volumes started from btrfs subvolume snapshots.

A snapshot volume (an AppVM's root, a DispVM's root and private) starts
from its source's committed image and throws its running image away at
stop.  With reflinks, each start clones that image and each stop deletes
the clone: both walk every extent, and many starts at once queue on the
source file.  On btrfs this mechanism instead keeps, per committed
version of a source that has snapshot volumes, one read-only subvolume
``<source>.img~snapbase.<key>`` holding a reflink of that version as
``image.img`` (made once per commit, in the background, like a spare).
Each stopped snapshot volume keeps, also made in the background, a
snapshot of it, ``<vid>.img~ready.<key>``, in its own directory: a start
renames that to ``<vid>.img~running`` (a rename and a directory fsync,
like any other start, however many start at once), or, when there is
none, snapshots the snapbase right there; a stop destroys the running
subvolume.  O(1) in the image's size and in the number of VMs starting;
the cleaner's later work is proportional to what the VM changed, and
keeping a snapshot of an unchanged subvolume costs no extent.

The volume kinds (`kinds`) call `usable`, `start`, `stop`, `prepare`,
`prepare_ready`, `destroy` and `remove_all`; which subvolumes are garbage
is for `judgement` to say.  Where the pool is not on btrfs, or the
ioctls are refused (no permission, an old kernel), that is logged once
with its reason and from then on `start` returns False, the volume clones
as before, and nothing else is made.  Committed images stay plain files
at their usual names.
"""

import errno
import logging
import os

from . import btrfs, fileops, inspect, layout

log = logging.getLogger("qubes.storage.reflink")


class SubvolumeSnapshots:
    """The subvolume mechanism of one pool."""

    def __init__(self, pool):
        self.pool = pool
        #: why subvolumes can't be used here, once that is known
        self.refused = None
        self._checked = False

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
                self.pool.name,
                reason,
            )

    @property
    def usable(self):
        """Whether snapshot volumes start from subvolumes here; the first
        call looks up the pool's filesystem (one read of the mount table),
        so that no ioctl is tried, and no background work is started for
        it, where there is no btrfs."""
        if not self._checked:
            self._checked = True
            fstype = inspect.mount_of(self.pool.root)[1]
            if fstype != "btrfs":
                self.disable(f"{fstype} is not btrfs", logging.INFO)
        return self.refused is None

    def start(self, files, source, key):
        """Make `files`' running image its ready snapshot of `source`'s
        committed version `key`, else a new snapshot of that version's
        snapbase.  False when there is neither (or subvolumes can't be
        used): then the caller clones."""
        if not self.usable:
            return False
        self.stop(files)
        ready = files.ready(key)
        if btrfs.is_subvolume(ready):
            fileops.rename(ready, files.running)
            return True
        return self._snapshot(source.snapbase(key), files.running)

    def _snapshot(self, base, dst):
        """Snapshot the snapbase `base` as `dst`; False when it is gone
        (replaced by a newer version meanwhile), lies on another
        filesystem (a source in a pool elsewhere) or can't be snapshotted
        here at all."""
        if not btrfs.is_subvolume(base):
            return False
        try:
            btrfs.snapshot(base, dst)
        except FileNotFoundError:
            return False
        except OSError as err:
            if err.errno == errno.EXDEV or self._refuse(err, dst):
                return False
            raise
        return True

    def stop(self, files):
        """Destroy the running image's subvolume, if there is one."""
        if btrfs.is_subvolume(files.running):
            btrfs.destroy(files.running)

    def prepare(self, files, stat_result, wanted, listing):
        """Make the snapbase of the committed version `stat_result`, if
        snapshot volumes start from this one (`wanted`, or a snapbase of
        an older version exists in `listing`).  True if it made one: the
        ready snapshots of the older are stale now.  Those of other
        versions are garbage (`judgement`)."""
        if not (wanted or listing.snapbases) or not self.usable:
            return False
        key = layout.spare_key(stat_result)
        if key in listing.snapbases:
            return False
        return self._make_snapbase(files, key, stat_result)

    def prepare_ready(self, files, source, key):
        """Snapshot `source`'s snapbase of version `key` as `files`' ready
        subvolume, so that the next start is a rename (an atomic ioctl: it
        is complete or absent)."""
        if self.usable and not btrfs.is_subvolume(files.ready(key)):
            self._snapshot(source.snapbase(key), files.ready(key))

    def _make_snapbase(self, files, key, stat_result):
        """Fill a new subvolume with a reflink of the committed image, then
        publish it as a read-only snapshot (durable: made in a transaction
        commit), so that a snapbase is complete or absent."""
        temp = files.snaptemp()
        try:
            btrfs.create(temp)
        except OSError as err:
            if self._refuse(err, temp):
                return False
            raise
        try:
            image = os.path.join(temp, layout.SUBVOLUME_IMAGE)
            try:
                fileops.make_copy(files.committed, image, expected=stat_result)
            except fileops.SourceChanged:  # committed anew meanwhile
                return False
            btrfs.snapshot(temp, files.snapbase(key), read_only=True)
            return True
        finally:
            btrfs.destroy(temp)

    def destroy(self, paths):
        """Destroy the subvolumes `paths` (judged garbage)."""
        for path in paths:
            btrfs.destroy(path)

    def remove_all(self, files, listing):
        """Destroy every subvolume of `files`' volume (its removal)."""
        self.stop(files)
        self.destroy(
            list(listing.snapbases.values())
            + list(listing.readies.values())
            + listing.snaptemps
        )
