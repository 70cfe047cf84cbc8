"""Every lifecycle method for every kind of volume, on btrfs, XFS and ext4
(setup_check=no), with real file contents and inode identities."""

import logging
import os
import re
import stat

import pytest

from conftest import fstype_of
from helpers import (
    FakeVM,
    MIB,
    committed,
    data,
    dirty,
    new_pool,
    origin,
    read_image,
    shared_bytes,
    snapshot,
    snapshot_tree,
    tree,
    vm_dir,
    volatile,
    write_image,
)
from qubes_reflink import ReflinkPool
from qubes_reflink.host import StoragePoolException, isodate

REVISION_NAME = re.compile(
    r"(?P<vol>[a-z]+)\.img\.(?P<n>[0-9]+)@"
    r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z\Z"
)
LEGACY_TS = "2020-01-02T03:04:05"
CHUNK = 64 * 1024


def ino(path):
    return os.stat(path).st_ino


async def cycle(volume, payload, offset=0):
    """One VM run: start, write `payload`, stop."""
    await volume.start()
    write_image(volume.block_device().path, payload, offset)
    await volume.stop()


async def settled_tree(pool):
    await pool.wait_background()
    return snapshot_tree(pool.root)


def revision_files(volume):
    """Numbered revision file names of `volume`, by number."""
    found = {}
    for name in os.listdir(vm_dir(volume)):
        match = REVISION_NAME.match(name)
        if match and match["vol"] == volume.name:
            found[match["n"]] = name
    return found


# -- create --------------------------------------------------------------


async def test_create_origin(pool):
    volume = origin(pool, FakeVM("work"), size=4 * MIB)
    assert await volume.create() is volume
    path = committed(volume)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 4 * MIB
    assert st.st_blocks == 0
    assert volume.size == 4 * MIB
    assert volume.usage == 0
    assert tree(vm_dir(volume)) == ["private.img"]
    assert volume.revisions == {}
    assert not volume.is_dirty()
    assert await volume.verify()


@pytest.mark.parametrize("kind", ["snapshot", "volatile", "origin-snapshot"])
async def test_create_without_image(pool, kind):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    vm = FakeVM("work")
    if kind == "volatile":
        volume = volatile(pool, vm)
    else:
        volume = snapshot(
            pool, vm, template, save_on_stop=kind == "origin-snapshot"
        )
    await volume.create()
    assert os.path.isdir(vm_dir(volume))
    assert tree(vm_dir(volume)) == []
    assert volume.size == MIB


