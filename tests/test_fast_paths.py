"""The fast paths of issue 3, proven by counting file operations.

Every mutating step of `qubes_reflink.fileops` (create, clone, copy,
rename, link, unlink, fsync, ...) is reported to the step hook; these tests
record the steps of one host call and check which were taken:

* a start whose spare is fresh clones nothing: it renames the spare to
  ``-dirty.img`` (origin volumes, snapshot volumes after their own stop,
  and new snapshot volumes that borrow their source's spare, as disposable
  VMs do);
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


async def test_snapshot_start_after_own_stop_takes_own_spare(reflink_dir):
    pool = await new_pool(reflink_dir)
    template_root = await stopped_origin(
        pool, FakeVM("tpl", "vm-templates"), name="root"
    )
    appvm_root = snapshot(pool, FakeVM("work"), template_root)
    await appvm_root.create()
    await appvm_root.start()
    write_image(appvm_root.path, b"scratch")
    await appvm_root.stop()
    await pool.wait_background()
    (own,) = spares_of(os.path.dirname(appvm_root.path), "root")
    await assert_start_takes_spare(appvm_root, own)
    assert not appvm_root.is_outdated()
    await appvm_root.stop()
    await pool.wait_background()


async def test_new_snapshot_volume_borrows_source_spare(reflink_dir):
    """A disposable VM: a new snapshot volume adopts its source's spare at
    create(), so its first start is a rename within its own directory."""
    pool = await new_pool(reflink_dir)
    template_root = await stopped_origin(
        pool, FakeVM("dvm-tpl", "vm-templates"), name="root"
    )
    template_dir = os.path.dirname(template_root.path)
    borrowed = spares_of(template_dir, "root")
    assert len(borrowed) == 1
    borrowed_inode = os.stat(borrowed[0]).st_ino

    disp_root = snapshot(pool, FakeVM("disp1234"), template_root)
    with recording() as steps:
        await disp_root.create()
    adopted = spares_of(os.path.dirname(disp_root.path), "root")
    assert count(steps.snapshot(), *COPIES) == 0
    assert [os.stat(path).st_ino for path in adopted] == [borrowed_inode]

    # the source makes itself a new spare in the background: one clone
    with recording() as steps:
        await pool.wait_background()
    assert count(steps.snapshot(), "clone") == 1
    assert len(spares_of(template_dir, "root")) == 1

    await assert_start_takes_spare(disp_root, adopted[0])

    await disp_root.stop()
    await disp_root.remove()
    await pool.wait_background()


async def test_snapshot_start_borrows_when_it_has_no_spare(reflink_dir):
    """A snapshot volume whose spare is gone (created before the source
    had one) borrows the source's at start: a rename across directories."""
    pool = await new_pool(reflink_dir)
    template_root = await stopped_origin(
        pool, FakeVM("tpl", "vm-templates"), name="root"
    )
    template_dir = os.path.dirname(template_root.path)
    appvm_root = snapshot(pool, FakeVM("work"), template_root)
    await appvm_root.create()
    await pool.wait_background()
    for path in spares_of(os.path.dirname(appvm_root.path), "root"):
        os.unlink(path)
    (borrowed,) = spares_of(template_dir, "root")
    await assert_start_takes_spare(appvm_root, borrowed)
    await appvm_root.stop()
    await pool.wait_background()
    assert len(spares_of(template_dir, "root")) == 1


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
    """The template committed new data after the AppVM's spare was made.

    The template is running when the AppVM starts, so it has no spare to
    lend: the start must clone the template's new committed image.
    """
    pool = await new_pool(reflink_dir)
    template_root = await stopped_origin(
        pool, FakeVM("tpl", "vm-templates"), name="root"
    )
    appvm_root = snapshot(pool, FakeVM("work"), template_root)
    await appvm_root.create()
    await appvm_root.start()
    await appvm_root.stop()
    await pool.wait_background()
    appvm_dir = os.path.dirname(appvm_root.path)
    stale = spares_of(appvm_dir, "root")
    assert len(stale) == 1

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
    keep = os.path.join(reflink_dir, "old-contents")
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
