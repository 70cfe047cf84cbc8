"""The volume lifecycle: what each host call does to a volume's files.

State lives on disk, in the file names of `layout`; the only state kept in
memory is what dies with qubesd anyway (the lock, the exports and the
import being read or written right now, background work).

Starting a VM should cost a rename, not a clone.  So each origin volume
keeps a *spare*: a ready copy of its committed image, named after the
identity (inode, mtime, size) of that image.  A start renames a fresh spare
into place; a stale one is never used (its name no longer matches) and is
discarded.  Spares are made after an operation returns, in the background
but under the volume's lock.

Snapshot volumes (an AppVM's root, a disposable VM's volumes) keep no spare
of their own: they take their source's, and the source makes the next one.
On btrfs every reflink of an extent makes later clones and deletions of it
slower, so one spare per template version, not one per stopped AppVM, keeps
a template's updates and the background work after a burst of stops
independent of how many AppVMs use it.  A start that finds the source's
spare taken (several VMs of one template starting at once) makes one clone.
"""

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat

from . import btrfs, fileops, layout, options
from .errors import storage_error
from .host import BlockDevice, StoragePoolException, Volume, isodate

log = logging.getLogger("qubes.storage.reflink")


class LiveState:
    """What only this qubesd process knows about a vid, shared by every
    Volume object of that vid: its lock, the exports and import in use,
    and the background task preparing its spare."""

    # pylint: disable=too-few-public-methods
    def __init__(self):
        self.lock = asyncio.Lock()
        self.exports = set()
        self.import_path = None
        self.background = None
        self.spare_wanted = False
        #: snapshot volumes start from this one: keep a snapbase of it
        self.snapbase_wanted = False


def _locked(method):
    """Run `method` under the volume lock, after pending background work.

    Waiting for the background task first (outside the lock) means an
    operation never races a spare being made and, in the common case, finds
    it ready.
    """

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        await self.settle()
        try:
            async with self._lock:  # pylint: disable=protected-access
                return await method(self, *args, **kwargs)
        finally:
            self.pool.trash.sweep_later()

    return wrapper


