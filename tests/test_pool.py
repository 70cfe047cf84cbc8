"""The pool: setup() on real filesystems, usage, introspection, entry point."""

import importlib.metadata
import inspect
import os

import pytest

from conftest import fstype_of
from helpers import MIB, FakeVM, new_pool, origin, tree
from qubes_reflink import ReflinkPool
from qubes_reflink.host import StoragePoolException


async def test_setup_creates_dirs(reflink_dir):
    dir_path = os.path.join(reflink_dir, "a", "b", "pool")
    pool = ReflinkPool(name="p", dir_path=dir_path)
    assert not os.path.exists(dir_path)
    result = await pool.setup()
    assert result is pool
    for sub in ("appvms", "vm-templates"):
        assert os.path.isdir(os.path.join(dir_path, sub))
    # no probe or other file left behind
    assert tree(dir_path) == []
    assert sorted(os.listdir(dir_path)) == ["appvms", "vm-templates"]


async def test_setup_idempotent(reflink_dir):
    pool = await new_pool(reflink_dir)
    vm = FakeVM("work")
    volume = origin(pool, vm)
    await volume.create()
    before = tree(pool.dir_path)
    await pool.setup()
    await ReflinkPool(name="again", dir_path=pool.dir_path).setup()
    assert tree(pool.dir_path) == before
    await pool.wait_background()


async def test_setup_refuses_ext4(ext4_dir):
    dir_path = os.path.join(ext4_dir, "new", "pool")
    pool = ReflinkPool(name="p", dir_path=dir_path)
    with pytest.raises(StoragePoolException) as info:
        await pool.setup()
    message = str(info.value)
    assert "reflink" in message
    assert "setup_check=no" in message
    # what it created is gone again, the directory it did not create stays
    assert not os.path.exists(os.path.join(ext4_dir, "new"))
    assert os.listdir(ext4_dir) == []


async def test_setup_refuses_ext4_keeps_existing_dir(ext4_dir):
    dir_path = os.path.join(ext4_dir, "pool")
    os.mkdir(dir_path)
    with open(os.path.join(dir_path, "mine"), "w", encoding="ascii") as mine:
        mine.write("user data")
    with pytest.raises(StoragePoolException, match="setup_check=no"):
        await ReflinkPool(name="p", dir_path=dir_path).setup()
    assert os.listdir(dir_path) == ["mine"]

    empty = os.path.join(ext4_dir, "empty")
    os.mkdir(empty)
    with pytest.raises(StoragePoolException):
        await ReflinkPool(name="p", dir_path=empty).setup()
    assert os.path.isdir(empty)
    assert os.listdir(empty) == []


@pytest.mark.parametrize("word", ["no", "False", "off", "0", False])
async def test_setup_check_off_works_on_ext4(ext4_dir, word):
    pool = await new_pool(ext4_dir, setup_check=word)
    assert pool.setup_check is False
    assert sorted(os.listdir(pool.dir_path)) == ["appvms", "vm-templates"]
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    assert os.path.isfile(
        os.path.join(pool.dir_path, "appvms/work/private.img")
    )
    await pool.wait_background()


async def test_dir_path_regular_file(btrfs_dir):
    path = os.path.join(btrfs_dir, "file")
    with open(path, "w", encoding="ascii") as file:
        file.write("x")
    with pytest.raises(StoragePoolException) as info:
        await ReflinkPool(name="p", dir_path=path).setup()
    assert "not a directory" in str(info.value)
    assert path in str(info.value)
    with open(path, encoding="ascii") as file:
        assert file.read() == "x"


async def test_dir_path_below_regular_file(btrfs_dir):
    path = os.path.join(btrfs_dir, "file")
    with open(path, "w", encoding="ascii") as file:
        file.write("x")
    with pytest.raises(StoragePoolException):
        await ReflinkPool(name="p", dir_path=path + "/pool").setup()
    assert os.listdir(btrfs_dir) == ["file"]