async def test_create_again_resets(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await cycle(volume, data("one"))
    assert volume.revisions
    await volume.create()
    assert read_image(committed(volume), CHUNK) == bytes(CHUNK)
    assert volume.revisions == {}


# -- start / stop per kind -------------------------------------------------


async def test_origin_start_stop(pool):
    volume = origin(pool, FakeVM("work"), size=2 * MIB)
    await volume.create()
    committed_ino = ino(committed(volume))
    await volume.start()
    device = volume.block_device()
    assert device.path == dirty(volume)
    assert device.rw is True
    assert device.name == "private"
    assert device.devtype == "disk"
    assert volume.is_dirty()
    assert stat.S_IMODE(os.stat(dirty(volume)).st_mode) == 0o600
    assert os.stat(dirty(volume)).st_size == 2 * MIB
    dirty_ino = ino(dirty(volume))
    assert dirty_ino != committed_ino
    assert ino(committed(volume)) == committed_ino
    write_image(dirty(volume), data("A"), MIB)
    # the committed image is untouched while the VM runs
    assert read_image(committed(volume), CHUNK, MIB) == bytes(CHUNK)
    await volume.stop()
    assert not volume.is_dirty()
    assert not os.path.exists(dirty(volume))
    assert ino(committed(volume)) == dirty_ino  # renamed, not copied
    assert read_image(committed(volume), CHUNK, MIB) == data("A")
    assert os.stat(committed(volume)).st_size == 2 * MIB
    # the previous committed data is the revision, by a hard link
    (rev_name,) = revision_files(volume).values()
    rev_path = os.path.join(vm_dir(volume), rev_name)
    assert ino(rev_path) == committed_ino
    assert read_image(rev_path, CHUNK, MIB) == bytes(CHUNK)
    # started again: the committed data
    await volume.start()
    assert read_image(dirty(volume), CHUNK, MIB) == data("A")
    assert ino(dirty(volume)) != ino(committed(volume))
    await volume.stop()


async def test_snapshot_start_stop(pool):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    template_tree = await settled_tree(pool)
    template_files = {  # images and revisions; spares may be taken
        k: v
        for k, v in template_tree.items()
        if k.startswith("vm-templates") and "~" not in k
    }
    app = snapshot(pool, FakeVM("app"), template)
    await app.create()
    await app.start()
    assert not app.is_dirty()  # nothing of it is saved
    assert ino(dirty(app)) != ino(committed(template))
    assert stat.S_IMODE(os.stat(dirty(app)).st_mode) == 0o600
    assert read_image(dirty(app), CHUNK) == data("T1")
    write_image(dirty(app), data("app"))
    assert read_image(committed(template), CHUNK) == data("T1")
    await app.stop()
    assert not os.path.exists(dirty(app))
    await pool.wait_background()
    after = snapshot_tree(pool.root)
    assert {
        k: v
        for k, v in after.items()
        if k.startswith("vm-templates") and "~" not in k
    } == template_files
    # app leaves only internal files (a spare, or on btrfs the ready
    # snapshot of its next start), no image of its own
    assert all(
        "~spare." in name or "~ready." in name for name in tree(vm_dir(app))
    )
    await app.start()
    assert read_image(dirty(app), CHUNK) == data("T1")  # changes discarded
    await app.stop()


async def test_origin_snapshot_start_stop(pool):
    """snap_on_start + save_on_stop: starts from the source, keeps changes."""
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    volume = snapshot(pool, FakeVM("app"), template, save_on_stop=True)
    await volume.create()
    await volume.start()
    assert volume.is_dirty()
    assert read_image(dirty(volume), CHUNK) == data("T1")
    write_image(dirty(volume), data("mine"))
    dirty_ino = ino(dirty(volume))
    await volume.stop()
    assert not volume.is_dirty()
    assert ino(committed(volume)) == dirty_ino
    assert read_image(committed(volume), CHUNK) == data("mine")
    assert read_image(committed(template), CHUNK) == data("T1")
    path = await volume.export()
    try:
        assert read_image(path, CHUNK) == data("mine")
    finally:
        await volume.export_end(path)
    await volume.start()
    assert read_image(dirty(volume), CHUNK) == data("T1")
    await volume.stop()


async def test_volatile_start_stop(pool):
    volume = volatile(pool, FakeVM("work"), size=3 * MIB)
    await volume.create()
    await volume.start()
    st = os.stat(dirty(volume))
    assert st.st_size == 3 * MIB
    assert st.st_blocks == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert not volume.is_dirty()
    write_image(dirty(volume), data("swap"))
    await volume.stop()
    assert tree(vm_dir(volume)) == []
    await volume.start()
    assert read_image(dirty(volume), CHUNK) == bytes(CHUNK)
    assert os.stat(dirty(volume)).st_blocks == 0
    await volume.stop()
    assert tree(vm_dir(volume)) == []


# -- revisions, pruning, revert ----------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, 3])
async def test_revisions_and_pruning(pool, keep):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=keep)
    await volume.create()
    history = [bytes(CHUNK)]
    for index in range(5):
        history.append(data(f"gen{index}"))
        await cycle(volume, history[-1])
        files = revision_files(volume)
        assert len(files) == min(keep, index + 1)
        assert set(volume.revisions) == set(files)
    assert read_image(committed(volume), CHUNK) == history[-1]
    files = revision_files(volume)
    numbers = sorted(int(n) for n in files)
    # numbered 1..5 over the cycles; the newest `keep` are left
    assert numbers == list(range(6 - keep, 6))
    for number in numbers:
        path = os.path.join(vm_dir(volume), files[str(number)])
        # revision N holds the data committed before the N-th stop
        assert read_image(path, CHUNK) == history[number - 1]
        stamp = REVISION_NAME.match(files[str(number)])["ts"]
        assert stamp == isodate(int(os.stat(path).st_mtime))
        assert volume.revisions[str(number)] == stamp
    assert list(volume.revisions) == [str(n) for n in numbers]