class ReflinkVolume(Volume):
    """A VM volume kept as image files in a file-reflink pool."""

    # pylint: disable=too-many-public-methods
    def __init__(self, *, name, pool, vid, **kwargs):
        kwargs = _parse_volume_options(kwargs)
        super().__init__(name=name, pool=pool, vid=vid, **kwargs)
        try:
            self._files = layout.VolumeFiles(pool.root, vid)
        except layout.LayoutError as err:
            raise StoragePoolException(str(err)) from None
        self._live = pool.live_state(vid)
        self._lock = self._live.lock

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
        files = self._files
        if btrfs.is_subvolume(files.running):
            return files.running_image
        return files.dirty

    def block_device(self):
        """The running image, for the host to attach through a loop device."""
        return BlockDevice(
            self.path, self.name, None, self.rw, self.domain, "disk"
        )

    def is_dirty(self):
        """Started and not yet stopped (committed)."""
        return self.save_on_stop and os.path.exists(self._files.dirty)

    def is_outdated(self):
        """True when the source committed new data since this start."""
        if not self.snap_on_start:
            return False
        bases = self._files.scan().base
        source = self.source._files.committed  # pylint: disable=W0212
        current = fileops.stat_or_none(source)
        if not bases or current is None:
            return False
        key, path = next(iter(bases.items()))
        if key:
            return key != layout.spare_key(current)
        return not fileops.same_file(path, source)  # an older driver's link

    @property
    def revisions(self):
        """Revision id -> timestamp, oldest first."""
        return {rev.id: rev.timestamp for rev in self._files.scan().revisions}

    @property
    def size(self):
        """Size in bytes of the data the VM sees (or will see)."""
        for path in self._image_paths():
            stat_result = fileops.stat_or_none(path)
            if stat_result is not None:
                return stat_result.st_size
        return self._size

    @property
    def usage(self):
        """Bytes allocated to the volume's current image."""
        for path in self._image_paths():
            stat_result = fileops.stat_or_none(path)
            if stat_result is not None:
                return stat_result.st_blocks * 512
        return 0

    def _image_paths(self):
        paths = [self.path]
        if self.save_on_stop:
            paths.append(self._files.committed)
        elif self.snap_on_start:
            paths.append(self._start_files().committed)
        return paths

    # -- helpers ------------------------------------------------------------

    def _start_files(self):
        """The files of the volume whose committed image a start copies."""
        if self.snap_on_start:
            return self.source._files  # pylint: disable=protected-access
        return self._files

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
        is reached through a symbolic link: then its files would lie
        outside the pool, and the driver never follows a link out of it."""
        directories = {self._files.directory, self._start_files().directory}
        for directory in sorted(directories):
            if fileops.through_symlink(directory, self.pool.root):
                raise StoragePoolException(
                    f"Refusing to touch volume {self.vid}: {directory} "
                    "is (or lies below) a symbolic link, so it leads out of "
                    f"the pool directory {self.pool.root}; remove the link"
                )
        return func(*args)

    async def settle(self):
        """Wait until background work on this volume has finished."""
        task = self._live.background
        if task is not None and not task.done():
            await asyncio.wait([task])

    def _prepare_spare_later(self):
        """After the current operation, make what the next start takes: for
        an origin its spare; for a snapshot volume its source's spare and
        snapbase, then (btrfs) its own ready snapshot of that."""
        if self.snap_on_start:
            self.source._prepare_spare_later()  # pylint: disable=W0212
            if self.save_on_stop or not self.pool.subvolumes.usable:
                return
        self._prepare_own_later()

    def _prepare_own_later(self):
        """Start (or ask once more of) this volume's background task."""
        if self.pool.closed:
            return
        live = self._live
        live.spare_wanted = True
        if live.background is None or live.background.done():
            live.background = asyncio.get_running_loop().create_task(
                self._prepare_spare_task()
            )

    async def _prepare_spare_task(self):
        # A snapshot's start may take the spare just after this task found
        # it fresh: it asks again, and the task goes round once more.
        while self._live.spare_wanted:
            self._live.spare_wanted = False
            if self.snap_on_start:
                await self.source.settle()  # its snapbase first
            async with self._lock:
                if self.pool.closed:
                    return  # closed while this task waited for the lock
                try:
                    made = await asyncio.to_thread(
                        self._in_pool, self._prepare_spare
                    )
                except Exception as err:  # pylint: disable=W0718
                    # A spare only saves time; the next start will clone.
                    log.warning(
                        "could not prepare a spare of %s: %s", self.vid, err
                    )
                    made = False
                finally:
                    self.pool.trash.sweep_later()
            if made:
                self._renew_ready_snapshots()

    def _renew_ready_snapshots(self):
        """A new snapbase of this volume: the ready snapshots of the
        snapshot volumes started from it are of an older version now."""
        for volume in self.pool.list_volumes():
            source = getattr(volume, "source", None)
            if volume.snap_on_start and source is not None:
                if source.vid == self.vid and not volume.save_on_stop:
                    volume._prepare_own_later()  # pylint: disable=W0212

    def _prepare_spare(self):
        """Clone the committed image, unless a fresh spare of it exists
        already; discard stale spares; for a snapshot volume, make its
        ready snapshot.  Runs in a thread, under the lock.  True if it
        made a new snapbase."""
        if self.snap_on_start:
            self._prepare_ready()
            return False
        source = self._files.committed
        stat_result = fileops.stat_or_none(source)
        if stat_result is None or self.snapshots_disabled:
            return False
        # many snapshot volumes may start at once: their snapbase first
        made = self.pool.subvolumes.prepare(
            self._files, stat_result, self._live.snapbase_wanted
        )
        key = layout.spare_key(stat_result)
        spares = self._files.scan().spares
        self.pool.trash.discard(p for k, p in spares.items() if k != key)
        if key not in spares:
            with contextlib.suppress(fileops.SourceChanged):
                fileops.publish_copy(
                    source,
                    self._files.spare(key),
                    self._files.temp(),
                    expected=stat_result,
                )
        return made

    def _prepare_ready(self):
        """A ready snapshot of the source's current snapbase (btrfs)."""
        source = self._start_files()
        current = fileops.stat_or_none(source.committed)
        if current is not None:
            self.pool.subvolumes.prepare_ready(
                self._files, source, layout.spare_key(current)
            )

    def _take_spare(self, files, key):
        """Rename the spare of version `key` found in `files`' directory to
        this volume's running image; False if there is none (another start
        took it first, or a power cut left it linked to another image)."""
        spare = files.spare(key)
        if _linked_elsewhere(spare):
            self.pool.trash.discard([spare])
            return False
        _check_own_image(spare)
        try:
            fileops.rename(files.spare(key), self._files.dirty)
        except FileNotFoundError:
            return False
        except OSError as err:
            if err.errno != errno.EXDEV:  # a source in a pool elsewhere
                raise
            return False
        return True

    def _remove_stale(self, listing):
        """Remove what an interrupted operation or a crash left behind.

        Runs under the lock, so no operation of this volume is writing a
        temporary file; exports and imports still in use are kept.
        """
        stale = list(listing.temps)
        stale += [p for p in listing.exports if p not in self._live.exports]
        stale += [p for p in listing.imports if p != self._live.import_path]
        if not (listing.dirty or listing.running):
            stale += listing.base.values()
        # a snapshot volume keeps no spare: any is left by an older version
        committed = None if self.snap_on_start else self._files.committed
        current = fileops.stat_or_none(committed) if committed else None
        fresh = layout.spare_key(current) if current else None
        stale += [
            path
            for key, path in listing.spares.items()
            if key != fresh or _linked_elsewhere(path)
        ]
        if listing.snapbases or listing.snaptemps or listing.readies:
            # snapbases are of this volume's versions, ready snapshots of
            # its source's
            source = fileops.stat_or_none(self._start_files().committed)
            self.pool.subvolumes.remove_stale(
                self._files, layout.spare_key(source) if source else None
            )
        # a stale spare may have many extents: its deletion is background
        self.pool.trash.discard(stale)

    def committed_data_path(self):
        """Path of the committed data that an export or a clone reads."""
        if not self.save_on_stop and not self.snap_on_start:
            raise StoragePoolException(
                f"Volume {self.vid} is volatile: it has no data to export"
            )
        files = self._files if self.save_on_stop else self._start_files()
        path = files.committed
        if not os.path.exists(path):
            raise StoragePoolException(
                f"Volume {self.vid} has no committed image {path}: it is "
                "either running with snapshots disabled (revisions_to_keep "
                "-1; stop its VM first) or missing"
            )
        return path

    def _refuse_if_running(self, action):
        if os.path.exists(self._files.dirty):
            raise StoragePoolException(
                f"Cannot {action} volume {self.vid} while its VM is running "
                "(or was running when dom0 lost power): shut the VM down "
                "first"
            )

    def _commit(self, new_image):
        """Make `new_image` the committed image, durably and atomically.

        The previous committed image becomes the newest revision by a hard
        link (no copy), so at every instant the volume has committed data;
        revisions beyond revisions_to_keep are pruned afterwards.
        """
        fileops.fsync_file(new_image)
        files = self._files
        revisions = files.scan().revisions
        current = fileops.stat_or_none(files.committed)
        if (
            self.revisions_to_keep > 0
            and current is not None
            and not any(
                fileops.same_file(r.path, files.committed) for r in revisions
            )
        ):
            number = max((r.number for r in revisions), default=0) + 1
            stamp = isodate(int(current.st_mtime))
            # made durable by the rename's directory fsync below
            fileops.link(
                files.committed, files.revision(number, stamp), durable=False
            )
        fileops.rename(new_image, files.committed)
        self._prune(max(self.revisions_to_keep, 0))
        # copies of the image just replaced: taken away with the pruned
        # revisions, so that one sweep deletes both
        self.pool.trash.discard(files.scan().spares.values())

    def _prune(self, keep):
        revisions = self._files.scan().revisions
        excess = revisions[: max(len(revisions) - keep, 0)]
        self.pool.trash.discard(rev.path for rev in excess)

    # -- lifecycle ---------------------------------------------------------

    @_locked
    async def create(self):
        """Make the volume's directory and, for an origin, an empty image.

        A snapshot volume asks its source for a spare, so that even its
        first start (a new disposable VM) is a rename.
        """
        size = options.parse_size(self._size)
        await self._run("Creating", self._create, size)
        if self.snap_on_start:
            self._want_snapbase()
            self._prepare_spare_later()
        return self

    def _create(self, size):
        if not os.path.isdir(self.pool.root):
            raise StoragePoolException(
                f"Pool directory {self.pool.root} does not exist: is its "
                "filesystem mounted?"
            )
        fileops.make_dirs(self._files.directory)
        if self.save_on_stop and not self.snap_on_start:
            listing = self._files.scan()
            fileops.publish_sparse(
                self._files.committed, self._files.temp(), size
            )
            self._remove_stale(listing)
            fileops.remove_files(
                [self._files.dirty] + [r.path for r in listing.revisions]
            )

    @_locked
    async def remove(self):
        """Delete all of the volume's data, revisions included."""
        await self._run("Removing", self._remove)
        self._live.import_path = None
        self.pool.forget_volume(self.vid)
        return self

    def _remove(self):
        files = self._files
        listing = files.scan()
        self._remove_stale(listing)
        self.pool.subvolumes.remove_all(files)
        self.pool.trash.discard(
            [files.dirty]
            + list(files.scan().base.values())
            + list(listing.spares.values())
            + list(listing.imports)  # an import in progress ends with us
            + [rev.path for rev in listing.revisions]
            + [files.committed]
        )
        fileops.remove_empty_dirs([files.directory])

    async def verify(self):
        """Check, before VM start, that the data the start needs is there."""
        if not self.save_on_stop and not self.snap_on_start:
            return True
        needed = self._start_files().committed
        if os.path.exists(needed) or (
            self.save_on_stop and os.path.exists(self._files.dirty)
        ):
            return True
        raise self._no_start_data(needed)

    def _no_start_data(self, needed):
        """The error for a start without committed data to start from.

        A source running with snapshots disabled has none until its VM
        stops; R4.3's host refuses such a start itself, R4.2's does not.
        """
        source = self.source if self.snap_on_start else None
        if source is not None and source.snapshots_disabled:
            return StoragePoolException(
                f"Cannot start volume {self.vid}: its source {source.vid} is "
                "running with snapshots disabled (revisions_to_keep -1), so "
                "it has no committed data to start from; shut down the VM "
                "of the source first"
            )
        return StoragePoolException(
            f"Missing image file {needed} for volume {self.vid}"
        )

    @_locked
    async def start(self):
        """Give the VM its running image; a rename whenever a spare is fresh.

        A snapshot volume's start takes its source's spare: the source
        makes the next one in the background.
        """
        await self._run("Starting", self._start)
        if self.snap_on_start:
            self._want_snapbase()
            self._prepare_spare_later()
        return self

    def _want_snapbase(self):
        """Tell the source that this snapshot volume starts from it, so
        that it keeps a snapbase of each of its versions."""
        if not self.save_on_stop:
            # pylint: disable-next=protected-access
            self.source._live.snapbase_wanted = True

    def _start(self):
        self._remove_stale(self._files.scan())
        if self.snap_on_start:
            self._start_from_source()
        elif self.save_on_stop:
            self._start_origin()
        else:
            self._start_volatile()

    def _start_origin(self):
        files = self._files
        if os.path.exists(files.dirty):
            _check_own_image(files.dirty)
            log.warning(
                "%s: keeping its running image from before dom0 stopped "
                "uncleanly: %s",
                self.vid,
                files.dirty,
            )
            return
        if self.snapshots_disabled:
            self._prune(0)
            fileops.rename(files.committed, files.dirty)
            return
        key = layout.spare_key(os.stat(files.committed))
        if not self._take_spare(files, key):
            fileops.publish_copy(files.committed, files.dirty, files.temp())

    def _start_from_source(self):
        """Start from the source's committed data (never its running image).

        A marker (`layout.VolumeFiles.base_marker`) names the version
        started from: is_outdated compares it with the source's.  On btrfs
        that version's snapbase is snapshotted; else the source's spare of
        it is taken by a rename, and when another start took it first, the
        start makes one clone, of that version only.
        """
        files, source = self._files, self._start_files()
        self.pool.subvolumes.stop(files)  # left by a crash
        if os.path.exists(files.dirty):
            if self.save_on_stop:
                _check_own_image(files.dirty)
                log.warning("%s: keeping its unsaved running image", self.vid)
                return
            fileops.remove_files([files.dirty])
        current = fileops.stat_or_none(source.committed)
        if current is None:
            raise self._no_start_data(source.committed)
        fileops.remove_files(files.scan().base.values())
        key = layout.spare_key(current)
        # made durable by the directory fsync of the rename (or published
        # copy) to the running image below, in the same directory, or by
        # the snapshot's transaction commit
        fileops.make_sparse(files.base_marker(key), 0)
        if not self.save_on_stop and self.pool.subvolumes.start(
            files, source, key
        ):
            return
        if self._take_spare(source, key):
            return
        try:
            fileops.publish_copy(
                source.committed, files.dirty, files.temp(), expected=current
            )
        except fileops.SourceChanged:
            raise StoragePoolException(
                f"Cannot start volume {self.vid}: its source {source.vid} "
                "committed new data while it started; start it again"
            ) from None

    def _start_volatile(self):
        fileops.remove_files([self._files.dirty])
        fileops.publish_sparse(
            self._files.dirty, self._files.temp(), self._size
        )

    @_locked
    async def stop(self):
        """Commit (origin) or discard (snapshot, volatile) the running image.

        Also the crash recovery path: qubesd calls it for every volume of a
        VM that is not running.
        """
        committed = await self._run("Stopping", self._stop)
        # also what a crash left in the trash: this is the recovery path
        self.pool.trash.sweep_later(always=True)
        if committed:
            self._prepare_spare_later()
        return self

    def _stop(self):
        files = self._files
        self._remove_stale(files.scan())
        bases = list(files.scan().base.values())
        if not self.save_on_stop:
            self.pool.subvolumes.stop(files)
            running = fileops.stat_or_none(files.dirty)
            if running is not None and not self.snap_on_start:
                self._size = running.st_size  # keep a resize for next start
            self.pool.trash.discard([files.dirty] + bases)
            return False
        if not os.path.exists(files.dirty):
            return False
        if self.snapshots_disabled:
            fileops.publish(files.dirty, files.committed)
            self._prune(0)
        else:
            self._commit(files.dirty)
        fileops.remove_files(bases)
        return True

    # -- data in and out -----------------------------------------------------

    @_locked
    async def export(self):
        """A fresh snapshot of the committed data, valid until export_end.

        It is a clone of its own, so a commit, revert or removal while a
        backup reads it changes nothing in it.
        """
        path = await self._run("Exporting", self._export)
        self._live.exports.add(path)
        return path

    def _export(self):
        path = self._files.export()
        fileops.make_copy(self.committed_data_path(), path)
        return path

    async def export_end(self, path):
        """Remove the snapshot that export() returned."""
        if path not in self._live.exports:
            raise StoragePoolException(
                f"{path!r} is not an export of volume {self.vid} in use"
            )
        self._live.exports.discard(path)
        try:
            await self._run("Ending export", self.pool.trash.discard, [path])
        finally:
            self.pool.trash.sweep_later()

    @_locked
    async def import_data(self, size):
        """A new empty image of `size` bytes for the caller to fill."""
        size = options.parse_size(size)
        if size == 0:
            raise StoragePoolException(
                f"Cannot import into volume {self.vid}: the size of the "
                "new data must be more than 0 bytes"
            )
        self._check_importable()
        if self._live.import_path is not None:
            raise StoragePoolException(
                f"An import into volume {self.vid} is already in progress"
            )
        path = await self._run("Importing", self._import_data, size)
        self._live.import_path = path
        return path

    def _check_importable(self):
        if not self.save_on_stop:
            raise StoragePoolException(
                f"Cannot import into volume {self.vid}: it keeps no data "
                "of its own (not save_on_stop)"
            )
        self._refuse_if_running("import into")

    def _import_data(self, size):
        fileops.make_dirs(self._files.directory)
        path = self._files.import_target()
        fileops.make_sparse(path, size)
        return path

    @_locked
    async def import_data_end(self, success):
        """Commit the imported image, or throw it away."""
        path, self._live.import_path = self._live.import_path, None
        if path is None:
            raise StoragePoolException(
                f"No import into volume {self.vid} is in progress"
            )
        if success:
            await self._run("Committing the import", self._commit_or_drop, path)
            self._prepare_spare_later()
        else:
            await self._run(
                "Discarding the import", fileops.remove_files, [path]
            )
        return self

    def _commit_or_drop(self, path):
        try:
            self._commit(path)
        finally:
            fileops.remove_files([path])

    @_locked
    async def import_volume(self, src_volume):
        """Replace this volume's data with a copy of `src_volume`'s.

        A source on the same filesystem is reflinked straight from its
        committed image; any other is read through its export().
        """
        if not self.save_on_stop:
            return self
        self._check_importable()
        if self._can_read_directly(src_volume):
            await self._run(
                "Cloning", self._import_from, src_volume.committed_data_path()
            )
        else:
            path = await src_volume.export()
            try:
                await self._run("Copying", self._import_from, path)
            finally:
                await src_volume.export_end(path)
        self._prepare_spare_later()
        return self

    def _can_read_directly(self, src_volume):
        if not isinstance(src_volume, ReflinkVolume):
            return False
        # pylint: disable=protected-access
        here = fileops.stat_or_none(self.pool.root)
        there = fileops.stat_or_none(src_volume.pool.root)
        return here and there and here.st_dev == there.st_dev

    def _import_from(self, src):
        fileops.make_dirs(self._files.directory)
        tmp = self._files.temp()
        fileops.make_copy(src, tmp)
        self._commit_or_drop(tmp)

    # -- changes -------------------------------------------------------------

    @_locked
    async def resize(self, size):
        """Grow the volume, running or not; shrinking is refused."""
        size = options.parse_size(size)
        if not self.rw:
            raise StoragePoolException(
                f"Cannot resize volume {self.vid}: it is read-only"
            )
        current = self.size
        if size < current:
            raise StoragePoolException(
                f"Cannot shrink volume {self.vid} from {current} to {size} "
                "bytes: shrinking would destroy data at its end; shrink the "
                "filesystem inside the VM and copy it to a new volume instead"
            )
        if size > current:
            prepare = await self._run("Resizing", self._resize, size)
            if prepare:
                self._prepare_spare_later()
        self._size = size
        return self

    def _resize(self, size):
        files, running = self._files, self.path
        if os.path.exists(running):
            _check_own_image(running)
            fileops.grow(running, size)
            fileops.refresh_loop_devices(running)
            return False
        if self.save_on_stop and os.path.exists(files.committed):
            # committed data is never changed in place: grow a copy
            fileops.publish_copy(
                files.committed, files.committed, files.temp(), size=size
            )
            return True
        return False

    @_locked
    async def revert(self, revision=None):
        """Make `revision` (default: the newest) the committed data.

        The current committed data becomes a revision itself, so a revert
        can be undone.
        """
        if revision is not None:
            try:
                layout.check_revision_id(revision)
            except layout.LayoutError as err:
                raise StoragePoolException(str(err)) from None
        await self._run("Reverting", self._revert, revision)
        self._prepare_spare_later()
        return self

    def _revert(self, revision):
        self._refuse_if_running("revert")
        revisions = self._files.scan().revisions
        if revision is None:
            chosen = revisions[-1:]
        else:
            chosen = [rev for rev in revisions if rev.id == revision]
        if len(chosen) != 1:
            known = ", ".join(rev.id for rev in revisions) or "none"
            problem = "ambiguous" if chosen else "unknown"
            raise StoragePoolException(
                f"Cannot revert volume {self.vid}: {problem} revision "
                f"{revision!r} (revisions: {known})"
            )
        self._commit(chosen[0].path)