async def test_dir_path_symlink_to_dir(reflink_dir):
    real = os.path.join(reflink_dir, "real")
    os.mkdir(real)
    link = os.path.join(reflink_dir, "link")
    os.symlink(real, link)
    pool = ReflinkPool(name="p", dir_path=link)
    await pool.setup()
    assert pool.config["dir_path"] == link
    assert pool.root == os.path.realpath(real)
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await volume.start()
    assert os.path.isfile(os.path.join(real, "appvms/work/private.img"))
    assert os.path.realpath(volume.block_device().path) == os.path.join(
        os.path.realpath(real), "appvms/work/private-dirty.img"
    )
    assert os.path.islink(link)
    await volume.stop()
    await pool.wait_background()


async def test_size_and_usage(any_dir):
    pool = await new_pool(any_dir, setup_check="no")
    stats = os.statvfs(pool.dir_path)
    assert pool.size == stats.f_blocks * stats.f_frsize
    assert 0 < pool.usage <= pool.size
    details = pool.usage_details
    assert details["data_size"] == pool.size
    assert 0 < details["data_usage"] <= details["data_size"]
    # writing real data makes usage grow
    volume = origin(pool, FakeVM("work"), size=4 * MIB)
    await volume.create()
    before = pool.usage
    path = os.path.join(pool.root, "appvms/work/private.img")
    with open(path, "r+b") as image:
        image.write(os.urandom(4 * MIB))
    os.sync()  # btrfs updates its free space when the transaction commits
    assert pool.usage > before
    await pool.wait_background()


async def test_size_of_missing_dir(btrfs_dir):
    pool = ReflinkPool(name="p", dir_path=os.path.join(btrfs_dir, "nope"))
    assert pool.size is None
    assert pool.usage is None


def test_driver_parameters_introspection():
    """What qvm-pool shows: keyword-only params except self/name."""
    signature = inspect.signature(ReflinkPool.__init__)
    params = {
        name: param
        for name, param in signature.parameters.items()
        if name not in ("self", "name", "kwargs")
    }
    assert set(params) == {
        "dir_path",
        "revisions_to_keep",
        "setup_check",
        "ephemeral_volatile",
        "keep_revision_older_than",
        "auto_defrag",
        "defrag_threshold",
        "defrag_interval",
    }
    for param in params.values():
        assert param.kind == inspect.Parameter.KEYWORD_ONLY
    assert params["dir_path"].default is inspect.Parameter.empty
    assert params["revisions_to_keep"].default == 1
    assert params["setup_check"].default is True
    assert params["ephemeral_volatile"].default is False
    assert params["auto_defrag"].default is True
    assert params["defrag_threshold"].default == 2048
    assert params["defrag_interval"].default == 86400
    assert signature.parameters["name"].kind == inspect.Parameter.KEYWORD_ONLY


def test_entry_point():
    found = [
        ep
        for ep in importlib.metadata.entry_points(group="qubes.storage")
        if ep.name == "file-reflink"
    ]
    assert len(found) == 1, found
    assert found[0].load() is ReflinkPool
    pool = found[0].load()(name="p", dir_path="/var/lib/x")
    assert pool.config["driver"] == "file-reflink"
    assert pool.driver == "file-reflink"


async def test_filesystems_are_what_they_claim(any_dir):
    """The fixtures really give btrfs, XFS and ext4."""
    assert fstype_of(any_dir) in ("btrfs", "xfs", "ext4")


async def test_destroy_leaves_files(btrfs_dir):
    pool = await new_pool(btrfs_dir)
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await pool.destroy()
    assert os.path.isfile(os.path.join(pool.root, "appvms/work/private.img"))


async def test_list_and_get_volumes(btrfs_dir):
    pool = await new_pool(btrfs_dir)
    private = origin(pool, FakeVM("work"))
    assert pool.list_volumes() == [private]
    assert pool.get_volume("appvms/work/private") is private
    assert list(pool.volumes) == [private]
    assert pool.volumes["appvms/work/private"] is private
    assert "appvms/work/private" in pool.volumes
    await private.create()
    await private.remove()
    assert pool.list_volumes() == []
    await pool.wait_background()
