"""The host's view of a volume: the API qubesd calls, and nothing more.

`ReflinkVolume` adapts the host API to the volume's kind (`kinds`): it
parses what arrives as strings, checks arguments, serialises the calls on
a volume under its lock, runs the file work in a thread (so that qubesd's
event loop never waits), turns OS errors into messages that say what to do,
and tells the pool's scheduler (`background`) what happened so that the
next start finds a spare or a ready snapshot.

State lives on disk, in the file names of `layout`; the only state kept in
memory is what dies with qubesd anyway (`background.LiveState`).
"""

import asyncio
import os

from . import btrfs, fileops, guards, kinds, layout, options
from .background import locked
from .errors import storage_error
from .host import BlockDevice, StoragePoolException, Volume
from .transfer import DataTransferMixin


class ReflinkVolume(DataTransferMixin, Volume):
    """A VM volume kept as image files in a file-reflink pool."""

    def __init__(self, *, name, pool, vid, **kwargs):
        kwargs = options.parse_volume_options(kwargs)
        super().__init__(name=name, pool=pool, vid=vid, **kwargs)
        try:
            #: the paths of this volume's files
            self.files = layout.VolumeFiles(pool.root, vid)
        except layout.LayoutError as err:
            raise StoragePoolException(str(err)) from None
        self._live = pool.background.live(vid)
        self._lock = self._live.lock
        #: how this volume starts and stops (`kinds`)
        self.kind = kinds.kind_of(self)

    # -- host-facing properties -------------------------------------------

    @property
    def snapshots_disabled(self):
        """True when the running image is the only copy: the R4.2+ host's
        own rule, spelled out so that older hosts get it too."""
        return (
            self.revisions_to_keep == -1
            and not self.snap_on_start
            and self.save_on_stop
        )

    @property
    def path(self):
        """The image Xen attaches while the VM runs: in a subvolume when
        the start snapshotted one (`subvolumes`), else beside the others."""
        if btrfs.is_subvolume(self.files.running):
            return self.files.running_image
        return self.files.dirty

    def block_device(self):
        """The running image, for the host to attach through a loop device."""
        return BlockDevice(
            self.path, self.name, None, self.rw, self.domain, "disk"
        )

    def is_dirty(self):
        """Started and not yet stopped (committed)."""
        return self.save_on_stop and os.path.exists(self.files.dirty)

    def is_outdated(self):
        """True when the source committed new data since this start."""
        return self.kind.outdated()

    @property
    def revisions(self):
        """Revision id -> timestamp, oldest first."""
        return {rev.id: rev.timestamp for rev in self.files.scan().revisions}

    @property
    def size(self):
        """Size in bytes of the data the VM sees (or will see)."""
        stat_result = self._current_image()
        return self._size if stat_result is None else stat_result.st_size

    @property
    def usage(self):
        """Bytes allocated to the volume's current image."""
        stat_result = self._current_image()
        return 0 if stat_result is None else stat_result.st_blocks * 512

    def _current_image(self):
        for path in self.kind.image_paths():
            stat_result = fileops.stat_or_none(path)
            if stat_result is not None:
                return stat_result
        return None

    # -- what the kinds and the scheduler ask ---------------------------------

    @property
    def nominal_size(self):
        """The size configured (or last seen running) for a new image."""
        return self._size

    @property
    def keeps_ready_snapshots(self):
        """On btrfs, a ready snapshot of its source is made after a start."""
        return self.kind.keeps_ready_snapshots

    def start_source(self):
        """The volume whose committed data a start copies, or None."""
        return self.source if self.snap_on_start else None

    def in_use(self):
        """The exports and the import qubesd uses now: not garbage."""
        return frozenset(self._live.exports | {self._live.import_path})

    def committed_data_path(self):
        """Path of the committed data that an export or a clone reads."""
        return self.kind.data_path()

    def prepare_next_start(self, snapbase_wanted):
        """Make what the next start takes (in a thread, under the lock);
        True if it made a new snapbase."""
        return self._in_pool(self.kind.prepare, snapbase_wanted)

    # -- running file work ---------------------------------------------------

    async def _run(self, action, func, *args):
        """Run blocking file work in a thread, so qubesd's loop never waits.

        OS errors become StoragePoolException with a hint what to do.
        """
        try:
            return await asyncio.to_thread(self._in_pool, func, *args)
        except OSError as err:
            raise storage_error(f"{action} of volume {self.vid}", err) from err

    def _in_pool(self, func, *args):
        """Run `func` unless a directory of the volume (or of its source)
        leads out of the pool: the driver never follows a link out of it."""
        guards.check_inside_pool(
            self.kind.directories(), self.pool.root, self.vid
        )
        return func(*args)

    async def settle(self):
        """Wait until background work on this volume has finished."""
        await self.pool.background.settle(self.vid)

    # -- lifecycle ---------------------------------------------------------

    @locked
    async def create(self):
        """Make the volume's directory and, for an origin, an empty image.

        A snapshot volume asks its source for a spare, so that even its
        first start (a new disposable VM) is a rename.
        """
        size = options.parse_size(self._size)
        await self._run("Creating", self.kind.create, size)
        if self.start_source() is not None:
            self.pool.background.started(self)
        return self

    @locked
    async def remove(self):
        """Delete all of the volume's data, revisions included."""
        await self._run("Removing", self.kind.remove)
        self._live.import_path = None
        self.pool.forget_volume(self.vid)
        return self

    async def verify(self):
        """Check, before VM start, that the data the start needs is there."""
        return self.kind.verify()

    @locked
    async def start(self):
        """Give the VM its running image; a rename whenever a spare is fresh.

        A snapshot volume's start takes its source's spare: the source
        makes the next one in the background.
        """
        await self._run("Starting", self.kind.start)
        if self.start_source() is not None:
            self.pool.background.started(self)
        return self

    @locked
    async def stop(self):
        """Commit (origin) or discard (snapshot, volatile) the running image.

        Also the crash recovery path: qubesd calls it for every volume of a
        VM that is not running.
        """
        committed, size = await self._run("Stopping", self.kind.stop)
        if size is not None:
            self._size = size  # keep a resize for the next start
        # also what a crash left in the trash: this is the recovery path
        self.pool.trash.sweep_later(always=True)
        if committed:
            self.pool.background.committed(self)
        return self

    # -- changes -------------------------------------------------------------

    @locked
    async def resize(self, size):
        """Grow or shrink the volume, running or not.

        Shrinking cuts the data at the end: the admin client is where a
        user is warned (the next release's host no longer refuses it in
        its drivers).  A stopped volume's old committed image is kept as
        a revision, so a revert undoes a shrink; a running image is cut in
        place, and its loop device sees the new size.
        """
        size = options.parse_size(size)
        if not self.rw or size == 0:
            raise StoragePoolException(
                f"Cannot resize volume {self.vid} to {size} bytes: "
                + ("it is read-only" if not self.rw else "give more than 0")
            )
        if size != self.size:
            if await self._run("Resizing", self.kind.resize, size):
                self.pool.background.committed(self)
        self._size = size
        return self

    @locked
    async def revert(self, revision=None):
        """Make `revision` (default: the newest) the committed data.

        The current committed data becomes a revision itself, so a revert
        can be undone.  While the VM runs, the revert is recorded on disk
        and carried out by the stop: the run's data becomes the newest
        revision (`revisions`); a second request replaces the first.
        """
        if revision is not None:
            try:
                layout.check_revision_id(revision)
            except layout.LayoutError as err:
                raise StoragePoolException(str(err)) from None
        if await self._run("Reverting", self.kind.revert, revision):
            self.pool.background.committed(self)
        return self
