"""The fast paths of issue 3, proven by counting file operations.

Every mutating step of `qubes_reflink.fileops` (create, clone, copy,
rename, link, unlink, fsync, ...) is reported to the step hook; these tests
record the steps of one host call and check which were taken:

* a start whose spare is fresh clones nothing: it renames the spare to
  ``-dirty.img`` (an origin volume its own; a snapshot volume, such as an
  AppVM's root or a disposable VM's, its source's, which the source then
  replaces with one clone);
* stopped snapshot volumes hold no spares, and concurrent starts of two
  snapshots of one source make one rename and one clone;
* the stop of an origin volume keeping revisions clones nothing itself (a
  hard link and a rename), and the background then makes exactly one clone;
* a stale spare is never used: the start clones, the VM sees the new data,
  and the stale file is gone;
* a start arriving while the background makes the spare waits for it and
  then renames it.

No timing is asserted anywhere: only which steps ran, and in what order.
"""

import asyncio
import contextlib
import os
import shutil
import threading

import pytest

from helpers import (
    MIB,
    FakeVM,
    committed,
    new_pool,
    origin,
    read_image,
    snapshot,
    write_image,
)
from qubes_reflink import fileops, layout

# Steps that copy a whole image: a reflink clone, or the sparse copy used
# where the filesystem can't clone (ext4).
COPIES = ("clone", "copy")

OLD = b"old data " * 1000
NEW = b"NEW DATA " * 1000


class Steps:
    """The mutating steps seen (phase "after" only: steps that happened)."""

    def __init__(self):
        self.seen = []
        self._guard = threading.Lock()

    def add(self, step, paths):
        with self._guard:
            self.seen.append((step, paths))

    def snapshot(self):
        """A copy of the steps so far."""
        with self._guard:
            return list(self.seen)

    def clear(self):
        with self._guard:
            self.seen.clear()


def count(steps, *names):
    """How many of `steps` are one of `names`."""
    return sum(1 for step, _paths in steps if step in names)


def kind_of(path):
    """The layout kind of a file name (spare, dirty, committed, ...)."""
    entry = layout.classify(os.path.basename(path))
    return entry.kind if entry else None


@contextlib.contextmanager
def recording(on_before=None):
    """Record every step while the block runs; restore the previous hook.

    `on_before(step, paths)` is called before each step (in the thread
    doing it), for tests that need to hold a step at an exact point.
    """
    steps = Steps()

    def hook(step, phase, paths):
        if previous is not None:
            previous(step, phase, paths)
        if phase == "before":
            if on_before is not None:
                on_before(step, paths)
        else:
            steps.add(step, paths)

    previous = fileops.set_step_hook(hook)
    try:
        yield steps
    finally:
        fileops.set_step_hook(previous)


def spare_renames(steps, dirty):
    """The renames in `steps` of a spare to `dirty`."""
    return [
        paths
        for step, paths in steps
        if step == "rename"
        and kind_of(paths[0]) == "spare"
        and paths[1] == dirty
    ]


def spares_of(volume_dir, volume_name):
    """Paths of the spare files of `volume_name` in `volume_dir`."""
    found = []
    for name in sorted(os.listdir(volume_dir)):
        entry = layout.classify(name)
        if entry and entry.volume == volume_name and entry.kind == "spare":
            found.append(os.path.join(volume_dir, name))
    return found


async def stopped_origin(pool, vm, name="private", data=OLD, **config):
    """An origin volume that holds `data` at offset 0 and has been
    stopped once, with its background spare made."""
    vol = origin(pool, vm, name=name, size=4 * MIB, **config)
    await vol.create()
    await vol.start()
    write_image(vol.path, data)
    await vol.stop()
    await pool.wait_background()
    return vol


async def update_template(pool, template_root, data):
    """Start the template, write `data`, stop it: a new committed image."""
    await template_root.start()
    write_image(template_root.path, data)
    await template_root.stop()
    await pool.wait_background()


# -- a start with a fresh spare is a rename ---------------------------------


async def assert_start_takes_spare(volume, spare):
    """Start `volume`: it must rename `spare` into place (no copy, one
    rename), run on that very inode and see the committed data OLD."""
    spare_inode = os.stat(spare).st_ino
    with recording() as steps:
        await volume.start()
    seen = steps.snapshot()
    assert count(seen, *COPIES) == 0
    assert count(seen, "rename") == 1
    assert spare_renames(seen, volume.path) == [(spare, volume.path)]
    assert os.stat(volume.path).st_ino == spare_inode
    assert read_image(volume.path, len(OLD)) == OLD
    assert not os.path.exists(spare)


