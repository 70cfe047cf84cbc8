"""The pool's trash: what a stop discards is gone from the VM directory at
once and deleted in the background; nothing else is ever deleted from it.

Discarded images are the running image of a snapshot or volatile volume
and the revisions a commit prunes.  Each test follows them by inode.
"""

import asyncio
import os
import shutil
import subprocess

import pytest

from helpers import (
    MIB,
    FakeVM,
    new_pool,
    origin,
    read_image,
    snapshot,
    volatile,
    write_image,
)
from qubes_reflink import btrfs, cli, layout, trash

JUNK = b"left by a crash"


def trash_dir(pool):
    return layout.trash_dir(pool.root)


def inodes_in(directory):
    """Inode numbers of the files in `directory` (none if it is missing)."""
    if not os.path.isdir(directory):
        return set()
    return {
        os.lstat(os.path.join(directory, n)).st_ino
        for n in os.listdir(directory)
    }


async def started(kind, pool):
    """A started volume of `kind` whose running image holds data."""
    vm = FakeVM("work")
    if kind == "snapshot":
        template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
        await template.create()
        volume = snapshot(pool, vm, template)
    else:
        volume = volatile(pool, vm, size=MIB)
    await volume.create()
    await volume.start()
    write_image(volume.path, b"running data")
    return volume


@pytest.mark.parametrize("kind", ["snapshot", "volatile"])
async def test_stop_moves_running_image_to_trash(any_dir, kind):
    pool = await new_pool(any_dir, setup_check="no")
    volume = await started(kind, pool)
    running = os.stat(volume.path).st_ino
    # on btrfs a snapshot volume's running image is a subvolume of its own
    in_subvolume = btrfs.is_subvolume(os.path.dirname(volume.path))

    await volume.stop()
    # right after the stop: gone from the VM directory, waiting in the
    # trash (or destroyed with its subvolume)
    assert not os.path.exists(volume.path)
    if not in_subvolume:
        assert running in inodes_in(trash_dir(pool))
        assert running not in inodes_in(os.path.dirname(volume.path))

    await pool.wait_background()
    # emptied, and the empty trash removed: the pool looks as before
    assert sorted(os.listdir(pool.root)) == ["appvms", "vm-templates"]
    await volume.start()  # the next start is fresh
    assert read_image(volume.path, 12) != b"running data"
    await volume.stop()
    await pool.wait_background()


async def test_pruned_revision_goes_to_trash(reflink_dir):
    pool = await new_pool(reflink_dir)
    volume = origin(pool, FakeVM("work"), revisions_to_keep=1)
    await volume.create()
    for data in (b"one", b"two"):
        await volume.start()
        write_image(volume.path, data)
        await volume.stop()
        await pool.wait_background()
    (oldest,) = volume.revisions
    oldest_path = os.path.join(
        os.path.dirname(volume.path), f"private.img.{oldest}@"
    )
    oldest_ino = {
        os.stat(os.path.join(os.path.dirname(volume.path), n)).st_ino
        for n in os.listdir(os.path.dirname(volume.path))
        if n.startswith(os.path.basename(oldest_path))
    }.pop()

    await volume.start()
    write_image(volume.path, b"three")
    await volume.stop()
    assert oldest not in volume.revisions
    assert len(volume.revisions) == 1
    assert oldest_ino in inodes_in(trash_dir(pool))

    await pool.wait_background()
    assert layout.trash_entries(pool.root) == []
    path = await volume.export()
    assert read_image(path, 5) == b"three"
    await volume.export_end(path)


async def test_stop_empties_what_a_crash_left(any_dir):
    """qubesd calls stop() for every volume when it starts: even a stop
    with nothing to commit sweeps the trash; files of other names stay."""
    pool = await new_pool(any_dir, setup_check="no")
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    os.makedirs(trash_dir(pool), exist_ok=True)
    left = [layout.trash_path(pool.root) for _ in range(2)]
    foreign = os.path.join(trash_dir(pool), "notes.txt")
    for path in left + [foreign]:
        with open(path, "wb") as file:
            file.write(JUNK)

    await volume.stop()  # not running: nothing to commit
    await pool.wait_background()
    assert not any(os.path.exists(path) for path in left)
    with open(foreign, "rb") as file:  # kept, and so is the trash
        assert file.read() == JUNK


