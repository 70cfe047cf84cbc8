"""Hostile input: every bad volume id, revision id, size, pool option or
planted link gets a clear StoragePoolException, and a snapshot of the
WHOLE test filesystem (paths, types, modes, sizes, inodes, link counts,
sha256 of contents, symlink targets) taken before and after shows that
nothing was created, changed or removed anywhere, inside or outside
dir_path.  Planted symbolic links are never followed out of dir_path:
their targets keep contents, inode and access time.

The number of hostile inputs tried is printed at the end of the run.
"""

import collections
import contextlib
import hashlib
import inspect
import os
import stat
import subprocess
import tempfile

import pytest

from helpers import (
    FakeVM,
    new_pool,
    origin,
    read_image,
    snapshot,
    volatile,
    write_image,
)
from qubes_reflink import ReflinkPool
from qubes_reflink.host import StoragePoolException

KIB = 1024
SIZE = 64 * KIB
SECRET = b"outside data that must never change\n" * 100
OLD_ATIME = 1_000_000_000  # 2001: relatime updates it on any read

#: hostile inputs tried, by category (printed at the end of the module)
COUNTS = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """Print how many hostile inputs were tried."""
    yield
    line = (
        f"hostile inputs tried: {sum(COUNTS.values())} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(COUNTS.items()))})"
    )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + line)


