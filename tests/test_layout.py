"""File names of the pool layout, and volume ids that must be refused."""

import os

import pytest

from helpers import FakeVM, new_pool, tree
from qubes_reflink import layout
from qubes_reflink.host import StoragePoolException

TS = "2024-05-06T07:08:09"


@pytest.mark.parametrize(
    "filename, kind, detail",
    [
        ("private.img", layout.COMMITTED, ""),
        ("root.img", layout.COMMITTED, ""),
        ("private-dirty.img", layout.DIRTY, ""),
        (f"private.img.1@{TS}Z", layout.REVISION, "1"),
        (f"private.img.42@{TS}Z", layout.REVISION, "42"),
        (f"private.img@{TS}Z", layout.REVISION, TS),
        ("private.img~tmp.abc123", layout.TEMP, "abc123"),
        ("private.img~export.0f0f", layout.EXPORT, "0f0f"),
        ("private.img~import.beef", layout.IMPORT, "beef"),
        ("private.img~spare.12-345-678", layout.SPARE, "12-345-678"),
        ("private.img~base", layout.BASE, ""),
        ("private.img~base.12-345-678", layout.BASE, "12-345-678"),
        ("private.img~snapbase.12-345-678", layout.SNAPBASE, "12-345-678"),
        ("private.img~snaptmp.abc123", layout.SNAPTEMP, "abc123"),
        ("private.img~running", layout.RUNNING, ""),
        ("private-cow.img", layout.COW, ""),
        ("private-cow.img.old", layout.COW, ""),
        ("private-precache.img", layout.CORE_LEFTOVER, "precache"),
        ("private-import.img", layout.CORE_LEFTOVER, "import"),
    ],
)
def test_classify(filename, kind, detail):
    entry = layout.classify(filename)
    assert entry is not None, filename
    assert entry.volume == "private" if "private" in filename else "root"
    assert entry.kind == kind
    assert entry.detail == detail


@pytest.mark.parametrize(
    "filename",
    [
        "private",
        "private.img.bak",
        "private.img.1",
        f"private.img.1@{TS}",  # no Z
        f"private.img.x@{TS}Z",
        "private.img@2024-05-06Z",
        "private.img~unknown.abc",
        "private.img~tmp.",
        "private.img~tmp.a/b",
        "private.img\n",
        "private.img~base\n",
        "private.img~base.",
        "private.img~running.x",
        "private.img~snapbase.",
        ".private.img",
        "",
    ],
)
def test_classify_unknown(filename):
    assert layout.classify(filename) is None


def test_internal_names_never_look_like_images():
    files = layout.VolumeFiles("/pool", "appvms/vm/private")
    for path in [
        files.temp(),
        files.export(),
        files.import_target(),
        files.spare("1-2-3"),
        files.base,
    ]:
        entry = layout.classify(os.path.basename(path))
        assert entry.volume == "private"
        assert entry.kind not in (
            layout.COMMITTED,
            layout.DIRTY,
            layout.REVISION,
        )
        assert "~" in os.path.basename(path)
        # they still match the udev patterns */appvms/*/*.img*
        assert path.startswith("/pool/appvms/vm/private.img")


def test_volume_file_paths():
    files = layout.VolumeFiles("/pool", "vm-templates/fedora/root")
    assert files.committed == "/pool/vm-templates/fedora/root.img"
    assert files.dirty == "/pool/vm-templates/fedora/root-dirty.img"
    assert (
        files.revision(3, TS) == f"/pool/vm-templates/fedora/root.img.3@{TS}Z"
    )
    assert layout.classify(os.path.basename(files.revision(3, TS))) == (
        layout.Entry("root", layout.REVISION, "3")
    )


def test_fresh_temp_names_differ():
    files = layout.VolumeFiles("/pool", "appvms/vm/private")
    assert len({files.temp() for _ in range(50)}) == 50
    assert len({files.export() for _ in range(50)}) == 50


BAD_VIDS = [
    "appvms/../private",
    "appvms/vm/../../etc",
    "../appvms/vm/private",
    "appvms/vm/..",
    "appvms/../../x",
    "/etc/passwd",
    "/appvms/vm/private",
    "appvms/vm/priv\0ate",
    "appvms/vm\0/private",
    "appvms/vm/private\n",
    "appvms/vm\n/private",
    "appvms/vm/" + "a" * 4096,
    "appvms/" + "v" * 4096 + "/private",
    "a" * 4096,
    "servicevms/vm/private",
    "vm/private",
    "appvms/vm",
    "appvms/vm/private/extra",
    "appvms//private",
    "appvms/vm/",
    "vm-templates/vm/private-dirty",
    "appvms/vm/private-cow",
    "appvms/vm/root-import",
    "appvms/vm/root-precache",
    "appvms/vm/private.img",
    "appvms/vm/priv~ate",
    "appvms/.vm/private",
    "",
]


