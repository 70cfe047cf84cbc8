"""The kinds of volume: how each is created, started, stopped, prepared.

A volume's kind follows from `snap_on_start` and `save_on_stop` and is
chosen once, when the volume object is made (`kind_of`):

| kind | starts from | at stop |
|---|---|---|
| `Origin` | its own committed image (a spare, renamed) | commits |
| `Snapshot` | its source's committed image | discards |
| `SavedSnapshot` | its source's committed image | commits |
| `Volatile` | an empty image | discards |

Every method runs in a worker thread, under the volume's lock (see
`volume`), and reads the volume's directory once, and again only after it
changed it.  What is garbage there is for `judgement` to say; names come
from `layout`, changes to files from `fileops` (and `btrfs`, through
`subvolumes`).
"""

import logging
import os

from . import fileops, guards, judgement, layout, spares
from .host import StoragePoolException
from .revisions import Policy, Revisions

log = logging.getLogger("qubes.storage.reflink")

#: Snapshots disabled: no revision is kept (pinned ones excepted).
NO_REVISIONS = Policy(keep=0)


class Kind:
    """What all kinds share: cleanup, growth, commits and reverts."""

    #: the running image becomes the committed data at stop
    saves = False
    #: on btrfs, keeps a ready snapshot of its source's snapbase
    keeps_ready_snapshots = False

    def __init__(self, volume):
        self.volume = volume
        self.files = volume.files
        self.pool = volume.pool
        self.revisions = Revisions(self.files, self.pool.trash)

    def source_files(self):
        """The files of the volume whose committed image a start copies."""
        return self.files

    def directories(self):
        """The directories this kind's operations touch."""
        return [self.files.directory, self.source_files().directory]

    def image_paths(self):
        """Where the data the VM sees lies, most current first."""
        return [self.volume.path, self.source_files().committed]

    def data_path(self):
        """The committed data an export or a clone reads."""
        return self.existing_committed(self.source_files().committed)

    def existing_committed(self, path):
        """`path`, a committed image, if it exists; else say why not."""
        if not os.path.exists(path):
            raise StoragePoolException(
                f"Volume {self.volume.vid} has no committed image {path}: it "
                "is either running with snapshots disabled (revisions_to_keep "
                "-1; stop its VM first) or missing"
            )
        return path

    def verify(self):
        """True if the data a start needs is there, else raise."""
        needed = self.source_files().committed
        if os.path.exists(needed) or (
            self.saves and os.path.exists(self.files.dirty)
        ):
            return True
        raise self.no_start_data(needed)

    def no_start_data(self, needed):
        """The error for a start without committed data to start from."""
        return StoragePoolException(
            f"Missing image file {needed} for volume {self.volume.vid}"
        )

    def create(self, size):
        """Make the volume's directory (`size`: for an origin's image)."""
        del size  # only an origin makes an image at create
        if not os.path.isdir(self.pool.root):
            raise StoragePoolException(
                f"Pool directory {self.pool.root} does not exist: is its "
                "filesystem mounted?"
            )
        fileops.make_dirs(self.files.directory)

    def prepare(self, snapbase_wanted):
        """Make what the next start takes (background); True if it made a
        new snapbase.  Most kinds have nothing to make."""
        del snapbase_wanted
        return False

    def outdated(self):
        """Whether the source committed new data since this start; only
        snapshot volumes start from a source."""
        return False

    def remove(self):
        """Delete all of the volume's data, revisions included."""
        files = self.files
        listing = files.scan()
        self.remove_stale(listing)
        self.pool.subvolumes.remove_all(files, listing)
        self.pool.trash.discard(
            [files.dirty]
            + self.bases_left(listing)
            + list(listing.spares.values())
            + listing.imports  # an import in progress ends with us
            + [rev.path for rev in listing.revisions]
            + list(listing.pins.values())
            + list(listing.reverts.values())
            + [files.committed]
        )
        fileops.remove_empty_dirs([files.directory])

    # -- data in and out -----------------------------------------------------

    def export(self):
        """A clone of the committed data of its own, so that a commit,
        revert or removal while a backup reads it changes nothing in it."""
        path = self.files.export()
        fileops.make_copy(self.data_path(), path)
        return path

    def import_target(self, size):
        """A new empty image of `size` bytes for an import to fill."""
        fileops.make_dirs(self.files.directory)
        path = self.files.import_target()
        fileops.make_sparse(path, size)
        return path

    def import_from(self, src):
        """Commit a copy (a clone where it can) of the image `src`."""
        fileops.make_dirs(self.files.directory)
        tmp = self.files.temp()
        fileops.make_copy(src, tmp)
        self.commit_or_drop(tmp)

    def commit_or_drop(self, path):
        """Commit the image `path`; it is gone afterwards either way."""
        try:
            self.commit(path)
        finally:
            fileops.remove_files([path])

    # -- what stays, what goes ----------------------------------------------

    def known(self, listing):
        """What `judgement` needs to know besides the files."""
        committed = fileops.stat_or_none(self.files.committed)
        return judgement.Known(
            committed=layout.spare_key(committed) if committed else None,
            source=None,
            running=listing.dirty or listing.running,
            in_use=self.volume.in_use(),
            revisions=frozenset(rev.id for rev in listing.revisions),
        )

    def remove_stale(self, listing):
        """Remove what an interrupted operation or a crash left behind, as
        `judgement` judges `listing`; returns the paths removed.

        Runs under the lock, so no operation of this volume is writing a
        temporary file; exports and imports still in use are kept.
        """
        links = {
            path: guards.link_count(path) for path in listing.spares.values()
        }
        items = judgement.items_of(listing, links)
        doomed = judgement.garbage(judgement.judge(items, self.known(listing)))
        subvolumes = {
            item.path
            for item in items
            if item.kind in layout.SUBVOLUME_KINDS and item.path in doomed
        }
        self.pool.subvolumes.destroy(sorted(subvolumes))
        # a stale spare may have many extents: its deletion is background
        self.pool.trash.discard(p for p in doomed if p not in subvolumes)
        return set(doomed)

    @staticmethod
    def bases_left(listing):
        """The base markers `remove_stale` kept: those of a running image."""
        if listing.dirty or listing.running:
            return list(listing.base.values())
        return []

    # -- changes to committed data -------------------------------------------

    def resize(self, size):
        """Give the running image `size` bytes in place (its loop device
        sees it), else, for a saving kind, a new committed image of `size`
        bytes; True if it made one."""
        running = self.volume.path
        if os.path.exists(running):
            guards.check_own_image(running)
            fileops.resize_in_place(running, size)
            fileops.refresh_loop_devices(running)
            return False
        files = self.files
        current = fileops.stat_or_none(files.committed)
        if not self.saves or current is None:
            return False
        if size > current.st_size:
            # committed data is never changed in place: grow a copy
            fileops.publish_copy(
                files.committed, files.committed, files.temp(), size=size
            )
        else:
            self._shrink_committed(size)
        return True

    def _shrink_committed(self, size):
        """Commit a copy cut to `size`: the old image becomes a revision,
        even where none are kept, so that a revert undoes the shrink (the
        next commit prunes it)."""
        cut = self.files.temp()
        fileops.make_copy(self.files.committed, cut, size=size)
        try:
            policy = self.policy()
            policy = policy._replace(keep=max(policy.keep, 1))
            self.revisions.commit(cut, policy, self.files.scan())
        finally:
            fileops.remove_files([cut])

    def policy(self):
        """What pruning keeps for this volume now."""
        return Policy(
            self.volume.revisions_to_keep, self.pool.keep_revision_older_than
        )

    def commit(self, new_image):
        """Make `new_image` the committed image (an import)."""
        self.revisions.commit(new_image, self.policy(), self.files.scan())

    def revert(self, revision):
        """Make `revision` (None: the newest) the committed data, at once
        (the current committed data becomes a revision itself), or, while
        the volume runs, at its stop.  True if it committed now."""
        if os.path.exists(self.files.dirty):
            self.revisions.request_revert(revision)
            return False
        self.revisions.revert(revision, self.policy())
        return True

    def refuse_if_running(self, action):
        """Refuse `action` while a running image exists."""
        if os.path.exists(self.files.dirty):
            raise StoragePoolException(
                f"Cannot {action} volume {self.volume.vid} while its VM is "
                "running (or was running when dom0 lost power): shut the VM "
                "down first"
            )

    def commit_running(self, listing):
        """Stop of a saving kind: commit the running image, if any, or
        carry out the revert asked for while it ran."""
        files = self.files
        if listing.reverts:
            self.revisions.apply_revert(self.policy(), listing)
        elif not os.path.exists(files.dirty):
            return False
        elif self.volume.snapshots_disabled:
            fileops.publish(files.dirty, files.committed)
            self.revisions.prune(NO_REVISIONS)
        else:
            self.revisions.commit(files.dirty, self.policy(), listing)
        fileops.remove_files(self.bases_left(listing))
        return True


