"""resize(): stopped and running volumes, with a real loop device attached."""

import contextlib
import os
import subprocess

import pytest

from helpers import (
    FakeVM,
    MIB,
    committed,
    data,
    dirty,
    origin,
    read_image,
    snapshot,
    snapshot_tree,
    volatile,
    write_image,
)
from qubes_reflink.host import StoragePoolException

CHUNK = 64 * 1024


async def settled_tree(pool):
    await pool.wait_background()
    return snapshot_tree(pool.root)


@contextlib.contextmanager
def loop_device(path):
    """Attach `path` to a free loop device, as Xen's block script does."""
    device = subprocess.run(
        ["losetup", "-f", "--show", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def device_size(device):
    return int(
        subprocess.run(
            ["blockdev", "--getsize64", device],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )


async def test_resize_stopped_origin(pool):
    volume = origin(pool, FakeVM("work"), size=MIB)
    await volume.create()
    await volume.start()
    write_image(dirty(volume), data("kept"), MIB - CHUNK)
    await volume.stop()
    revisions = dict(volume.revisions)
    old_ino = os.stat(committed(volume)).st_ino
    assert await volume.resize(3 * MIB) is volume
    st = os.stat(committed(volume))
    assert st.st_size == 3 * MIB
    assert st.st_ino != old_ino  # replaced, never changed in place
    assert oct(st.st_mode & 0o777) == oct(0o600)
    assert read_image(committed(volume), CHUNK, MIB - CHUNK) == data("kept")
    assert read_image(committed(volume), CHUNK, 2 * MIB) == bytes(CHUNK)
    assert volume.size == 3 * MIB
    assert volume.revisions == revisions
    await pool.wait_background()
    await volume.start()
    assert os.stat(dirty(volume)).st_size == 3 * MIB
    assert read_image(dirty(volume), CHUNK, MIB - CHUNK) == data("kept")
    await volume.stop()
    assert os.stat(committed(volume)).st_size == 3 * MIB


@pytest.mark.parametrize("kind", ["origin", "snapshot", "volatile"])
async def test_resize_running_with_loop_device(pool, kind):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    vm = FakeVM("app")
    volume = {
        "origin": lambda: origin(pool, vm),
        "snapshot": lambda: snapshot(pool, vm, template),
        "volatile": lambda: volatile(pool, vm),
    }[kind]()
    await volume.create()
    await volume.start()
    write_image(dirty(volume), data("running"))
    other = os.path.join(os.path.dirname(dirty(volume)), "unrelated")
    with open(other, "wb") as file:
        file.truncate(MIB)
    with loop_device(dirty(volume)) as device, loop_device(other) as bystander:
        assert device_size(device) == MIB
        await volume.resize(2 * MIB)
        assert os.stat(dirty(volume)).st_size == 2 * MIB
        assert device_size(device) == 2 * MIB
        assert device_size(bystander) == MIB  # only the volume's devices
        assert volume.size == 2 * MIB
        await volume.resize(4 * MIB)
        assert device_size(device) == 4 * MIB
    os.unlink(other)
    assert read_image(dirty(volume), CHUNK) == data("running")
    await volume.stop()
    if kind == "origin":
        assert os.stat(committed(volume)).st_size == 4 * MIB
        assert read_image(committed(volume), CHUNK) == data("running")
    if kind == "volatile":  # the next start has the new size
        await volume.start()
        assert os.stat(dirty(volume)).st_size == 4 * MIB
        await volume.stop()


@pytest.mark.parametrize("rtk", [0, 1, 2])
async def test_shrink_stopped_origin_keeps_the_old_image(pool, rtk):
    """A stopped volume's shrink commits a cut copy: the old image becomes
    the newest revision (kept even with revisions_to_keep 0), so a revert
    undoes the shrink, data at the end included."""
    volume = origin(pool, FakeVM("work"), size=2 * MIB, revisions_to_keep=rtk)
    await volume.create()
    await volume.start()
    write_image(dirty(volume), data("head"))
    write_image(dirty(volume), data("tail"), 2 * MIB - CHUNK)
    await volume.stop()
    old = os.stat(committed(volume))
    await volume.resize(MIB)
    assert os.stat(committed(volume)).st_size == MIB
    assert read_image(committed(volume), CHUNK) == data("head")
    assert volume.size == MIB
    newest = list(volume.revisions)[-1]
    kept = [p for p in os.listdir(os.path.dirname(committed(volume)))]
    (rev_name,) = [n for n in kept if n.startswith(f"private.img.{newest}@")]
    rev_path = os.path.join(os.path.dirname(committed(volume)), rev_name)
    assert os.stat(rev_path).st_ino == old.st_ino  # the old image itself
    await volume.revert(newest)
    assert os.stat(committed(volume)).st_size == 2 * MIB
    assert read_image(committed(volume), CHUNK, 2 * MIB - CHUNK) == data("tail")
    await pool.wait_background()
    await volume.start()
    assert read_image(dirty(volume), CHUNK, 2 * MIB - CHUNK) == data("tail")
    await volume.stop()


@pytest.mark.parametrize("kind", ["origin", "snapshot", "volatile"])
async def test_shrink_running_cuts_the_image_and_its_loop_device(pool, kind):
    template = origin(pool, FakeVM("tpl", "vm-templates"), "root", 2 * MIB)
    await template.create()
    vm = FakeVM("app")
    volume = {
        "origin": lambda: origin(pool, vm, size=2 * MIB),
        "snapshot": lambda: snapshot(pool, vm, template),
        "volatile": lambda: volatile(pool, vm, size=2 * MIB),
    }[kind]()
    await volume.create()
    await volume.start()
    write_image(dirty(volume), data("kept"))
    with loop_device(dirty(volume)) as device:
        assert device_size(device) == 2 * MIB
        await volume.resize(MIB)
        assert os.stat(dirty(volume)).st_size == MIB
        assert device_size(device) == MIB
        assert volume.size == MIB
    assert read_image(dirty(volume), CHUNK) == data("kept")
    await volume.stop()
    if kind == "origin":
        assert os.stat(committed(volume)).st_size == MIB
        assert read_image(committed(volume), CHUNK) == data("kept")


@pytest.mark.parametrize("size", [-1, "-1", -MIB, "abc", "1.5", None])
async def test_bad_size_refused(pool, size):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException):
        await volume.resize(size)
    assert await settled_tree(pool) == before
    assert volume.size == MIB


async def test_read_only_refused(pool):
    volume = origin(pool, FakeVM("work"), rw=False)
    await volume.create()
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException, match="read-only"):
        await volume.resize(2 * MIB)
    await volume.start()
    running = await settled_tree(pool)
    with pytest.raises(StoragePoolException, match="read-only"):
        await volume.resize(2 * MIB)
    assert await settled_tree(pool) == running
    await volume.stop()
    assert os.stat(committed(volume)).st_size == MIB
    assert set(before) <= set(await settled_tree(pool))


async def test_same_size_is_noop(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    before = await settled_tree(pool)
    await volume.resize(MIB)
    await volume.resize(str(MIB))
    assert await settled_tree(pool) == before


async def test_resize_string_size(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await volume.resize(str(2 * MIB))
    assert os.stat(committed(volume)).st_size == 2 * MIB
