"""The file-reflink pool: options, set-up, and the volumes it holds."""

import asyncio
import functools
import importlib.metadata
import os

from . import btrfs, fileops, layout, options, settings
from .errors import storage_error
from .host import Pool, StoragePoolException
from .background import Background
from .subvolumes import SubvolumeSnapshots
from .trash import Trash
from .volume import ReflinkVolume

DEFAULT_DRIVER_NAME = "file-reflink"
#: An image this many extents beyond its contiguous pieces clones in
#: about 20 ms on btrfs, 40 ms on XFS (9 and 20 us per extent in the
#: aging benchmark; a fresh 1 GiB image: well under 1 ms).
DEFAULT_DEFRAG_THRESHOLD = 2048
DEFAULT_DEFRAG_INTERVAL = 86400

NO_REFLINK_MESSAGE = (
    "The filesystem of {dir_path!r} does not support reflinks (btrfs and "
    "XFS do). Without them every VM start, stop and clone copies whole "
    "images: slow, and each copy takes its full space on disk. To use it "
    "anyway, add the pool with the option '-o setup_check=no'."
)


@functools.cache
def driver_name():
    """The name under which this installation registered the driver.

    ``file-reflink`` normally; a dom0 package may register it under another
    name beside the core's own file-reflink (see README), and qubes.xml must
    then record that name.
    """
    target = f"{ReflinkPool.__module__}:{ReflinkPool.__qualname__}"
    for entry_point in importlib.metadata.entry_points(group="qubes.storage"):
        if entry_point.value == target:
            return entry_point.name
    return DEFAULT_DRIVER_NAME