def _linked_elsewhere(spare):
    """Whether `spare` is a regular file with another name too.

    A power cut during a start that renamed a spare into a VM's directory
    can leave it under both names on btrfs (docs/DESIGN.md): then it is
    that VM's image, whatever it holds now, and no spare any more.
    """
    stat_result = fileops.stat_or_none(spare)
    return (
        stat_result is not None
        and stat.S_ISREG(stat_result.st_mode)
        and stat_result.st_nlink > 1
    )


def _check_own_image(path):
    """Refuse a link planted where an image that a VM writes to goes.

    The driver's running images and spares are regular files with one
    name; a symbolic or hard link there would let the VM, or a resize,
    write into a file outside the pool.
    """
    stat_result = fileops.stat_or_none(path)
    if stat_result is not None and (
        not stat.S_ISREG(stat_result.st_mode) or stat_result.st_nlink != 1
    ):
        raise StoragePoolException(
            f"{path} is a symbolic link, a hard link or no regular file, "
            "where the driver expects an image file of its own: it will "
            "not attach or change it; move it away and try again"
        )


_VOLUME_BOOLS = ("rw", "save_on_stop", "snap_on_start")


def _parse_volume_options(kwargs):
    """Volume options from qubes.xml arrive as strings: convert them."""
    parsed = dict(kwargs)
    for option in _VOLUME_BOOLS:
        if option in parsed:
            parsed[option] = options.parse_bool(parsed[option], option)
    if parsed.get("ephemeral") is not None:
        parsed["ephemeral"] = options.parse_bool(
            parsed["ephemeral"], "ephemeral"
        )
    if "revisions_to_keep" in parsed:
        parsed["revisions_to_keep"] = options.parse_revisions_to_keep(
            parsed["revisions_to_keep"]
        )
    if "size" in parsed:
        parsed["size"] = options.parse_size(parsed["size"])
    return parsed