async def test_revert_to_each_revision(pool):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=3)
    await volume.create()
    for index in range(1, 5):
        await cycle(volume, data(f"gen{index}"))
    model = {"2": data("gen1"), "3": data("gen2"), "4": data("gen3")}
    assert set(volume.revisions) == set(model)

    def check():
        files = revision_files(volume)
        assert set(files) == set(model) == set(volume.revisions)
        for rev_id, expected in model.items():
            path = os.path.join(vm_dir(volume), files[rev_id])
            assert read_image(path, CHUNK) == expected

    check()
    for target in ["3", "2", "4"]:
        before = read_image(committed(volume), CHUNK)
        before_ino = ino(committed(volume))
        target_ino = ino(
            os.path.join(vm_dir(volume), revision_files(volume)[target])
        )
        old_ids = set(volume.revisions)
        assert await volume.revert(target) is volume
        assert read_image(committed(volume), CHUNK) == model.pop(target)
        assert ino(committed(volume)) == target_ino
        (new_id,) = set(volume.revisions) - old_ids
        model[new_id] = before
        new_path = os.path.join(vm_dir(volume), revision_files(volume)[new_id])
        assert ino(new_path) == before_ino
        check()
    # a start after the reverts sees the reverted data
    await volume.start()
    assert read_image(dirty(volume), CHUNK) == data("gen3")
    await volume.stop()


async def test_revert_default_is_newest(pool):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=2)
    await volume.create()
    await cycle(volume, data("one"))
    await cycle(volume, data("two"))
    await volume.revert()
    assert read_image(committed(volume), CHUNK) == data("one")


BAD_REVISIONS = [
    "99",
    "0",
    "abc",
    "",
    " ",
    "../private.img",
    "1/../../x",
    "1; rm -rf /",
    "x" * 65,
    "1\n",
    "1\0",
    "2024-01-01T00:00:00",
    "private.img.1",
    "-1",
]


async def test_revert_bad_revision_changes_nothing(pool):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=2)
    await volume.create()
    await cycle(volume, data("one"))
    await cycle(volume, data("two"))
    before = await settled_tree(pool)
    for bad in BAD_REVISIONS:
        with pytest.raises(StoragePoolException):
            await volume.revert(bad)
        assert await settled_tree(pool) == before, bad


async def test_revert_without_revisions(pool):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=0)
    await volume.create()
    await cycle(volume, data("one"))
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException):
        await volume.revert()
    assert await settled_tree(pool) == before


def make_legacy(volume, stamp, payload):
    path = os.path.join(vm_dir(volume), f"{volume.name}.img@{stamp}Z")
    with open(path, "wb") as file:
        file.truncate(MIB)
        file.write(payload)
    return path


async def test_legacy_revisions(pool):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=2)
    await volume.create()
    old = make_legacy(volume, "2020-01-02T03:04:05", data("legacy1"))
    make_legacy(volume, "2021-01-02T03:04:05", data("legacy2"))
    assert volume.revisions == {
        "2020-01-02T03:04:05": "2020-01-02T03:04:05",
        "2021-01-02T03:04:05": "2021-01-02T03:04:05",
    }
    # revert to the older legacy revision
    old_ino = ino(old)
    await volume.revert("2020-01-02T03:04:05")
    assert read_image(committed(volume), CHUNK) == data("legacy1")
    assert ino(committed(volume)) == old_ino
    assert not os.path.exists(old)
    assert "2021-01-02T03:04:05" in volume.revisions
    (new_id,) = set(volume.revisions) - {"2021-01-02T03:04:05"}
    assert new_id == "1"  # numbered after the legacy ones (number 0)
    # a commit prunes the oldest: the remaining legacy revision
    await cycle(volume, data("new"))
    assert set(volume.revisions) == {"1", "2"}
    assert not any(
        "@" in n and ".img@" in n for n in os.listdir(vm_dir(volume))
    )