async def test_origin_start_takes_fresh_spare(any_dir):
    pool = await new_pool(any_dir, setup_check="no")
    vol = await stopped_origin(pool, FakeVM("work"))
    (spare,) = spares_of(os.path.dirname(vol.path), "private")
    await assert_start_takes_spare(vol, spare)
    await vol.stop()
    await pool.wait_background()


async def snapshot_of_template(pool, vm_name="work"):
    """A template root holding OLD with its spare made, and a created
    snapshot volume of it (an AppVM's root)."""
    template_root = await stopped_origin(
        pool, FakeVM("tpl", "vm-templates"), name="root"
    )
    appvm_root = snapshot(pool, FakeVM(vm_name), template_root)
    await appvm_root.create()
    await pool.wait_background()
    return template_root, appvm_root


async def clone_starts_pool(directory):
    """A pool whose snapshot volumes start from clones, as on XFS (or on a
    btrfs refusing subvolume ioctls): the mechanism these tests are about."""
    pool = await new_pool(directory)
    pool.subvolumes.disable("test of the clone mechanism")
    return pool


async def test_snapshot_start_takes_source_spare(reflink_dir):
    """An AppVM's (or a new disposable VM's) root starts by renaming the
    template's spare into its own directory; the template makes its next
    spare in the background: one clone."""
    pool = await clone_starts_pool(reflink_dir)
    template_root, appvm_root = await snapshot_of_template(pool)
    template_dir = os.path.dirname(template_root.path)
    (spare,) = spares_of(template_dir, "root")
    await assert_start_takes_spare(appvm_root, spare)
    assert not appvm_root.is_outdated()
    with recording() as steps:
        await pool.wait_background()
    assert count(steps.snapshot(), "clone") == 1
    assert len(spares_of(template_dir, "root")) == 1
    await appvm_root.stop()
    await pool.wait_background()


async def test_snapshot_start_again_takes_source_spare(reflink_dir):
    """A stopped snapshot volume keeps no spare of its own: its next start
    takes the template's again."""
    pool = await clone_starts_pool(reflink_dir)
    template_root, appvm_root = await snapshot_of_template(pool)
    await appvm_root.start()
    write_image(appvm_root.path, b"scratch")
    await appvm_root.stop()
    await pool.wait_background()
    assert not spares_of(os.path.dirname(appvm_root.path), "root")
    (spare,) = spares_of(os.path.dirname(template_root.path), "root")
    await assert_start_takes_spare(appvm_root, spare)
    await appvm_root.stop()
    await pool.wait_background()


async def test_stopped_appvms_hold_no_spares(reflink_dir):
    """However many AppVMs of a template stop, the pool holds one spare of
    the template's root and none in the AppVMs' directories: no reflink
    per stopped AppVM slows the template's clones and deletions."""
    pool = await clone_starts_pool(reflink_dir)
    template_root = await stopped_origin(
        pool, FakeVM("tpl", "vm-templates"), name="root"
    )
    roots = [snapshot(pool, FakeVM(f"app{i}"), template_root) for i in range(6)]
    for root in roots:
        await root.create()
        await root.start()
    await asyncio.gather(*(root.stop() for root in roots))
    await pool.wait_background()
    for root in roots:
        assert os.listdir(os.path.dirname(root.path)) == []
    assert len(spares_of(os.path.dirname(template_root.path), "root")) == 1


async def test_concurrent_snapshot_starts_rename_once_clone_once(
    reflink_dir,
):
    """Two AppVMs of one template starting at once: one takes the spare,
    the other (finding it taken) makes one clone, or, when it comes after
    the template's next spare (a loaded machine), takes that one; both
    see the data."""
    pool = await clone_starts_pool(reflink_dir)
    template_root, first = await snapshot_of_template(pool, "first")
    second = snapshot(pool, FakeVM("second"), template_root)
    await second.create()
    (spare,) = spares_of(os.path.dirname(template_root.path), "root")
    spare_inode = os.stat(spare).st_ino
    with recording() as steps:
        await asyncio.gather(first.start(), second.start())
    seen = steps.snapshot()
    renamed = spare_renames(seen, first.path) + spare_renames(seen, second.path)
    appvm_dirs = {os.path.dirname(root.path) for root in (first, second)}
    copies_for_appvms = [
        paths
        for step, paths in seen
        if step in COPIES and os.path.dirname(paths[-1]) in appvm_dirs
    ]
    # the template's own spare aside
    assert len(renamed) >= 1 and len(renamed) + len(copies_for_appvms) == 2
    inodes = {os.stat(root.path).st_ino for root in (first, second)}
    assert spare_inode in inodes and len(inodes) == 2
    for root in (first, second):
        assert read_image(root.path, len(OLD)) == OLD
        await root.stop()
    await pool.wait_background()


