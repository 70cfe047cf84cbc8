"""Data in and out of volumes: export, import_data, import_volume."""

import os

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
    vm_dir,
    volatile,
    write_image,
)
from qubes_reflink.host import StoragePoolException

CHUNK = 64 * 1024


def internal_files(volume, kind):
    """This volume's files of internal kind `kind` (export, import, tmp)."""
    return [
        name
        for name in os.listdir(vm_dir(volume))
        if name.startswith(f"{volume.name}.img~{kind}.")
    ]


async def cycle(volume, payload, offset=0):
    await volume.start()
    write_image(volume.block_device().path, payload, offset)
    await volume.stop()


async def settled_tree(pool):
    await pool.wait_background()
    return snapshot_tree(pool.root)


# -- export ------------------------------------------------------------------


async def test_export_while_running_is_pre_start_data(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await cycle(volume, data("v1"))
    await volume.start()
    write_image(dirty(volume), data("running"))
    path = await volume.export()
    assert os.path.basename(path).startswith("private.img~export.")
    assert os.path.dirname(path) == vm_dir(volume)
    assert read_image(path, CHUNK) == data("v1")
    assert os.stat(path).st_size == MIB
    assert os.stat(path).st_ino not in (
        os.stat(committed(volume)).st_ino,
        os.stat(dirty(volume)).st_ino,
    )
    # the VM stops and commits: the export does not change
    await volume.stop()
    await pool.wait_background()
    assert read_image(committed(volume), CHUNK) == data("running")
    assert read_image(path, CHUNK) == data("v1")
    # a revert does not change it either
    await volume.revert("2")
    assert read_image(committed(volume), CHUNK) == data("v1")
    await cycle(volume, data("v3"))
    assert read_image(path, CHUNK) == data("v1")
    await volume.export_end(path)
    assert not os.path.exists(path)
    assert internal_files(volume, "export") == []


async def test_export_survives_revert_and_remove(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await cycle(volume, data("v1"))
    await cycle(volume, data("v2"))
    path = await volume.export()
    await volume.revert()
    assert read_image(committed(volume), CHUNK) == data("v1")
    assert read_image(path, CHUNK) == data("v2")
    await volume.remove()
    assert not os.path.exists(committed(volume))
    assert read_image(path, CHUNK) == data("v2")  # a backup still reads it
    await volume.export_end(path)
    assert (
        not os.path.exists(vm_dir(volume)) or os.listdir(vm_dir(volume)) == []
    )


async def test_several_exports_independent(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await cycle(volume, data("v1"))
    first = await volume.export()
    await cycle(volume, data("v2"))
    second = await volume.export()
    third = await volume.export()
    assert len({first, second, third}) == 3
    inodes = {os.stat(p).st_ino for p in (first, second, third)}
    assert len(inodes) == 3
    assert read_image(first, CHUNK) == data("v1")
    assert read_image(second, CHUNK) == data("v2")
    await volume.export_end(second)
    assert not os.path.exists(second)
    assert read_image(third, CHUNK) == data("v2")
    # stop/start of the VM leaves exports in use alone
    await cycle(volume, data("v3"))
    assert read_image(first, CHUNK) == data("v1")
    assert read_image(third, CHUNK) == data("v2")
    await volume.export_end(first)
    await volume.export_end(third)
    assert internal_files(volume, "export") == []


async def test_export_end_unknown_path(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    path = await volume.export()
    before = await settled_tree(pool)
    for bad in [
        committed(volume),
        path + "x",
        "/etc/passwd",
        os.path.join(vm_dir(volume), "private.img~export.nothere"),
    ]:
        with pytest.raises(StoragePoolException):
            await volume.export_end(bad)
    assert await settled_tree(pool) == before
    await volume.export_end(path)
    with pytest.raises(StoragePoolException):
        await volume.export_end(path)  # twice
    assert os.path.exists(committed(volume))


async def test_export_of_snapshot_and_volatile(pool):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await cycle(template, data("T1"))
    app = snapshot(pool, FakeVM("app"), template)
    await app.create()
    await app.start()
    write_image(dirty(app), data("app-running"))
    path = await app.export()
    assert read_image(path, CHUNK) == data("T1")
    await app.export_end(path)
    await app.stop()
    vol = volatile(pool, FakeVM("app"))
    await vol.create()
    with pytest.raises(StoragePoolException, match="volatile"):
        await vol.export()


@pytest.mark.parametrize("operation", ["start", "stop", "remove"])
async def test_stale_exports_removed(pool, operation):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await cycle(volume, data("v1"))
    live = await volume.export()
    stale = os.path.join(vm_dir(volume), "private.img~export.x")
    stale_import = os.path.join(vm_dir(volume), "private.img~import.y")
    stale_tmp = os.path.join(vm_dir(volume), "private.img~tmp.z")
    other = os.path.join(vm_dir(volume), "other.img~export.x")
    for path in (stale, stale_import, stale_tmp, other):
        with open(path, "wb") as file:
            file.write(b"left by a crash")
    await getattr(volume, operation)()
    assert not os.path.exists(stale)
    assert not os.path.exists(stale_import)
    assert not os.path.exists(stale_tmp)
    assert os.path.exists(other)  # another volume's: not ours to remove
    assert read_image(live, CHUNK) == data("v1")  # in use: kept
    await volume.export_end(live)
    if operation == "start":
        await volume.stop()


async def test_stale_exports_from_previous_qubesd(pool):
    """Exports of a qubesd that died are garbage for the next one."""
    from qubes_reflink import ReflinkPool  # pylint: disable=C0415

    volume = origin(pool, FakeVM("work"))
    await volume.create()
    path = await volume.export()
    again = ReflinkPool(name=pool.name, dir_path=pool.dir_path)
    await origin(again, FakeVM("work")).stop()
    assert not os.path.exists(path)
    await again.wait_background()


# -- import_data -----------------------------------------------------------------


@pytest.mark.parametrize("size", [MIB, 2 * MIB])
async def test_import_data(pool, size):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await cycle(volume, data("old"))
    old_ino = os.stat(committed(volume)).st_ino
    path = await volume.import_data(size)
    assert os.path.basename(path).startswith("private.img~import.")
    assert os.stat(path).st_size == size
    assert os.stat(path).st_blocks == 0
    write_image(path, data("imported"), size - CHUNK)
    assert read_image(committed(volume), CHUNK) == data("old")
    assert await volume.import_data_end(True) is volume
    assert not os.path.exists(path)
    assert read_image(committed(volume), CHUNK, size - CHUNK) == data(
        "imported"
    )
    assert os.stat(committed(volume)).st_size == size
    assert volume.size == size
    # the old data is a revision
    revisions = [
        os.path.join(vm_dir(volume), n)
        for n in os.listdir(vm_dir(volume))
        if "@" in n
    ]
    assert old_ino in {os.stat(p).st_ino for p in revisions}
    await volume.start()
    assert read_image(dirty(volume), CHUNK, size - CHUNK) == data("imported")
    await volume.stop()


async def test_import_data_failed(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await cycle(volume, data("old"))
    before = await settled_tree(pool)
    path = await volume.import_data(MIB)
    write_image(path, data("half"))
    await volume.import_data_end(False)
    assert not os.path.exists(path)
    assert await settled_tree(pool) == before
    with pytest.raises(StoragePoolException):
        await volume.import_data_end(True)  # none in progress
    assert await settled_tree(pool) == before


@pytest.mark.parametrize("size", [0, -1, "-1", "abc", 1.5])
async def test_import_data_bad_size(pool, size):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException):
        await volume.import_data(size)
    assert await settled_tree(pool) == before
    with pytest.raises(StoragePoolException):
        await volume.import_data_end(True)


async def test_import_data_refusals(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    path = await volume.import_data(MIB)
    with pytest.raises(StoragePoolException, match="in progress"):
        await volume.import_data(MIB)
    await volume.import_data_end(False)
    assert not os.path.exists(path)
    await volume.start()
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException, match="running"):
        await volume.import_data(MIB)
    assert await settled_tree(pool) == before
    await volume.stop()
    vol = volatile(pool, FakeVM("work"))
    await vol.create()
    with pytest.raises(StoragePoolException):
        await vol.import_data(MIB)


# -- import_volume -------------------------------------------------------------------


async def test_import_volume_same_pool(pool):
    src = origin(pool, FakeVM("src"), size=2 * MIB)
    await src.create()
    await cycle(src, os.urandom(MIB), 0)
    expected = read_image(committed(src), 2 * MIB)
    dst = origin(pool, FakeVM("dst"), size=2 * MIB)
    await dst.create()
    assert await dst.import_volume(src) is dst
    assert read_image(committed(dst), 2 * MIB) == expected
    assert os.stat(committed(dst)).st_ino != os.stat(committed(src)).st_ino
    if fstype_of(pool.root) in ("btrfs", "xfs"):
        assert shared_bytes(committed(dst), committed(src)) >= MIB
    # source untouched, no leftovers on either side
    assert read_image(committed(src), 2 * MIB) == expected
    for volume in (src, dst):
        for kind in ("export", "tmp", "import"):
            assert internal_files(volume, kind) == []
    await dst.start()
    assert read_image(dirty(dst), 2 * MIB) == expected
    await dst.stop()


async def test_import_volume_from_running_source(pool):
    src = origin(pool, FakeVM("src"))
    await src.create()
    await cycle(src, data("committed"))
    await src.start()
    write_image(dirty(src), data("running"))
    dst = origin(pool, FakeVM("dst"))
    await dst.create()
    await dst.import_volume(src)
    assert read_image(committed(dst), CHUNK) == data("committed")
    await src.stop()


async def test_import_volume_snapshots_disabled_running_source(pool):
    src = origin(pool, FakeVM("src"), revisions_to_keep=-1)
    await src.create()
    await src.start()
    dst = origin(pool, FakeVM("dst"))
    await dst.create()
    write_image(committed(dst), data("dst-old"))
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException):
        await dst.import_volume(src)
    assert await settled_tree(pool) == before
    await src.stop()


@pytest.mark.parametrize(
    "src_fs, dst_fs", [("btrfs", "xfs"), ("ext4", "btrfs"), ("xfs", "ext4")]
)
async def test_import_volume_across_filesystems(mounts, src_fs, dst_fs):
    import tempfile  # pylint: disable=import-outside-toplevel
    import shutil  # pylint: disable=import-outside-toplevel

    dirs = [tempfile.mkdtemp(dir=mounts(fs)) for fs in (src_fs, dst_fs)]
    try:
        src_pool = await new_pool(dirs[0], name="src", setup_check="no")
        dst_pool = await new_pool(dirs[1], name="dst", setup_check="no")
        src = origin(src_pool, FakeVM("src"), size=64 * MIB)
        await src.create()
        payload = os.urandom(MIB)
        await cycle(src, payload, 16 * MIB)
        dst = origin(dst_pool, FakeVM("dst"), size=MIB)
        await dst.create()
        await dst.import_volume(src)
        st = os.stat(committed(dst))
        assert st.st_size == 64 * MIB
        assert st.st_blocks * 512 <= 3 * MIB  # holes kept
        assert read_image(committed(dst), MIB, 16 * MIB) == payload
        assert read_image(committed(dst), MIB, 0) == bytes(MIB)
        # the source's export was ended: no snapshot left behind
        assert internal_files(src, "export") == []
        assert internal_files(dst, "tmp") == []
        await src_pool.wait_background()
        await dst_pool.wait_background()
    finally:
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)


class BrokenSource:
    """A volume of another driver whose export fails."""

    def __init__(self, path=None):
        self.path = path
        self.ended = []

    async def export(self):
        if self.path is None:
            raise StoragePoolException("export failed")
        return self.path

    async def export_end(self, path):
        self.ended.append(path)


@pytest.mark.parametrize("path", [None, "/nonexistent/image", "dir"])
async def test_import_volume_failure_keeps_data(pool, path):
    dst = origin(pool, FakeVM("dst"))
    await dst.create()
    await cycle(dst, data("precious"))
    if path == "dir":
        path = vm_dir(dst)  # a directory: reading it fails
    source = BrokenSource(path)
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException):
        await dst.import_volume(source)
    assert await settled_tree(pool) == before
    assert read_image(committed(dst), CHUNK) == data("precious")
    assert source.ended == ([path] if path else [])
    for kind in ("tmp", "import", "export"):
        assert internal_files(dst, kind) == []


async def test_import_volume_refused_while_running(pool):
    src = origin(pool, FakeVM("src"))
    await src.create()
    dst = origin(pool, FakeVM("dst"))
    await dst.create()
    await dst.start()
    write_image(dirty(dst), data("running"))
    before = await settled_tree(pool)
    with pytest.raises(StoragePoolException, match="running"):
        await dst.import_volume(src)
    assert await settled_tree(pool) == before
    await dst.stop()


async def test_import_volume_into_non_origin_is_noop(pool):
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    src = origin(pool, FakeVM("src"))
    await src.create()
    app = snapshot(pool, FakeVM("app"), template)
    vol = volatile(pool, FakeVM("app"))
    for volume in (app, vol):
        await volume.create()
        before = await settled_tree(pool)
        assert await volume.import_volume(src) is volume
        assert await settled_tree(pool) == before


async def test_remove_during_import_leaves_nothing(pool):
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    path = await volume.import_data(MIB)
    write_image(path, data("half"))
    await volume.remove()
    assert not os.path.exists(path)
    assert not os.path.exists(vm_dir(volume))
    with pytest.raises(StoragePoolException):
        await volume.import_data_end(True)
    assert not os.path.exists(vm_dir(volume))