class Origin(Kind):
    """Keeps its own data: starts from a spare of it, commits at stop."""

    saves = True

    def create(self, size):
        super().create(size)
        files = self.files
        listing = files.scan()
        fileops.publish_sparse(files.committed, files.temp(), size)
        self.remove_stale(listing)
        fileops.remove_files(
            [files.dirty] + [rev.path for rev in listing.revisions]
        )

    def start(self):
        """A rename whenever a spare is fresh; after a power loss, the
        running image from before."""
        files = self.files
        listing = files.scan()
        self.remove_stale(listing)
        if os.path.exists(files.dirty):
            guards.check_own_image(files.dirty)
            log.warning(
                "%s: keeping its running image from before dom0 stopped "
                "uncleanly: %s",
                self.volume.vid,
                files.dirty,
            )
            return
        if self.volume.snapshots_disabled:
            self.revisions.prune(NO_REVISIONS)
            fileops.rename(files.committed, files.dirty)
            return
        key = layout.spare_key(os.stat(files.committed))
        if not spares.take(files, key, files.dirty, self.pool.trash):
            fileops.publish_copy(files.committed, files.dirty, files.temp())

    def stop(self):
        """Commit; returns (committed, size of a volatile image)."""
        listing = self.files.scan()
        self.remove_stale(listing)
        return self.commit_running(listing), None

    def prepare(self, snapbase_wanted):
        """A spare of the committed image and, while snapshot volumes
        start from it (btrfs), a snapbase of it, which the ready snapshots
        of older ones are stale against (True)."""
        stat_result = fileops.stat_or_none(self.files.committed)
        if stat_result is None or self.volume.snapshots_disabled:
            return False
        listing = self.files.scan()
        made = self.pool.subvolumes.prepare(
            self.files, stat_result, snapbase_wanted, listing
        )
        removed = self.remove_stale(listing)
        spare = listing.spares.get(layout.spare_key(stat_result))
        if spare is None or spare in removed:
            spares.make(self.files, stat_result)
        return made