async def test_legacy_spare_of_snapshot_volume_is_discarded(reflink_dir):
    """A spare that an older version left in an AppVM's directory is
    discarded (through the trash) at its next start or stop, and the start
    takes the template's spare."""
    pool = await clone_starts_pool(reflink_dir)
    template_root, appvm_root = await snapshot_of_template(pool)
    (spare,) = spares_of(os.path.dirname(template_root.path), "root")
    appvm_dir = os.path.dirname(appvm_root.path)
    legacy = os.path.join(appvm_dir, os.path.basename(spare))
    fileops.make_copy(spare, legacy)
    spare_inode = os.stat(spare).st_ino
    with recording() as steps:
        await appvm_root.start()
    assert count(steps.snapshot(), *COPIES) == 0
    assert os.stat(appvm_root.path).st_ino == spare_inode
    assert not os.path.exists(legacy)
    await appvm_root.stop()
    await pool.wait_background()
    assert sorted(os.listdir(appvm_dir)) == []


# -- a stop clones nothing itself -------------------------------------------


@pytest.mark.parametrize("revisions_to_keep", [1, 2])
async def test_origin_stop_links_and_renames(reflink_dir, revisions_to_keep):
    pool = await new_pool(reflink_dir)
    vol = await stopped_origin(
        pool, FakeVM("work"), revisions_to_keep=revisions_to_keep
    )
    await vol.start()
    write_image(vol.path, NEW)
    committed = os.path.join(os.path.dirname(vol.path), "private.img")
    old_committed_inode = os.stat(committed).st_ino
    running_inode = os.stat(vol.path).st_ino

    with recording() as steps:
        await vol.stop()
        # taken before the next await: the background has not run yet
        in_stop = steps.snapshot()
        steps.clear()
        await pool.wait_background()
        in_background = steps.snapshot()

    assert count(in_stop, *COPIES) == 0
    assert count(in_stop, "link") == 1
    renames = [paths for step, paths in in_stop if step == "rename"]
    assert renames[0] == (vol.path, committed)
    # a pruned revision goes to the trash, deleted in the background
    pruned = renames[1:]
    assert len(pruned) == (1 if revisions_to_keep == 1 else 0)
    for src, dst in pruned:
        assert kind_of(src) == "revision"
        assert os.path.dirname(dst) == layout.trash_dir(pool.root)
    assert count(in_stop, "unlink") == 0
    assert [paths[0] for step, paths in in_background if step == "unlink"] == [
        dst for _src, dst in pruned
    ]
    assert count(in_background, "clone") == 1
    assert count(in_background, "copy") == 0

    # the old committed image is now the newest revision, by inode
    revision_paths = [
        os.path.join(os.path.dirname(vol.path), name)
        for name in os.listdir(os.path.dirname(vol.path))
        if kind_of(name) == "revision"
    ]
    assert old_committed_inode in {os.stat(p).st_ino for p in revision_paths}
    assert os.stat(committed).st_ino == running_inode
    assert read_image(committed, len(NEW)) == NEW
    assert len(spares_of(os.path.dirname(vol.path), "private")) == 1


# -- a stale spare is never used --------------------------------------------


async def assert_start_ignores_stale_spare(volume, stale, expected):
    """Start `volume`: it must clone (not rename `stale`), see `expected`,
    and leave `stale` removed."""
    with recording() as steps:
        await volume.start()
    seen = steps.snapshot()
    assert count(seen, "clone") == 1
    assert spare_renames(seen, volume.path) == []
    assert read_image(volume.path, len(expected)) == expected
    assert not os.path.exists(stale)
    await volume.stop()
    await volume.pool.wait_background()


async def test_stale_snapshot_spare_after_template_update(reflink_dir):
    """The template committed new data after a spare of its old version
    was left in the AppVM's directory (by an older version of the driver).

    The template is running when the AppVM starts, so it has no spare to
    lend: the start must clone the template's new committed image.
    """
    pool = await clone_starts_pool(reflink_dir)
    template_root = await stopped_origin(
        pool, FakeVM("tpl", "vm-templates"), name="root"
    )
    appvm_root = snapshot(pool, FakeVM("work"), template_root)
    await appvm_root.create()
    appvm_dir = os.path.dirname(appvm_root.path)
    (old_spare,) = spares_of(os.path.dirname(template_root.path), "root")
    stale = [os.path.join(appvm_dir, os.path.basename(old_spare))]
    fileops.make_copy(old_spare, stale[0])

    await update_template(pool, template_root, NEW)
    await template_root.start()  # takes its own spare; lends none
    write_image(template_root.path, b"running, uncommitted")
    assert spares_of(os.path.dirname(template_root.path), "root") == []

    await assert_start_ignores_stale_spare(appvm_root, stale[0], NEW)
    assert stale[0] not in spares_of(appvm_dir, "root")
    await template_root.stop()
    await pool.wait_background()