async def test_trash_that_is_a_symlink_is_never_followed(any_dir):
    """A symbolic link where the trash should be: the stop removes the
    running image in place; nothing behind the link is moved or deleted."""
    pool = await new_pool(any_dir, setup_check="no")
    outside = os.path.join(any_dir, "outside")
    os.mkdir(outside)
    bait = os.path.join(outside, os.path.basename(layout.trash_path("/")))
    with open(bait, "wb") as file:
        file.write(JUNK)
    os.symlink(outside, trash_dir(pool))
    volume = await started("volatile", pool)

    await volume.stop()
    await pool.wait_background()
    assert not os.path.exists(volume.path)
    assert os.listdir(outside) == [os.path.basename(bait)]
    with open(bait, "rb") as file:
        assert file.read() == JUNK
    assert os.path.islink(trash_dir(pool))


@pytest.mark.skipif(not shutil.which("btrfs"), reason="needs btrfs-progs")
async def test_vm_directory_on_its_own_subvolume(btrfs_dir):
    """A rename out of a btrfs subvolume fails (EXDEV): the discarded
    image is then removed in place."""
    pool = await new_pool(btrfs_dir)
    vm_dir = os.path.join(pool.root, "appvms", "work")
    subprocess.run(
        ["btrfs", "-q", "subvolume", "create", vm_dir],
        check=True,
        capture_output=True,
    )
    volume = await started("volatile", pool)
    assert os.path.dirname(volume.path) == vm_dir

    await volume.stop()
    assert not os.path.exists(volume.path)
    assert layout.trash_entries(pool.root) == []
    await volume.remove()  # an empty subvolume goes like a directory
    await pool.wait_background()
    assert not os.path.exists(vm_dir)


async def test_fsck_reports_and_empties_the_trash(reflink_dir, capsys):
    """Left in the trash while qubesd was stopped: fsck reports it and
    --repair deletes it."""
    pool = await new_pool(reflink_dir)
    os.makedirs(trash_dir(pool), exist_ok=True)
    left = layout.trash_path(pool.root)
    with open(left, "wb") as file:
        file.write(JUNK)

    assert cli.main(["status", pool.root]) == 0
    assert "1 discarded images in the trash" in capsys.readouterr().out
    assert cli.main(["fsck", pool.root]) == 1
    assert f"{left}: image a stop discarded" in capsys.readouterr().out
    assert cli.main(["fsck", "--repair", "--force", pool.root]) == 0
    assert f"removed: {left}" in capsys.readouterr().out
    assert not os.path.exists(left)
    assert cli.main(["status", pool.root]) == 0
    assert "trash" not in capsys.readouterr().out


async def test_export_end_and_remove_use_the_trash(reflink_dir, monkeypatch):
    """The end of an export and the removal of a volume take their files
    away at once, the same way."""
    # the sweep waits as in qubesd: the trash is looked at before it runs
    monkeypatch.setattr(trash, "SWEEP_DELAY", 1.0)
    pool = await new_pool(reflink_dir)
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await volume.start()
    write_image(volume.path, b"kept")
    await volume.stop()
    await pool.wait_background()
    vm_dir = os.path.dirname(volume.path)
    committed = os.stat(os.path.join(vm_dir, "private.img")).st_ino

    export = await volume.export()
    exported = os.stat(export).st_ino
    await volume.export_end(export)
    assert not os.path.exists(export)
    assert exported in inodes_in(trash_dir(pool))

    await volume.remove()
    assert not os.path.exists(vm_dir)
    assert committed in inodes_in(trash_dir(pool))
    await pool.wait_background()
    assert layout.trash_entries(pool.root) == []


async def test_a_burst_of_stops_is_swept_in_one_pass(any_dir, monkeypatch):
    """qubesd stopping many VMs at once: one sweep after their stops."""
    monkeypatch.setattr(trash, "SWEEP_DELAY", 0.3)
    pool = await new_pool(any_dir, setup_check="no")
    passes = []
    empty = trash.Trash._empty
    monkeypatch.setattr(
        trash.Trash, "_empty", lambda self: passes.append(empty(self))
    )
    volumes = [volatile(pool, FakeVM(f"vm{i}"), size=MIB) for i in range(3)]
    for volume in volumes:
        await volume.create()
        await volume.start()

    await asyncio.gather(*(volume.stop() for volume in volumes))
    assert len(layout.trash_entries(pool.root)) == 3
    await pool.wait_background()
    assert len(passes) == 1
    assert layout.trash_entries(pool.root) == []