@pytest.mark.parametrize("vid", BAD_VIDS)
def test_check_vid_refuses(vid):
    with pytest.raises(layout.LayoutError):
        layout.check_vid(vid)


@pytest.mark.parametrize(
    "vid",
    [
        "appvms/work/private",
        "vm-templates/fedora-40-xfce/root",
        "appvms/disp1234/volatile",
        "appvms/sys-net/kernel",
        "appvms/a.b_c-d/my_vol-2",
    ],
)
def test_check_vid_accepts(vid):
    assert layout.check_vid(vid) == vid


def test_check_vid_non_string():
    with pytest.raises(layout.LayoutError):
        layout.check_vid(None)


async def test_init_volume_refuses_bad_vids(btrfs_dir):
    pool = await new_pool(btrfs_dir)
    vm = FakeVM("work")
    before = tree(btrfs_dir)
    dirs_before = sorted(d for d, _sub, _f in os.walk(btrfs_dir))
    for vid in BAD_VIDS:
        if not vid:
            continue  # an empty vid means "the conventional one"
        with pytest.raises(StoragePoolException):
            pool.init_volume(
                vm, {"name": "private", "vid": vid, "save_on_stop": True}
            )
    assert pool.list_volumes() == []
    assert tree(btrfs_dir) == before
    assert sorted(d for d, _sub, _f in os.walk(btrfs_dir)) == dirs_before
    await pool.wait_background()


@pytest.mark.parametrize(
    "name",
    ["../x", "/abs", "a/b", "x\0", "x\n", "n" * 4096, "private-dirty", ".."],
)
async def test_init_volume_refuses_bad_names(btrfs_dir, name):
    pool = await new_pool(btrfs_dir)
    before = tree(btrfs_dir)
    with pytest.raises(StoragePoolException):
        pool.init_volume(FakeVM("work"), {"name": name, "save_on_stop": True})
    assert tree(btrfs_dir) == before
    assert pool.list_volumes() == []


@pytest.mark.parametrize(
    "vm_name", ["../evil", "a/b", "/abs", "vm\n", "v" * 4096, ""]
)
async def test_init_volume_refuses_bad_vm_names(btrfs_dir, vm_name):
    pool = await new_pool(btrfs_dir)
    with pytest.raises(StoragePoolException):
        pool.init_volume(FakeVM(vm_name), {"name": "private"})
    assert pool.list_volumes() == []


@pytest.mark.parametrize(
    "prefix", ["servicevms", "", None, "..", "/", "appvms/..", "AppVMs"]
)
async def test_init_volume_fails_closed_on_prefix(btrfs_dir, prefix):
    """Only appvms/vm-templates keep loop devices hidden from other qubes."""
    pool = await new_pool(btrfs_dir)
    before = tree(btrfs_dir)
    with pytest.raises(StoragePoolException, match="prefix"):
        pool.init_volume(FakeVM("work", prefix), {"name": "private"})
    # even with a well-formed vid given explicitly
    with pytest.raises(StoragePoolException):
        pool.init_volume(
            FakeVM("work", prefix),
            {"name": "private", "vid": "appvms/work/private"},
        )
    assert tree(btrfs_dir) == before
    assert pool.list_volumes() == []


async def test_init_volume_vm_without_prefix(btrfs_dir):
    pool = await new_pool(btrfs_dir)

    class Bare:  # pylint: disable=too-few-public-methods
        name = "work"

    with pytest.raises(StoragePoolException):
        pool.init_volume(Bare(), {"name": "private"})


async def test_init_volume_good_vid_touches_nothing(btrfs_dir):
    pool = await new_pool(btrfs_dir)
    before = tree(btrfs_dir)
    volume = pool.init_volume(
        FakeVM("fedora", "vm-templates"), {"name": "root", "save_on_stop": True}
    )
    assert volume.vid == "vm-templates/fedora/root"
    assert tree(btrfs_dir) == before
    assert not os.path.exists(os.path.join(pool.root, "vm-templates/fedora"))
    assert pool.get_volume("vm-templates/fedora/root") is volume
    with pytest.raises(KeyError):
        pool.get_volume("appvms/nope/root")