async def test_legacy_revision_pruned_to_zero(pool):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=0)
    await volume.create()
    make_legacy(volume, LEGACY_TS, data("legacy"))
    await cycle(volume, data("new"))
    assert volume.revisions == {}
    assert tree(vm_dir(volume)) == ["private.img"]


async def test_cow_files_never_touched(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    for name in ["private-cow.img", "private-cow.img.old", "root-cow.img"]:
        with open(os.path.join(vm_dir(volume), name), "wb") as file:
            file.write(data(name))
    before = {
        k: v for k, v in snapshot_tree(vm_dir(volume)).items() if "cow" in k
    }
    assert len(before) == 3
    await cycle(volume, data("one"))
    await cycle(volume, data("two"))
    await volume.revert()
    path = await volume.export()
    await volume.export_end(path)
    await volume.start()
    await volume.stop()
    await pool.wait_background()
    after = snapshot_tree(vm_dir(volume))
    assert {k: v for k, v in after.items() if "cow" in k} == before
    await volume.remove()
    assert snapshot_tree(vm_dir(volume)) == before


# -- is_dirty / is_outdated / running templates ---------------------------------


async def test_is_outdated(pool):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    app = snapshot(pool, FakeVM("app"), template)
    await app.create()
    assert not app.is_outdated()
    await app.start()
    assert not app.is_outdated()
    await template.start()
    assert not app.is_outdated()  # running template: nothing committed yet
    write_image(dirty(template), data("T2"))
    await template.stop()
    assert app.is_outdated()
    assert not template.is_outdated()
    assert read_image(dirty(app), CHUNK) == data("T1")
    await app.stop()
    assert not app.is_outdated()
    await app.start()
    assert not app.is_outdated()
    assert read_image(dirty(app), CHUNK) == data("T2")
    await app.stop()


async def test_snapshot_of_running_template(pool):
    """Never the template's running image: its committed data."""
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    await pool.wait_background()
    await template.start()
    write_image(dirty(template), data("RUNNING"))
    apps = [snapshot(pool, FakeVM(f"disp{i}"), template) for i in range(3)]
    for app in apps:
        await app.create()
        await app.start()
        assert read_image(dirty(app), CHUNK) == data("T1")
        assert ino(dirty(app)) not in (
            ino(dirty(template)),
            ino(committed(template)),
        )
    assert await template.verify()
    await template.stop()
    assert read_image(committed(template), CHUNK) == data("RUNNING")
    late = snapshot(pool, FakeVM("late"), template)
    await late.create()
    await late.start()
    assert read_image(dirty(late), CHUNK) == data("RUNNING")
    for app in apps:
        assert read_image(dirty(app), CHUNK) == data("T1")
        await app.stop()
    await late.stop()


# -- power loss, repeated stop ----------------------------------------------------


async def test_power_loss_origin_keeps_running_image(pool):
    vm = FakeVM("work")
    volume = origin(pool, vm)
    await volume.create()
    await cycle(volume, data("committed"))
    await volume.start()
    write_image(dirty(volume), data("unsaved"))
    dirty_ino = ino(dirty(volume))
    await pool.wait_background()
    # qubesd comes back: new objects, start() again without stop()
    again = ReflinkPool(
        name=pool.name, dir_path=pool.dir_path, setup_check="no"
    )
    volume2 = origin(again, vm)
    assert volume2.is_dirty()
    await volume2.start()
    assert ino(dirty(volume2)) == dirty_ino
    assert read_image(dirty(volume2), CHUNK) == data("unsaved")
    assert read_image(committed(volume2), CHUNK) == data("committed")
    await volume2.stop()
    assert read_image(committed(volume2), CHUNK) == data("unsaved")
    await again.wait_background()


async def test_power_loss_snapshot_and_volatile_restart_fresh(pool):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    app = snapshot(pool, FakeVM("app"), template)
    vol = volatile(pool, FakeVM("app"))
    for volume in (app, vol):
        await volume.create()
        await volume.start()
        write_image(dirty(volume), data("garbage"))
    await app.start()
    await vol.start()
    assert read_image(dirty(app), CHUNK) == data("T1")
    assert read_image(dirty(vol), CHUNK) == bytes(CHUNK)
    await app.stop()
    await vol.stop()


async def test_crash_recovery_stop_commits(pool):
    """qubesd calls stop() on volumes of VMs not running at its start."""
    vm = FakeVM("work")
    volume = origin(pool, vm)
    await volume.create()
    await volume.start()
    write_image(dirty(volume), data("unsaved"))
    again = ReflinkPool(
        name=pool.name, dir_path=pool.dir_path, setup_check="no"
    )
    await origin(again, vm).stop()
    assert read_image(committed(volume), CHUNK) == data("unsaved")
    assert not os.path.exists(dirty(volume))
    await again.wait_background()


@pytest.mark.parametrize("kind", ["origin", "snapshot", "volatile"])
async def test_stop_when_stopped_is_noop(pool, kind):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    vm = FakeVM("app")
    volume = {
        "origin": lambda: origin(pool, vm),
        "snapshot": lambda: snapshot(pool, vm, template),
        "volatile": lambda: volatile(pool, vm),
    }[kind]()
    await volume.create()
    await volume.stop()  # never started
    await volume.start()
    await volume.stop()
    before = await settled_tree(pool)
    for _ in range(2):
        assert await volume.stop() is volume
        assert await settled_tree(pool) == before


# -- snapshots disabled ----------------------------------------------------------


async def test_revisions_to_keep_minus_one(pool):
    volume = origin(pool, FakeVM("work"), revisions_to_keep="-1")
    assert volume.snapshots_disabled
    await volume.create()
    make_legacy(volume, LEGACY_TS, data("old"))
    write_image(committed(volume), data("before"))
    committed_ino = ino(committed(volume))
    await volume.start()
    # no committed copy while running: the running image is the only one
    assert not os.path.exists(committed(volume))
    assert ino(dirty(volume)) == committed_ino
    assert tree(vm_dir(volume)) == ["private-dirty.img"]
    assert read_image(dirty(volume), CHUNK) == data("before")
    with pytest.raises(StoragePoolException):
        await volume.export()
    assert tree(vm_dir(volume)) == ["private-dirty.img"]
    write_image(dirty(volume), data("after"))
    await volume.stop()
    assert ino(committed(volume)) == committed_ino
    assert tree(vm_dir(volume)) == ["private.img"]
    assert read_image(committed(volume), CHUNK) == data("after")
    assert volume.revisions == {}
    await pool.wait_background()
    assert tree(vm_dir(volume)) == ["private.img"]  # no spare either


# -- verify, remove, block_device, usage --------------------------------------------


async def test_verify(pool):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    app = snapshot(pool, FakeVM("app"), template)
    vol = volatile(pool, FakeVM("app"))
    assert await vol.verify()
    with pytest.raises(StoragePoolException, match="root.img"):
        await template.verify()
    with pytest.raises(StoragePoolException):
        await app.verify()
    await template.create()
    assert await template.verify()
    assert await app.verify()
    await template.start()
    assert await template.verify()
    await template.stop()
    os.unlink(committed(template))
    with pytest.raises(StoragePoolException):
        await template.verify()
    with pytest.raises(StoragePoolException):
        await app.verify()


@pytest.mark.parametrize("running", [False, True])
async def test_remove_leaves_nothing(pool, running):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    await cycle(template, data("T2"))
    vm = FakeVM("app")
    volumes = [
        origin(pool, vm),
        snapshot(pool, vm, template),
        volatile(pool, vm),
        snapshot(pool, vm, template, name="other", save_on_stop=True),
    ]
    for volume in volumes:
        await volume.create()
        await cycle(volume, data("x"))
        await volume.start()
        if not running:
            await volume.stop()
    await pool.wait_background()
    path = await volumes[0].export()
    await volumes[0].export_end(path)
    for volume in volumes:
        assert await volume.remove() is volume
    assert not os.path.exists(vm_dir(volumes[0]))
    assert not any(v in pool.list_volumes() for v in volumes)
    # the template is untouched
    assert read_image(committed(template), CHUNK) == data("T2")
    await template.remove()
    assert os.listdir(os.path.join(pool.root, "vm-templates")) == []
    assert os.listdir(os.path.join(pool.root, "appvms")) == []


async def test_block_device_read_only(pool):
    volume = origin(pool, FakeVM("work"), rw=False)
    await volume.create()
    await volume.start()
    device = volume.block_device()
    assert device.rw is False
    assert device.path == dirty(volume)
    assert os.path.isfile(device.path)
    await volume.stop()


async def test_usage(pool):
    volume = origin(pool, FakeVM("work"), size=4 * MIB)
    await volume.create()
    assert volume.usage == 0
    await volume.start()
    with open(dirty(volume), "r+b") as image:
        image.write(os.urandom(MIB))
        os.fsync(image.fileno())
    assert volume.usage >= MIB
    await volume.stop()
    assert volume.usage >= MIB


# -- reflinks and the sparse fallback -----------------------------------------------


async def test_reflink_used(reflink_dir, caplog):
    pool = await new_pool(reflink_dir)
    volume = origin(pool, FakeVM("work"), size=4 * MIB)
    await volume.create()
    await volume.start()
    with open(dirty(volume), "r+b") as image:
        image.write(os.urandom(2 * MIB))
        os.fsync(image.fileno())
    await volume.stop()
    await pool.wait_background()
    caplog.set_level(logging.INFO, logger="qubes.storage.reflink")
    await volume.start()
    # the running image shares its data with the committed image
    assert shared_bytes(dirty(volume), committed(volume)) >= 2 * MIB
    path = await volume.export()
    assert shared_bytes(path, committed(volume)) >= 2 * MIB
    await volume.export_end(path)
    assert not any("sparse copy" in r.getMessage() for r in caplog.records)
    # a write into the running image unshares only what it overwrote
    write_image(dirty(volume), os.urandom(CHUNK))
    shared = shared_bytes(dirty(volume), committed(volume))
    assert 2 * MIB - 2 * CHUNK <= shared < 2 * MIB
    await volume.stop()
    await pool.wait_background()


@pytest.mark.parametrize("at", [32 * MIB, 63 * MIB], ids=["hole", "data"])
async def test_sparse_fallback_keeps_holes(ext4_dir, caplog, at):
    """The copy where no reflink can be made skips holes, whether the
    image ends in a hole (the copy is sized first) or in data (it grows)."""
    assert fstype_of(ext4_dir) == "ext4"
    pool = await new_pool(ext4_dir, setup_check="no")
    caplog.set_level(logging.INFO, logger="qubes.storage.reflink")
    volume = origin(pool, FakeVM("work"), size=64 * MIB)
    await volume.create()
    await volume.start()
    payload = os.urandom(MIB)
    write_image(dirty(volume), payload, at)
    await volume.stop()
    await pool.wait_background()
    await volume.start()
    st = os.stat(dirty(volume))
    assert st.st_size == 64 * MIB
    assert st.st_blocks * 512 <= 2 * MIB
    assert shared_bytes(dirty(volume), committed(volume)) == 0  # a copy
    assert read_image(dirty(volume), MIB, at) == payload
    assert read_image(dirty(volume), MIB, 0) == bytes(MIB)
    path = await volume.export()
    assert os.stat(path).st_blocks * 512 <= 2 * MIB
    assert read_image(path, MIB, at) == payload
    await volume.export_end(path)
    assert any("sparse copy" in r.getMessage() for r in caplog.records)
    await volume.stop()
    await pool.wait_background()
