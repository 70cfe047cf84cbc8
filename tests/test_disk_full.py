"""Disk full and read-only filesystems: clear errors, nothing lost or left.

Each test makes its own small loop-mounted filesystem (btrfs 256 MiB, XFS
300 MiB, ext4 64 MiB with setup_check=no), builds volumes holding 8 MiB of
data, then fills the filesystem with a filler file until only a few MiB are
free.  Operations that need space (every copy: start, resize, import on
ext4, imports across filesystems) must fail with a StoragePoolException
that says the disk is full, keep the previous committed data byte for byte,
and leave no temporary file.  Operations that need no space (a commit is a
link and a rename) must still work.  A read-only remount in the middle of
a lifecycle gives errors that say so; after remounting read-write the
lifecycle goes on with nothing lost.
"""

import contextlib
import errno
import hashlib
import os
import subprocess

import pytest

from helpers import FakeVM, new_pool, origin
from loopfs import loop_filesystem, unavailable_reason
from qubes_reflink.host import StoragePoolException

MIB = 1024**2
SIZES = {"btrfs": 256 * MIB, "xfs": 300 * MIB, "ext4": 64 * MIB}
DATA = 8 * MIB
LEAVE = 2 * MIB
LEFTOVER_MARKS = ("~tmp.", "~import.", "~export.", ".qubes-reflink-probe")


@contextlib.contextmanager
def small_fs(fstype):
    """A fresh small `fstype` filesystem; unmounted (and its loop device
    detached) whatever happens."""
    reason = unavailable_reason(fstype)
    if reason:
        pytest.skip(reason)
    with loop_filesystem(fstype, size=SIZES[fstype]) as mountpoint:
        yield mountpoint


def _pool_options(fstype):
    return {} if fstype != "ext4" else {"setup_check": "no"}