class Volatile(Kind):
    """Empty at each start, thrown away at stop."""

    def directories(self):
        return [self.files.directory]

    def image_paths(self):
        return [self.volume.path]

    def data_path(self):
        raise StoragePoolException(
            f"Volume {self.volume.vid} is volatile: it has no data to export"
        )

    def verify(self):
        return True

    def start(self):
        """A new sparse image of the volume's size."""
        files = self.files
        self.remove_stale(files.scan())
        fileops.remove_files([files.dirty])
        fileops.publish_sparse(
            files.dirty, files.temp(), self.volume.nominal_size
        )

    def stop(self):
        """Discard; the size the image had (a resize while it ran) is the
        size of the next start's."""
        files = self.files
        listing = files.scan()
        self.remove_stale(listing)
        self.pool.subvolumes.stop(files)
        running = fileops.stat_or_none(files.dirty)
        self.pool.trash.discard([files.dirty] + self.bases_left(listing))
        return False, running.st_size if running else None


class Snapshot(Kind):
    """Starts from its source's committed data, discards at stop.

    A marker (`layout.VolumeFiles.base_marker`) names the version started
    from: is_outdated compares it with the source's.  On btrfs that
    version's ready snapshot is renamed into place, or its snapbase
    snapshotted; else the source's spare of it is taken by a rename, and
    when another start took it first, the start makes one clone, of that
    version only.
    """

    keeps_ready_snapshots = True

    def source_files(self):
        return self.volume.source.files

    def known(self, listing):
        # no spare of its own: any is left by an older version
        source = fileops.stat_or_none(self.source_files().committed)
        return (
            super()
            .known(listing)
            ._replace(
                committed=None,
                source=layout.spare_key(source) if source else None,
            )
        )

    def no_start_data(self, needed):
        """A source running with snapshots disabled has no committed data
        until its VM stops; R4.3's host refuses such a start itself, R4.2's
        does not."""
        source = self.volume.source
        if source.snapshots_disabled:
            return StoragePoolException(
                f"Cannot start volume {self.volume.vid}: its source "
                f"{source.vid} is running with snapshots disabled "
                "(revisions_to_keep -1), so it has no committed data to "
                "start from; shut down the VM of the source first"
            )
        return super().no_start_data(needed)

    def start(self):
        """Start from the source's committed data, never its running one."""
        files, source = self.files, self.source_files()
        listing = files.scan()
        self.remove_stale(listing)
        self.pool.subvolumes.stop(files)  # left by a crash
        if self.kept_running_image():
            return
        current = fileops.stat_or_none(source.committed)
        if current is None:
            raise self.no_start_data(source.committed)
        fileops.remove_files(self.bases_left(listing))
        key = layout.spare_key(current)
        # made durable by the directory fsync of the rename (or published
        # copy) to the running image below, in the same directory, or by
        # the snapshot's transaction commit
        fileops.make_sparse(files.base_marker(key), 0)
        if self.started_from_subvolume(key):
            return
        if spares.take(source, key, files.dirty, self.pool.trash):
            return
        try:
            fileops.publish_copy(
                source.committed, files.dirty, files.temp(), expected=current
            )
        except fileops.SourceChanged:
            raise StoragePoolException(
                f"Cannot start volume {self.volume.vid}: its source "
                f"{self.volume.source.vid} committed new data while it "
                "started; start it again"
            ) from None

    def outdated(self):
        """Compares the base marker's version with the source's."""
        bases = self.files.scan().base
        source = self.source_files().committed
        current = fileops.stat_or_none(source)
        if not bases or current is None:
            return False
        key, path = next(iter(bases.items()))
        if key:
            return key != layout.spare_key(current)
        return not fileops.same_file(path, source)  # an older driver's link

    def kept_running_image(self):
        """A running image left by a crash is thrown away: False."""
        fileops.remove_files([self.files.dirty])
        return False

    def started_from_subvolume(self, key):
        """Started from the ready snapshot or the snapbase (btrfs)?"""
        return self.pool.subvolumes.start(self.files, self.source_files(), key)

    def stop(self):
        """Discard the running image and its base marker."""
        files = self.files
        listing = files.scan()
        self.remove_stale(listing)
        self.pool.subvolumes.stop(files)
        self.pool.trash.discard([files.dirty] + self.bases_left(listing))
        return False, None

    def prepare(self, snapbase_wanted):
        """A ready snapshot of the source's current snapbase (btrfs)."""
        del snapbase_wanted
        source = self.source_files()
        current = fileops.stat_or_none(source.committed)
        if current is not None:
            self.remove_stale(self.files.scan())
            self.pool.subvolumes.prepare_ready(
                self.files, source, layout.spare_key(current)
            )
        return False


class SavedSnapshot(Snapshot):
    """Starts from its source's committed data, commits at stop (rare)."""

    saves = True
    keeps_ready_snapshots = False

    def image_paths(self):
        return [self.volume.path, self.files.committed]

    def data_path(self):
        return self.existing_committed(self.files.committed)

    def kept_running_image(self):
        """A running image left by a crash is the VM's data: kept."""
        if not os.path.exists(self.files.dirty):
            return False
        guards.check_own_image(self.files.dirty)
        log.warning("%s: keeping its unsaved running image", self.volume.vid)
        return True

    def started_from_subvolume(self, key):
        return False  # its running image is committed: a plain file

    def stop(self):
        listing = self.files.scan()
        self.remove_stale(listing)
        return self.commit_running(listing), None


def kind_of(volume):
    """The kind of `volume`, from its snap_on_start and save_on_stop."""
    if volume.snap_on_start:
        return (
            SavedSnapshot(volume) if volume.save_on_stop else Snapshot(volume)
        )
    return Origin(volume) if volume.save_on_stop else Volatile(volume)