class ReflinkPool(Pool):
    """A directory on a reflink filesystem holding VM images as files."""

    def __new__(cls, *args, **kwargs):
        """Refuse a pool without dir_path with a message that says what to
        give: R4.2's admin.pool.Add passes only the options a user gave,
        and Python's own TypeError would reach the user instead.  (Only
        `__init__`'s signature is what the host reads for the options.)"""
        if "dir_path" not in kwargs:
            name = kwargs.get("name", "NAME")
            raise StoragePoolException(
                f"Pool {name!r} needs the option dir_path, the directory "
                "that holds its images: qvm-pool add "
                f"{name} {driver_name()} -o dir_path=/var/lib/qubes/{name}"
            )
        return super().__new__(cls)

    def __init__(
        self,
        *,
        name,
        dir_path,
        revisions_to_keep=1,
        setup_check=True,
        ephemeral_volatile=False,
        keep_revision_older_than=0,
        auto_defrag=True,
        defrag_threshold=DEFAULT_DEFRAG_THRESHOLD,
        defrag_interval=DEFAULT_DEFRAG_INTERVAL,
    ):
        # pylint: disable=too-many-arguments
        super().__init__(
            name=name,
            revisions_to_keep=options.parse_revisions_to_keep(
                revisions_to_keep
            ),
            ephemeral_volatile=options.parse_bool(
                ephemeral_volatile, "ephemeral_volatile"
            ),
        )
        self.dir_path = options.parse_dir_path(dir_path)
        self.setup_check = options.parse_bool(setup_check, "setup_check")
        #: the options settings.PARSERS knows, as qubes.xml gave them
        self._given = {
            key: settings.PARSERS[key](value)
            for key, value in (
                (settings.KEEP_REVISION_OLDER_THAN, keep_revision_older_than),
                (settings.AUTO_DEFRAG, auto_defrag),
                (settings.DEFRAG_THRESHOLD, defrag_threshold),
                (settings.DEFRAG_INTERVAL, defrag_interval),
            )
        }
        #: dir_path with symbolic links resolved: where the files really are
        self.root = os.path.realpath(self.dir_path)
        self._volumes = {}
        #: where stops put the images they discard, emptied in the background
        self.trash = Trash(self)
        #: how snapshot volumes start on btrfs (falls back to clones)
        self.subvolumes = SubvolumeSnapshots(self)
        #: what the next starts take, prepared after each operation
        self.background = Background(self)

    @property
    def driver(self):
        """The driver name qubes.xml records for this pool."""
        return driver_name()

    @property
    def config(self):
        """The pool's settings as qubes.xml stores them.

        The booleans are given as the strings "True"/"False": R4.2's host
        leaves a False bool out of qubes.xml, so ``setup_check=False`` would
        come back as its default, True, after a qubesd restart.
        """
        return {
            "name": self.name,
            "driver": self.driver,
            "dir_path": self.dir_path,
            "revisions_to_keep": self.revisions_to_keep,
            "setup_check": str(self.setup_check),
            "ephemeral_volatile": str(self.ephemeral_volatile),
            "keep_revision_older_than": self.keep_revision_older_than,
            "auto_defrag": str(self.auto_defrag),
            "defrag_threshold": self.defrag_threshold,
            "defrag_interval": self.defrag_interval,
        }

    def _setting(self, key):
        """The value of a setting ``qubes-reflink set`` may have changed
        while qubesd runs (`settings`): that wins over qubes.xml's."""
        return settings.load(self.root).get(key, self._given[key])

    @property
    def keep_revision_older_than(self):
        """Seconds: pruning keeps the newest revision at least that old
        (0: off)."""
        return self._setting(settings.KEEP_REVISION_OLDER_THAN)

    @property
    def auto_defrag(self):
        """Whether committed images are defragmented in the background
        after a stop (see `autodefrag`)."""
        return self._setting(settings.AUTO_DEFRAG)

    @property
    def defrag_threshold(self):
        """Extents beyond its contiguous pieces that make a committed
        image worth defragmenting (also what ``qubes-reflink check``
        calls fragmented)."""
        return self._setting(settings.DEFRAG_THRESHOLD)

    @property
    def defrag_interval(self):
        """Seconds: a volume defragmented less long ago is not again."""
        return self._setting(settings.DEFRAG_INTERVAL)

    async def setup(self):
        """Create the pool directory and check that it can reflink."""
        try:
            await asyncio.to_thread(self._setup)
        except OSError as err:
            raise storage_error(f"Setting up pool {self.name}", err) from err
        return self

    def _setup(self):
        if os.path.lexists(self.dir_path) and not os.path.isdir(self.dir_path):
            raise StoragePoolException(
                f"dir_path {self.dir_path!r} exists and is not a directory: "
                "give the path of a directory (it is created if missing)"
            )
        try:
            created = self._make_pool_dir()
        except (FileExistsError, NotADirectoryError) as err:
            raise StoragePoolException(
                f"dir_path {self.dir_path!r} can't be created: "
                f"{err.filename} is not a directory; give the path of a "
                "directory (it is created if missing)"
            ) from None
        try:
            self.root = os.path.realpath(self.dir_path)
            fileops.remove_files(layout.probe_leftovers(self.root))
            probes = (
                layout.probe_path(self.root),
                layout.probe_path(self.root),
            )
            if not fileops.can_reflink(*probes) and self.setup_check:
                raise StoragePoolException(
                    NO_REFLINK_MESSAGE.format(dir_path=self.dir_path)
                )
            for directory in layout.prefix_dirs(self.root):
                fileops.make_dirs(directory)
        except BaseException:
            fileops.remove_empty_dirs(reversed(created))
            raise

    def _make_pool_dir(self):
        """Make dir_path and its missing parents; those made.  On btrfs a
        new dir_path is a subvolume of its own, which backup tools (Wyng,
        btrfs send) can snapshot alone (qubes-issues 9825, 10289)."""
        parent = os.path.dirname(self.dir_path)
        created = fileops.make_dirs(parent)
        if os.path.isdir(self.dir_path):
            return created
        try:
            btrfs.create(self.dir_path)
        except OSError as err:
            if err.errno not in btrfs.UNSUPPORTED:
                raise
            return created + fileops.make_dirs(self.dir_path)
        fileops.fsync_dir(parent)
        return created + [self.dir_path]

    async def destroy(self):
        """Forget the pool; its directory and any files stay on disk."""
        await self.wait_background()

    async def wait_background(self):
        """Wait until no volume of this pool is preparing a spare, and the
        trash is empty."""
        await self.wait_spares()
        await self.trash.wait()

    async def close(self):
        """End the pool's background work, for a host that stops: after
        this no task of the pool is left on the event loop.

        Volume operations still work, but start no background work (a
        start then clones).  A spare being cloned is finished, as a clone
        in a thread can't be interrupted and half a spare is only a
        temporary file; one not begun is not made.  The trash sweep ends
        after the file at hand (see `Trash.close`).  The host's stop of
        each volume at its next start makes what was left undone.
        """
        self.background.closed = True
        await self.background.defrags.close()
        await self.trash.close()
        await self.wait_spares()

    async def wait_spares(self):
        """Wait until no volume of this pool is preparing a spare: each
        next start then finds its spare ready (the trash may still be
        swept)."""
        await self.background.wait()

    def init_volume(self, vm, volume_config):
        """The Volume object for a VM's volume; touches nothing on disk."""
        prefix = getattr(vm, "dir_path_prefix", None)
        if prefix not in layout.DIR_PREFIXES:
            raise StoragePoolException(
                f"Refusing volume {volume_config.get('name')!r} of VM "
                f"{getattr(vm, 'name', vm)!r}: its directory prefix "
                f"{prefix!r} is none of {', '.join(layout.DIR_PREFIXES)}, "
                "so its loop devices would not be hidden from other qubes"
            )
        config = dict(volume_config)
        config.setdefault("revisions_to_keep", self.revisions_to_keep)
        try:
            if not config.get("vid"):
                config["vid"] = layout.make_vid(prefix, vm.name, config["name"])
            layout.check_vid(config["vid"])
        except layout.LayoutError as err:
            raise StoragePoolException(str(err)) from None
        config["pool"] = self
        volume = ReflinkVolume(**config)
        self._volumes[volume.vid] = volume
        self.background.register(volume)
        return volume

    def forget_volume(self, vid):
        """Drop a removed volume from list_volumes()."""
        self._volumes.pop(vid, None)
        self.background.forget(vid)

    def list_volumes(self):
        """The volumes initialised in this pool."""
        return list(self._volumes.values())

    def get_volume(self, vid):
        """The volume `vid`; KeyError if this pool has none of that id."""
        return self._volumes[vid]

    def _filesystem_usage(self):
        """(size, used) of the pool's filesystem; Nones if it is missing
        (an unmounted pool must not break qvm-pool or the disk widget)."""
        try:
            return fileops.filesystem_usage(self.root)
        except OSError:
            return None, None

    @property
    def size(self):
        """Size in bytes of the filesystem holding the pool."""
        return self._filesystem_usage()[0]

    @property
    def usage(self):
        """Bytes in use on the filesystem holding the pool."""
        return self._filesystem_usage()[1]

    @property
    def usage_details(self):
        """data_size and data_usage (the filesystem's), and on btrfs
        metadata_size and metadata_usage (from its space info): a btrfs
        is full when its metadata is, whatever data space is left, and
        the disk space widget shows them as it does for LVM thin pools."""
        details = {}
        size, usage = self._filesystem_usage()
        if size is not None:
            details["data_size"] = size
            details["data_usage"] = usage
        try:
            space = btrfs.space(self.root)
        except OSError:
            space = None
        if space is not None:
            details["metadata_size"] = space.metadata_size
            details["metadata_usage"] = space.metadata_usage
        return details

    def included_in(self, app):
        """The pool whose directory contains this one's, if any."""
        containing = []
        for pool in app.pools.values():
            other = getattr(pool, "dir_path", None)
            if pool is self or not isinstance(other, str):
                continue
            other = os.path.realpath(other)
            if os.path.commonpath([other, self.root]) == other:
                containing.append((len(other), pool))
        return (
            max(containing, key=lambda item: item[0])[1] if containing else None
        )