def _digest(path):
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        for chunk in iter(lambda: file.read(1024**2), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fs_state(root):
    """Everything below `root` (itself included), never following links:
    relative path -> (type, mode, inode, links, size, sha256 or target)."""
    state = {}
    for directory, dirs, files in os.walk(root):
        for name in [""] + dirs + files if directory == root else dirs + files:
            path = os.path.join(directory, name) if name else directory
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = "-> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = _digest(path)
            else:
                content = None
            state[os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_ino,
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                content,
            )
    return state


def assert_same_state(before, after):
    """Fail with the exact differences between two fs_state results."""
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(
        path for path in set(before) & set(after) if before[path] != after[path]
    )
    assert not (
        created or removed or changed
    ), f"created {created}, removed {removed}, changed {changed}"


def target_state(path):
    """Contents, inode, size and access time of a symlink's target."""
    st = os.lstat(path)
    return (_digest(path), st.st_ino, st.st_size, st.st_atime_ns)


def make_secret(path):
    """A file outside the pool, with an old access time (to catch reads)."""
    with open(path, "wb") as file:
        file.write(SECRET)
    os.utime(path, ns=(OLD_ATIME * 10**9, os.stat(path).st_mtime_ns))
    return path


async def refused(root, category, action, *words):
    """`action()` must raise StoragePoolException whose message contains
    `words`, and change nothing below `root` (the whole test filesystem)."""
    before = fs_state(root)
    with pytest.raises(StoragePoolException) as info:
        result = action()
        if inspect.isawaitable(result):
            await result
    COUNTS[category] += 1
    assert_same_state(before, fs_state(root))
    message = str(info.value)
    assert len(message) > 20, message
    for word in words:
        assert word in message, message
    return message


class World:
    """A pool on btrfs with a template, an AppVM (snapshot root, private
    with data and a revision, volatile), and files outside the pool."""

    # pylint: disable=too-many-instance-attributes
    def __init__(self, mount, base):
        self.mount = mount
        self.base = base
        self.pool = None
        self.outside = os.path.join(base, "outside")
        os.mkdir(self.outside)
        self.secret = make_secret(os.path.join(self.outside, "secret.img"))
        self.tpl = self.root = self.private = self.volatile = None

    async def build(self):
        """Create the pool and the volumes, commit some data, settle."""
        # a directory, not the subvolume setup() makes of a new dir_path
        # on btrfs: hard links from outside could not be planted into that
        os.mkdir(os.path.join(self.base, "pool"))
        self.pool = await new_pool(self.base, revisions_to_keep="2")
        self.volumes(self.pool)
        for volume in (self.tpl, self.private, self.volatile, self.root):
            await volume.create()
        for volume, tag in ((self.tpl, b"tpl"), (self.private, b"priv")):
            await volume.start()
            write_image(volume.path, tag * 100)
            await volume.stop()
        await self.pool.wait_background()
        return self

    def volumes(self, pool):
        """The volume objects of `pool` (as after a qubesd restart)."""
        self.tpl = origin(
            pool, FakeVM("tpl", "vm-templates"), name="root", size=SIZE
        )
        vm = FakeVM("work")
        self.root = snapshot(pool, vm, self.tpl)
        self.private = origin(pool, vm, size=SIZE)
        self.volatile = volatile(pool, vm, size=SIZE)

    def path(self, *parts):
        """A path below the pool directory."""
        return os.path.join(self.pool.root, *parts)


@pytest.fixture
async def world(mounts):
    """A fresh World on the session's btrfs; background work awaited."""
    mount = mounts("btrfs")
    base = tempfile.mkdtemp(prefix="hostile-", dir=mount)
    the_world = await World(mount, base).build()
    yield the_world
    await the_world.pool.wait_background()
    subprocess.run(["rm", "-rf", base], check=False)


# -- volume ids ---------------------------------------------------------

BAD_VIDS = [
    "appvms/../x",
    "appvms/work/../../../etc",
    "../appvms/work/private",
    "appvms/work/..",
    "appvms/work/.",
    "appvms/./private",
    "appvms/../private",
    "/etc/passwd",
    "/appvms/work/private",
    "appvms/work/private/",
    "appvms/work/private/extra",
    "appvms/work",
    "appvms//private",
    "appvms/work/",
    "",
    "private",
    "appvms/work/priv\0ate",
    "appvms/wo\0rk/private",
    "appvms/work/private\n",
    "appvms/work\n/private",
    "appvms/work/pri\nvate",
    "appvms/work/" + "a" * 4096,
    "appvms/" + "a" * 4096 + "/private",
    "appvms/work/" + "a" * 255,
    "dispvms/work/private",
    "vm-templates/../appvms/x",
    "servicevms/work/private",
    "appvms/work/private-dirty",
    "appvms/work/root-cow",
    "appvms/work/root-import",
    "appvms/work/root-precache",
    "appvms/work/root.img",
    "appvms/work/x~tmp.1",
    "appvms/work/private.img~spare.1-2-3",
    "appvms/work/private.img.1@2024-01-01T00:00:00Z",
    "appvms/work/private.img@2024-01-01T00:00:00Z",
    "appvms/work/private~base",
    "appvms/work/.private",
    "appvms/work/-private",
    "appvms/work/pri vate",
    "appvms/work/pri*",
    "appvms/work/privaté",
    "appvms/1work/private",
    "appvms/.work/private",
    "appvms/wo rk/private",
    "appvms/work/private\\x",
    b"appvms/work/private",
    None,
    5,
    ["appvms", "work", "private"],
]


# an empty vid means "the conventional one": not a bad vid
REFUSED_VIDS = [vid for vid in BAD_VIDS if vid not in ("", None)]


@pytest.mark.parametrize("vid", REFUSED_VIDS, ids=range(len(REFUSED_VIDS)))
async def test_bad_vid(world, vid):
    """A vid from qubes.xml that leaves the layout is refused."""
    config = {"name": "private", "vid": vid, "size": SIZE}
    config.update(save_on_stop=True, rw=True)
    await refused(
        world.mount,
        "volume id",
        lambda: world.pool.init_volume(FakeVM("work"), config),
        "volume",
    )


BAD_NAMES = [
    "..",
    ".",
    "../../etc",
    "a/b",
    "/abs",
    "x\0y",
    "x\ny",
    "a" * 4096,
    "",
    "private-dirty",
    "root-cow",
    "root-import",
    "root-precache",
    "root.img",
    "x~tmp.1",
    "private.img~export.abc",
    "private~base",
    "-x",
    "x y",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
async def test_bad_volume_name(world, name):
    """A volume name that would leave the layout or collide with the
    driver's own files is refused."""
    await refused(
        world.mount,
        "volume name",
        lambda: origin(world.pool, FakeVM("work"), name=name, size=SIZE),
    )


BAD_VM_NAMES = [
    "..",
    ".",
    "../..",
    "a/b",
    "/",
    "x\0y",
    "x\ny",
    "a" * 4096,
    "",
    "1vm",
    "-vm",
    ".vm",
    "vm~tmp.1",
]


@pytest.mark.parametrize("name", BAD_VM_NAMES, ids=range(len(BAD_VM_NAMES)))
@pytest.mark.parametrize("prefix", ["appvms", "vm-templates"])
async def test_bad_vm_name(world, name, prefix):
    """A VM name that would leave the layout is refused."""
    await refused(
        world.mount,
        "vm name",
        lambda: origin(world.pool, FakeVM(name, prefix), size=SIZE),
    )


@pytest.mark.parametrize(
    "prefix", ["dispvms", "", "..", "/", "appvms/..", None, "appvms/x"]
)
async def test_bad_dir_path_prefix(world, prefix):
    """Only appvms and vm-templates keep loop devices private."""
    await refused(
        world.mount,
        "dir prefix",
        lambda: origin(world.pool, FakeVM("work", prefix), size=SIZE),
        "prefix",
    )


# -- revision ids ---------------------------------------------------------

BAD_REVISIONS = [
    "99",
    "0",
    "2024-01-01T00:00:00",
    "",
    "1/../1",
    "../1",
    "/1",
    "1\0",
    "1\n",
    "1 ",
    " 1",
    "*",
    "1*",
    "?",
    "[1]",
    "1;rm -rf /",
    "1@2024",
    "1~tmp",
    "x" * 65,
    "1" * 4096,
    "é",
    1,
    1.0,
    b"1",
]


@pytest.mark.parametrize(
    "revision", BAD_REVISIONS, ids=range(len(BAD_REVISIONS))
)
async def test_bad_revision(world, revision):
    """Unknown or malformed revision ids are refused; nothing changes."""
    assert list(world.private.revisions) == ["1"]
    await refused(
        world.mount,
        "revision id",
        lambda: world.private.revert(revision),
        "revision",
    )


async def test_revert_without_revisions(world):
    """Reverting a volume that has no revision is refused."""
    await refused(world.mount, "revision id", world.volatile.revert, "revert")
    volume = origin(world.pool, FakeVM("work"), name="fresh", size=SIZE)
    await volume.create()
    await refused(world.mount, "revision id", volume.revert, "revision")


async def test_revert_ambiguous(world):
    """Two revision files with the same number: revert refuses as
    ambiguous and touches neither file (nor anything else)."""
    committed = world.path("appvms", "work", "private.img")
    for stamp, tag in (
        ("2020-01-01T00:00:00", b"one"),
        ("2021-01-01T00:00:00", b"two"),
    ):
        with open(f"{committed}.7@{stamp}Z", "wb") as file:
            file.write(tag * SIZE)
    assert "7" in world.private.revisions
    await refused(
        world.mount,
        "revision id",
        lambda: world.private.revert("7"),
        "ambiguous",
    )


async def test_revert_while_running(world):
    """A revert of a running volume to a revision it does not have is
    refused, and records nothing: the running image is kept."""
    await world.private.start()
    write_image(world.private.path, b"running")
    await world.pool.wait_background()
    await refused(
        world.mount, "revision id", lambda: world.private.revert("99"), "99"
    )
    await refused(
        world.mount,
        "revision id",
        lambda: world.private.revert("running"),
        "unknown revision",
    )


# -- sizes ------------------------------------------------------------------

BAD_SIZES = [
    -1,
    -(2**63),
    "-1",
    0,
    "0",
    "1.5",
    "abc",
    "",
    " ",
    "0x10",
    "1e3",
    "1_000",
    "١٢",
    None,
    1.5,
    float("nan"),
    True,
    [],
    2**63,
    2**64,
    str(2**64),
]


@pytest.mark.parametrize("size", BAD_SIZES, ids=range(len(BAD_SIZES)))
async def test_import_data_bad_size(world, size):
    """import_data() with a size that can't be an image is refused."""
    await refused(
        world.mount,
        "size",
        lambda: world.private.import_data(size),
        "size" if size not in (0, "0") else "bytes",
    )


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
@pytest.mark.parametrize("size", BAD_SIZES, ids=range(len(BAD_SIZES)))
async def test_resize_bad_size(world, size, running):
    """resize() to a size that can't be an image (0 included) is refused;
    shrinking is not (tests/test_resize.py)."""
    if running:
        await world.private.start()
        write_image(world.private.path, b"running data")
        await world.pool.wait_background()
    await refused(world.mount, "size", lambda: world.private.resize(size))


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
async def test_sizes_beyond_filesystem(mounts, running):
    """On ext4 (files of at most 16 TiB) a size beyond what the filesystem
    allows is a clear error that changes nothing."""
    mount = mounts("ext4")
    base = tempfile.mkdtemp(prefix="hostile-", dir=mount)
    try:
        pool = await new_pool(base, setup_check="no")
        volume = origin(pool, FakeVM("work"), size=SIZE)
        await volume.create()
        if running:
            await volume.start()
        await pool.wait_background()
        if not running:
            await refused(
                mount,
                "size",
                lambda: volume.import_data(2**62),
                "File too large",
            )
        for size in (2**62, 2**63 - 1):
            await refused(
                mount,
                "size",
                lambda size=size: volume.resize(size),
                "File too large",
            )
        await pool.wait_background()
    finally:
        subprocess.run(["rm", "-rf", base], check=False)


# -- pool options -----------------------------------------------------------

BAD_REVISIONS_TO_KEEP = [
    "abc",
    "1.5",
    "-5",
    "-2",
    "",
    " ",
    "1e3",
    "0x1",
    None,
    1.5,
    [],
    "True",
]


@pytest.mark.parametrize(
    "value", BAD_REVISIONS_TO_KEEP, ids=range(len(BAD_REVISIONS_TO_KEEP))
)
async def test_bad_revisions_to_keep(world, value):
    """Garbage revisions_to_keep: refused when the pool is made."""
    await refused(
        world.mount,
        "pool option",
        lambda: ReflinkPool(
            name="p", dir_path=world.path("x"), revisions_to_keep=value
        ),
        "revisions_to_keep",
    )
    await refused(
        world.mount,
        "pool option",
        lambda: origin(
            world.pool, FakeVM("work"), name="v", revisions_to_keep=value
        ),
        "revisions_to_keep",
    )


@pytest.mark.parametrize("option", ["setup_check", "ephemeral_volatile"])
@pytest.mark.parametrize("value", ["maybe", "", "2", None, 0.5])
async def test_bad_bool_option(world, option, value):
    """Garbage booleans: refused when the pool is made."""
    await refused(
        world.mount,
        "pool option",
        lambda: ReflinkPool(
            name="p", dir_path=world.path("x"), **{option: value}
        ),
        option,
    )


@pytest.mark.parametrize(
    "dir_path", ["", " ", "relative/pool", "pool", ".", "/x\0y", None, 5]
)
async def test_bad_dir_path_value(world, dir_path):
    """Empty, relative or non-string dir_path: refused at once."""
    await refused(
        world.mount,
        "dir_path",
        lambda: ReflinkPool(name="p", dir_path=dir_path),
        "dir_path",
    )


async def test_dir_path_not_a_directory(world):
    """dir_path naming a file, a link to a file, a dangling link, or a path
    through a file: setup() gives a clear error and creates nothing."""
    plain = world.secret
    to_file = os.path.join(world.outside, "to-file")
    os.symlink(plain, to_file)
    dangling = os.path.join(world.outside, "dangling")
    os.symlink(os.path.join(world.outside, "missing"), dangling)
    for dir_path in (plain, to_file, dangling):
        pool = ReflinkPool(name="p", dir_path=dir_path)
        await refused(world.mount, "dir_path", pool.setup, "dir_path")
    for dir_path in (
        os.path.join(plain, "sub"),
        os.path.join(plain, "sub", "pool"),
        os.path.join(to_file, "sub"),
    ):
        pool = ReflinkPool(name="p", dir_path=dir_path)
        message = await refused(world.mount, "dir_path", pool.setup)
        assert plain in message or to_file in message, message
    assert target_state(plain)[3] == OLD_ATIME * 10**9


@contextlib.contextmanager
def immutable(path):
    """`chattr +i path` for the duration of the block."""
    subprocess.run(["chattr", "+i", path], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


async def test_dir_path_unwritable(world):
    """An immutable parent, or an immutable empty dir_path: setup() gives
    a clear error and leaves nothing behind."""
    parent = os.path.join(world.base, "locked")
    os.mkdir(parent)
    empty = os.path.join(world.base, "empty")
    os.mkdir(empty)
    with immutable(parent):
        for dir_path in (
            os.path.join(parent, "pool"),
            os.path.join(parent, "a", "b", "pool"),
        ):
            pool = ReflinkPool(name="p", dir_path=dir_path)
            await refused(world.mount, "dir_path", pool.setup, "not permitted")
    with immutable(empty):
        pool = ReflinkPool(name="p", dir_path=empty)
        await refused(world.mount, "dir_path", pool.setup, "not permitted")


async def test_dir_path_read_only_mount(world):
    """A read-only bind mount as dir_path: setup() says so, changes nothing."""
    target = os.path.join(world.base, "ro")
    os.mkdir(target)
    subprocess.run(["mount", "--bind", target, target], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)
        pool = ReflinkPool(name="p", dir_path=os.path.join(target, "pool"))
        await refused(world.mount, "dir_path", pool.setup, "read-only")
        pool = ReflinkPool(name="p", dir_path=target)
        await refused(world.mount, "dir_path", pool.setup, "read-only")
    finally:
        subprocess.run(["umount", target], check=True)


async def test_dir_path_symlink_to_directory(world):
    """A dir_path that is a symlink to a directory elsewhere works: the
    driver works on the resolved directory and leaves the link alone."""
    real = os.path.join(world.outside, "real-pool")
    os.mkdir(real)
    link = os.path.join(world.base, "linked-pool")
    os.symlink(real, link)
    pool = ReflinkPool(name="linked", dir_path=link)
    await pool.setup()
    assert pool.root == real and pool.dir_path == link
    vm = FakeVM("work")
    volume = origin(pool, vm, size=SIZE)
    await volume.create()
    await volume.start()
    write_image(volume.path, b"through the link")
    await volume.stop()
    await pool.wait_background()
    assert os.readlink(link) == real
    assert read_image(
        os.path.join(real, "appvms", "work", "private.img"), 16
    ) == (b"through the link")
    # qubesd restart: a new pool object from the same config works too
    again = ReflinkPool(name="linked", dir_path=link)
    volume = origin(again, vm, size=SIZE)
    assert list(volume.revisions) == ["1"]
    await volume.revert()
    await volume.remove()
    await again.wait_background()
    assert os.path.islink(link) and os.path.isdir(real)


# -- planted links ----------------------------------------------------------


async def try_everything(world, volume, others=()):
    """Run every lifecycle call on `volume` (and start/stop on `others`),
    accepting only success or StoragePoolException; return the errors."""
    errors = []

    async def attempt(what, coro_fn):
        try:
            await coro_fn()
        except StoragePoolException as err:
            errors.append((what, str(err)))
        await world.pool.wait_background()

    async def export_cycle():
        path = await volume.export()
        read_image(path, SIZE)
        await volume.export_end(path)

    async def import_cycle():
        path = await volume.import_data(SIZE)
        write_image(path, b"imported")
        await volume.import_data_end(True)

    async def clone_cycle():
        clone = origin(world.pool, FakeVM("clone"), size=SIZE)
        await clone.create()
        await clone.import_volume(volume)
        await clone.remove()

    async def clone_into():
        await volume.import_volume(world.tpl)

    async def start_write_resize_stop():
        await volume.start()
        if os.path.isfile(volume.path) and not os.path.islink(volume.path):
            write_image(volume.path, b"vm writes")
        await volume.resize(2 * SIZE)
        await volume.stop()

    steps = [
        ("verify", volume.verify),
        ("start", volume.start),
        ("resize running", lambda: volume.resize(SIZE * 3)),
        ("stop", volume.stop),
        ("export", export_cycle),
        ("revert", volume.revert),
        ("revert 1", lambda: volume.revert("1")),
        ("resize", lambda: volume.resize(SIZE * 4)),
        ("import", import_cycle),
        ("clone from", clone_cycle),
        ("clone into", clone_into),
        ("cycle", start_write_resize_stop),
        ("stop again", volume.stop),
    ]
    for other in others:
        steps += [("start other", other.start), ("stop other", other.stop)]
    steps += [("remove", volume.remove), ("create", volume.create)]
    for what, coro_fn in steps:
        await attempt(what, coro_fn)
        # properties never raise and never follow links either
        _ = (volume.size, volume.usage, volume.revisions, volume.is_dirty())
    return errors


def outside_state(world):
    """Everything on the filesystem except the pool directory."""
    state = fs_state(world.mount)
    pool_rel = os.path.relpath(world.pool.root, world.mount)
    return {
        path: value
        for path, value in state.items()
        if path != pool_rel and not path.startswith(pool_rel + os.sep)
    }


@pytest.fixture
def ext4_secret(mounts):
    """A file on another filesystem (ext4), as a symlink target."""
    base = tempfile.mkdtemp(prefix="hostile-", dir=mounts("ext4"))
    yield make_secret(os.path.join(base, "secret.img"))
    subprocess.run(["rm", "-rf", base], check=False)


PLANTED_FILES = [
    "private.img",
    "private-dirty.img",
    "private.img~tmp.planted",
    "private.img~export.planted",
    "private.img~import.planted",
    "private.img.1@2020-01-01T00:00:00Z",
    "private.img.9@2020-01-01T00:00:00Z",
    "private.img@2019-01-01T00:00:00Z",
    "private.img~base",
    "root-dirty.img",
    "root.img~base",
    "volatile-dirty.img",
]


@pytest.mark.parametrize("planted", PLANTED_FILES)
@pytest.mark.parametrize("where", ["same-fs", "ext4"])
async def test_planted_symlink(world, ext4_secret, planted, where):
    """A symlink planted where a driver file goes is never followed: its
    target keeps contents, inode and access time, nothing outside the pool
    changes, and whatever the driver does ends in success or a clear
    StoragePoolException."""
    target = world.secret if where == "same-fs" else ext4_secret
    link = world.path("appvms", "work", planted)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(target, link)
    COUNTS["planted symlink"] += 1
    before_target = target_state(target)
    before_outside = outside_state(world)
    volume = {"root": world.root, "volatile": world.volatile}.get(
        planted.split("-")[0].split(".")[0], world.private
    )
    await try_everything(world, volume, others=[world.root, world.private])
    assert target_state(target) == before_target
    assert_same_state(before_outside, outside_state(world))


async def test_planted_spare_symlink(world):
    """A symlink planted under the name of the spare the next start takes
    is not attached to the VM."""
    await world.private.start()
    await world.private.stop()
    await world.pool.wait_background()
    directory = world.path("appvms", "work")
    spares = [n for n in os.listdir(directory) if "private.img~spare." in n]
    assert len(spares) == 1
    spare = os.path.join(directory, spares[0])
    os.unlink(spare)
    os.symlink(world.secret, spare)
    before = target_state(world.secret)
    outside = outside_state(world)
    COUNTS["planted symlink"] += 1
    try:
        await world.private.start()
    except StoragePoolException:
        pass
    else:
        assert not os.path.islink(world.private.block_device().path)
        assert read_image(world.private.path, 3) == b"pri"
    await world.private.stop()
    assert target_state(world.secret) == before
    assert_same_state(outside, outside_state(world))


@pytest.mark.parametrize("level", ["vm", "prefix"])
async def test_planted_directory_symlink(world, level):
    """appvms/<vm> (or appvms itself) a symlink to a directory elsewhere:
    every operation is refused and nothing there is read, written or
    removed."""
    elsewhere = os.path.join(world.outside, "elsewhere")
    os.mkdir(elsewhere)
    for name in ("private.img", "private.img.1@2020-01-01T00:00:00Z"):
        make_secret(os.path.join(elsewhere, name))
    make_secret(os.path.join(elsewhere, "private.img~tmp.stale"))
    if level == "vm":
        os.symlink(elsewhere, world.path("appvms", "victim"))
        vm = FakeVM("victim")
    else:
        os.rename(world.path("appvms"), world.path("appvms.real"))
        os.symlink(elsewhere, world.path("appvms"))
        vm = FakeVM("elsewhere-vm")
        os.mkdir(os.path.join(elsewhere, "elsewhere-vm"))
        for name in ("private.img", "private.img.1@2020-01-01T00:00:00Z"):
            make_secret(os.path.join(elsewhere, "elsewhere-vm", name))
    volume = origin(world.pool, vm, size=SIZE)
    before = fs_state(world.mount)
    atimes = {
        path: os.lstat(os.path.join(directory, name)).st_atime_ns
        for directory, _dirs, files in os.walk(elsewhere)
        for name in files
        for path in [os.path.join(directory, name)]
    }
    calls = [
        volume.create,
        volume.start,
        volume.stop,
        volume.export,
        volume.revert,
        lambda: volume.revert("1"),
        lambda: volume.resize(2 * SIZE),
        lambda: volume.import_data(SIZE),
        lambda: volume.import_volume(world.tpl),
        volume.remove,
    ]
    for call in calls:
        COUNTS["planted directory symlink"] += 1
        with pytest.raises(StoragePoolException):
            await call()
        await world.pool.wait_background()
    assert_same_state(before, fs_state(world.mount))
    for path, atime in atimes.items():
        assert os.lstat(path).st_atime_ns == atime, path


@pytest.mark.parametrize(
    "planted", ["private.img", "private.img.1@2020-01-01T00:00:00Z"]
)
async def test_planted_hard_link(world, planted):
    """A hard link from a committed image or revision to a file outside:
    committed data is never changed in place, so the outside file keeps
    its contents whatever the driver does."""
    link = world.path("appvms", "work", planted)
    if os.path.lexists(link):
        os.unlink(link)
    os.link(world.secret, link)
    COUNTS["planted hard link"] += 1
    before = _digest(world.secret)
    await try_everything(world, world.private, others=[world.root])
    assert _digest(world.secret) == before
    assert os.stat(world.secret).st_size == len(SECRET)


@pytest.mark.parametrize("kind", ["hard link", "symlink"])
async def test_planted_running_image_link(world, kind):
    """A running image that is a link to a file outside the pool is not
    handed to a VM (it would write into the outside file), nor grown."""
    link = world.path("appvms", "work", "private-dirty.img")
    if kind == "symlink":
        os.symlink(world.secret, link)
    else:
        os.link(world.secret, link)
    COUNTS[f"planted {kind}"] += 1
    before = _digest(world.secret)
    with pytest.raises(StoragePoolException):
        await world.private.start()
    with pytest.raises(StoragePoolException):
        await world.private.resize(4 * SIZE)
    assert _digest(world.secret) == before
    assert os.stat(world.secret).st_size == len(SECRET)