async def test_stale_origin_spare_planted_by_hand(reflink_dir):
    """A spare with old contents under an old key is never taken."""
    pool = await new_pool(reflink_dir)
    vol = await stopped_origin(pool, FakeVM("work"), data=OLD)
    vol_dir = os.path.dirname(vol.path)
    (old_spare,) = spares_of(vol_dir, "private")
    keep = os.path.join(pool.root, "old-contents")  # same subvolume
    shutil.copyfile(old_spare, keep)

    await vol.start()
    write_image(vol.path, NEW)
    await vol.stop()
    await pool.wait_background()
    # lose the fresh spare, and plant the old copy under its old name
    for fresh in spares_of(vol_dir, "private"):
        os.unlink(fresh)
    os.rename(keep, old_spare)
    assert read_image(old_spare, len(OLD)) == OLD

    await assert_start_ignores_stale_spare(vol, old_spare, NEW)


async def test_spare_with_wrong_key_is_removed_not_used(reflink_dir):
    """A spare named for another version of the committed image (same
    inode and size, other mtime) is stale too."""
    pool = await new_pool(reflink_dir)
    vol = await stopped_origin(pool, FakeVM("work"))
    vol_dir = os.path.dirname(vol.path)
    (fresh,) = spares_of(vol_dir, "private")
    stat_result = os.stat(os.path.join(vol_dir, "private.img"))
    wrong_key = (
        f"{stat_result.st_ino}-{stat_result.st_mtime_ns + 1}-"
        f"{stat_result.st_size}"
    )
    planted = os.path.join(vol_dir, f"private.img~spare.{wrong_key}")
    os.rename(fresh, planted)
    write_image(planted, NEW)  # would be visible if the start took it

    await assert_start_ignores_stale_spare(vol, planted, OLD)


# -- a start waits for the spare being made ---------------------------------


async def test_start_waits_for_spare_being_made(reflink_dir):
    pool = await new_pool(reflink_dir)
    vol = await stopped_origin(pool, FakeVM("work"))
    await vol.start()
    write_image(vol.path, NEW)

    cloning = threading.Event()
    release = threading.Event()

    def hold_clone(step, _paths):
        if step == "clone" and not cloning.is_set():
            cloning.set()
            release.wait(60)

    with recording(on_before=hold_clone) as steps:
        try:
            await vol.stop()
            starting = asyncio.create_task(vol.start())
            assert await asyncio.to_thread(cloning.wait, 60)
            for _ in range(20):
                await asyncio.sleep(0)
            # the background clone is held: the start must not have begun
            assert not starting.done()
            assert not os.path.exists(vol.path)
            before_release = steps.snapshot()
        finally:
            release.set()
        await starting
        seen = steps.snapshot()

    assert count(before_release, "clone") == 0
    assert count(seen, "clone") == 1
    assert count(seen, "copy") == 0
    clone_at = next(i for i, (s, _p) in enumerate(seen) if s == "clone")
    renames = spare_renames(seen, vol.path)
    assert len(renames) == 1
    rename_at = seen.index(("rename", renames[0]))
    assert clone_at < rename_at
    assert read_image(vol.path, len(NEW)) == NEW
    await vol.stop()
    await pool.wait_background()


@pytest.mark.parametrize("mechanism", ["clone", "default"])
async def test_snapshot_start_and_stop_touch_no_name_of_the_source(
    reflink_dir, mechanism
):
    """A snapshot volume's start and stop never link, unlink or rename a
    name of its source's committed image: those wait while that image is
    cloned (the source's next spare, right after a start took the last),
    and a stop right after a start then waited for the clone (XFS)."""
    if mechanism == "clone":
        pool = await clone_starts_pool(reflink_dir)
    else:
        pool = await new_pool(reflink_dir)
    template_root, appvm_root = await snapshot_of_template(pool)
    source = os.stat(committed(template_root))
    touched = []

    def check(step, paths):
        found = fileops.stat_or_none(paths[0]) if paths else None
        if step in ("link", "unlink", "rename") and found is not None:
            if os.path.samestat(found, source):
                touched.append((step, paths))

    with recording(check):
        await appvm_root.start()
        await appvm_root.stop()
        await appvm_root.start()
        await appvm_root.stop()
        await pool.wait_background()
    assert touched == []
    assert read_image(committed(template_root), len(OLD)) == OLD