def data(seed, size=DATA):
    """`size` bytes that differ for each seed and compress to nothing."""
    block = hashlib.sha256(seed.encode()).digest() * (MIB // 32)
    return (block * (size // MIB + 1))[:size]


def write_all(path, content):
    """Write `content` at the start of `path` and make it durable."""
    with open(path, "r+b") as image:
        image.write(content)
        image.flush()
        os.fsync(image.fileno())


def head(path, size=DATA):
    """The first `size` bytes of `path`."""
    with open(path, "rb") as image:
        return image.read(size)


def fill(mountpoint, leave=LEAVE):
    """Fill the filesystem up to ENOSPC, then free `leave` bytes."""
    filler = os.path.join(mountpoint, "filler")
    chunk = data("filler", MIB)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                if os.write(fd, chunk) < len(chunk):
                    break
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break
        with contextlib.suppress(OSError):
            os.fsync(fd)
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.sync()
    stats = os.statvfs(mountpoint)
    assert stats.f_bavail * stats.f_frsize < DATA, "filesystem not full"


def leftovers(directory):
    """Temporary, import, export and probe files below `directory`."""
    found = []
    for root, _dirs, names in os.walk(directory):
        found += [
            os.path.join(root, name)
            for name in names
            if any(mark in name for mark in LEFTOVER_MARKS)
        ]
    return found


def drop_spares(volume):
    """Remove the volume's spares, so that a start must copy."""
    directory = os.path.dirname(volume.path)
    for name in os.listdir(directory):
        if "~spare." in name:
            os.unlink(os.path.join(directory, name))


async def committed_volume(pool, vm_name, seed, size=2 * DATA):
    """An origin volume whose committed image holds data(seed)."""
    volume = origin(pool, FakeVM(vm_name), size=size)
    await volume.create()
    await volume.start()
    write_all(volume.path, data(seed))
    await volume.stop()
    await pool.wait_background()
    return volume


def committed_path(volume):
    """Path of the volume's committed image."""
    return volume.path.replace("-dirty.img", ".img")


def assert_intact(volume, seed, revisions=None):
    """Committed data is data(seed), not dirty, revisions unchanged."""
    assert head(committed_path(volume)) == data(seed)
    assert not volume.is_dirty()
    if revisions is not None:
        assert volume.revisions == revisions


def assert_disk_full(excinfo):
    """The error says the disk is full."""
    assert "disk is full" in str(excinfo.value), str(excinfo.value)


# -- copies on ext4 (setup_check=no) need space ----------------------------


async def test_start_that_must_copy_fails_cleanly_on_full_ext4():
    with small_fs("ext4") as mnt:
        pool = await new_pool(mnt, setup_check="no")
        volume = await committed_volume(pool, "vm", "X")
        revisions = volume.revisions
        drop_spares(volume)
        fill(mnt)
        with pytest.raises(StoragePoolException) as excinfo:
            await volume.start()
        assert_disk_full(excinfo)
        assert_intact(volume, "X", revisions)
        assert not leftovers(pool.root)


async def test_stop_commits_on_full_ext4_then_start_fails_cleanly():
    """A commit needs no space: it works on a full disk; the spare copy
    after it fails quietly, and the next start says the disk is full."""
    with small_fs("ext4") as mnt:
        pool = await new_pool(mnt, setup_check="no")
        volume = await committed_volume(pool, "vm", "X")
        drop_spares(volume)
        await volume.start()
        write_all(volume.path, data("Y"))
        fill(mnt)
        await volume.stop()
        await pool.wait_background()
        assert not leftovers(pool.root)
        assert_intact(volume, "Y")
        revisions = volume.revisions
        (old,) = [
            os.path.join(os.path.dirname(volume.path), name)
            for name in os.listdir(os.path.dirname(volume.path))
            if "@" in name
        ]
        assert head(old) == data("X")
        drop_spares(volume)
        with pytest.raises(StoragePoolException) as excinfo:
            await volume.start()
        assert_disk_full(excinfo)
        assert_intact(volume, "Y", revisions)
        assert not leftovers(pool.root)


async def test_resize_of_stopped_volume_fails_cleanly_on_full_ext4():
    with small_fs("ext4") as mnt:
        pool = await new_pool(mnt, setup_check="no")
        volume = await committed_volume(pool, "vm", "X")
        size, revisions = volume.size, volume.revisions
        fill(mnt)
        with pytest.raises(StoragePoolException) as excinfo:
            await volume.resize(4 * DATA)
        assert_disk_full(excinfo)
        assert_intact(volume, "X", revisions)
        assert volume.size == size == os.stat(committed_path(volume)).st_size
        assert not leftovers(pool.root)


@pytest.mark.parametrize(
    "target_fs, source_fs",
    [("ext4", None), ("ext4", "btrfs"), ("btrfs", "ext4"), ("xfs", "ext4")],
)
async def test_import_volume_fails_cleanly_when_full(target_fs, source_fs):
    """Both paths: from the same pool (which copies on ext4), and the
    fallback (export of the source, copy into the target)."""
    with contextlib.ExitStack() as stack:
        mnt = stack.enter_context(small_fs(target_fs))
        pool = await new_pool(mnt, **_pool_options(target_fs))
        src_pool = pool
        if source_fs:
            src_mnt = stack.enter_context(small_fs(source_fs))
            src_pool = await new_pool(src_mnt, **_pool_options(source_fs))
        source = await committed_volume(src_pool, "src", "S")
        target = await committed_volume(pool, "dst", "T")
        revisions = target.revisions
        fill(mnt)
        with pytest.raises(StoragePoolException) as excinfo:
            await target.import_volume(source)
        assert_disk_full(excinfo)
        assert_intact(target, "T", revisions)
        assert_intact(source, "S")
        assert not leftovers(pool.root)
        assert not leftovers(src_pool.root)


@pytest.mark.parametrize("fstype", ["btrfs", "xfs", "ext4"])
async def test_import_data_on_full_disk(fstype):
    """import_data makes a sparse file; the caller's write hits ENOSPC and
    import_data_end(False) throws it away; a small import that fits still
    commits (a commit needs no space)."""
    with small_fs(fstype) as mnt:
        pool = await new_pool(mnt, **_pool_options(fstype))
        volume = await committed_volume(pool, "vm", "X")
        revisions = volume.revisions
        fill(mnt)
        path = await volume.import_data(2 * DATA)
        with pytest.raises(OSError) as excinfo:
            write_all(path, data("I"))
        assert excinfo.value.errno == errno.ENOSPC
        await volume.import_data_end(False)
        assert_intact(volume, "X", revisions)
        assert not leftovers(pool.root)
        path = await volume.import_data(2 * DATA)
        write_all(path, data("J", 64 * 1024))
        await volume.import_data_end(True)
        await pool.wait_background()
        assert head(committed_path(volume), 64 * 1024) == data("J", 64 * 1024)
        assert not leftovers(pool.root)


@pytest.mark.parametrize("fstype", ["btrfs", "xfs"])
async def test_reflink_operations_on_full_disk_succeed_or_fail_cleanly(
    fstype,
):
    """Reflinks need (almost) no space: start, resize and import_volume
    either work or fail saying the disk is full, with nothing lost."""
    with small_fs(fstype) as mnt:
        pool = await new_pool(mnt)
        volume = await committed_volume(pool, "vm", "X")
        other = await committed_volume(pool, "other", "O")
        drop_spares(volume)
        fill(mnt, leave=MIB // 2)
        for action in (
            lambda: volume.resize(4 * DATA),
            lambda: other.import_volume(volume),
            volume.start,
        ):
            try:
                await action()
            except StoragePoolException as err:
                assert "disk is full" in str(err), str(err)
            await pool.wait_background()  # a spare may be in the making
            assert head(committed_path(volume)) == data("X")
            assert not leftovers(pool.root)
        assert head(committed_path(other)) in (data("O"), data("X"))
        if volume.is_dirty():
            assert head(volume.path) == data("X")
            await volume.stop()
        await pool.wait_background()
        assert_intact(volume, "X")
        assert not leftovers(pool.root)


# -- read-only remount -------------------------------------------------------


def _remount(mountpoint, mode):
    os.sync()
    subprocess.run(
        ["mount", "-o", f"remount,{mode}", mountpoint],
        check=True,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("fstype", ["btrfs", "xfs", "ext4"])
async def test_read_only_remount_mid_lifecycle(fstype):
    with small_fs(fstype) as mnt:
        pool = await new_pool(mnt, **_pool_options(fstype))
        running = await committed_volume(pool, "running", "R")
        stopped = await committed_volume(pool, "stopped", "S")
        await running.start()
        write_all(running.path, data("R2"))
        revisions = stopped.revisions
        new = origin(pool, FakeVM("new"), size=DATA)
        _remount(mnt, "ro")
        try:
            for action in (
                running.stop,
                stopped.start,
                lambda: stopped.resize(4 * DATA),
                stopped.revert,
                lambda: stopped.import_data(DATA),
                stopped.export,
                new.create,
                stopped.remove,
            ):
                with pytest.raises(StoragePoolException) as excinfo:
                    await action()
                assert "read-only" in str(excinfo.value), str(excinfo.value)
            assert running.is_dirty()
            assert head(running.path) == data("R2")
            assert head(committed_path(running)) == data("R")
            assert_intact(stopped, "S", revisions)
        finally:
            _remount(mnt, "rw")
        await running.stop()
        await stopped.start()
        assert head(stopped.path) == data("S")
        await stopped.stop()
        await pool.wait_background()
        assert_intact(running, "R2")
        assert_intact(stopped, "S")
        assert not leftovers(pool.root)
