"""Snapshot volumes started from btrfs subvolume snapshots (subvolumes.py).

On btrfs, an AppVM's root (and a DispVM's root and private) starts as one
snapshot of its source's read-only snapbase subvolume and stops by
destroying it; elsewhere, or where the ioctls are refused, the start
clones as before, saying why once.  All on real loop-mounted filesystems.
"""

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile

import pytest

from helpers import (
    FakeVM,
    committed,
    data,
    new_pool,
    origin,
    read_image,
    snapshot,
    tree,
    write_image,
)
from loopfs import loop_filesystem
from qubes_reflink import ReflinkPool, btrfs, cli, fileops, layout

MIB = 1024**2


async def template(pool, tag="A", name="tpl"):
    """A template root committed with `tag`, background work done."""
    tpl = origin(pool, FakeVM(name, "vm-templates"), "root")
    await tpl.create()
    await commit(tpl, tag)
    return tpl


async def commit(volume, tag):
    """Start `volume`, write `tag`, stop; background work done."""
    await volume.start()
    write_image(volume.path, data(tag))
    await volume.stop()
    await volume.pool.wait_background()


async def appvms(pool, tpl, count):
    """`count` created AppVM roots of `tpl`, background work done."""
    roots = [snapshot(pool, FakeVM(f"app{i}"), tpl) for i in range(count)]
    for root in roots:
        await root.create()
    await pool.wait_background()
    return roots


def snapbases(volume):
    """The snapbase subvolumes in `volume`'s directory."""
    return sorted(
        layout.VolumeFiles(volume.pool.root, volume.vid)
        .scan()
        .snapbases.values()
    )


class Steps:
    """Records the mutating steps of the driver (fileops and btrfs)."""

    def __init__(self):
        self.names = []

    def __call__(self, step, phase, _paths):
        if phase == "before":
            self.names.append(step)


@pytest.fixture
def steps():
    """The steps made while the test runs."""
    recorder = Steps()
    previous = fileops.set_step_hook(recorder)
    yield recorder
    fileops.set_step_hook(previous)


# -- the primitives --------------------------------------------------------


def test_btrfs_snapshot_primitives(btrfs_dir):
    """create, snapshot (writable and read-only), destroy, is_subvolume."""
    base = os.path.join(btrfs_dir, "base")
    btrfs.create(base)
    with open(os.path.join(base, "f"), "wb") as file:
        file.write(b"x" * 4096)
    frozen = os.path.join(btrfs_dir, "frozen")
    btrfs.snapshot(base, frozen, read_only=True)
    copy = os.path.join(btrfs_dir, "copy")
    btrfs.snapshot(frozen, copy)
    with open(os.path.join(copy, "f"), "r+b") as file:
        file.write(b"y")
    assert read_image(os.path.join(frozen, "f"), 2) == b"xx"
    assert read_image(os.path.join(copy, "f"), 2) == b"yx"
    with pytest.raises(OSError) as err:
        open(os.path.join(frozen, "f"), "r+b").close()
    assert err.value.errno == 30  # EROFS
    assert all(btrfs.is_subvolume(p) for p in (base, frozen, copy))
    os.mkdir(os.path.join(btrfs_dir, "plain"))
    assert not btrfs.is_subvolume(os.path.join(btrfs_dir, "plain"))
    with pytest.raises(OSError, match="not a btrfs subvolume"):
        btrfs.destroy(os.path.join(btrfs_dir, "plain"))
    for path in (copy, frozen, base):
        btrfs.destroy(path)
    btrfs.destroy(base)  # missing is fine
    assert sorted(os.listdir(btrfs_dir)) == ["plain"]


@pytest.mark.parametrize("fs_dir", ["xfs", "ext4"], indirect=True)
def test_subvolume_ioctls_refused_elsewhere(fs_dir):
    """Not btrfs: the ioctl is refused with an errno subvolumes.py takes
    for "no subvolumes here"."""
    with pytest.raises(OSError) as err:
        btrfs.create(os.path.join(fs_dir, "base"))
    assert err.value.errno in btrfs.UNSUPPORTED


# -- starts and stops ----------------------------------------------------------


def readies(volume):
    """The ready snapshots in `volume`'s directory, by source version."""
    files = layout.VolumeFiles(volume.pool.root, volume.vid)
    return files.scan().readies


async def test_start_renames_the_ready_snapshot_stop_destroys_it(
    btrfs_dir, steps
):
    """A stopped AppVM keeps a ready snapshot of its template's snapbase:
    its start renames it into place (no snapshot, no clone, no copy). The
    running image lives in a subvolume in the AppVM's directory, holds the
    template's committed data, and is the VM's own; the stop destroys it,
    and a new ready snapshot is made in the background."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    (ready,) = readies(root).values()
    steps.names.clear()
    await root.start()
    assert "rename" in steps.names
    for costly in ("subvolume-snapshot", "clone", "copy"):
        assert costly not in steps.names
    assert not os.path.exists(ready)
    running = os.path.join(pool.root, "appvms/app0/root.img~running")
    assert btrfs.is_subvolume(running)
    assert root.path == os.path.join(running, "image.img")
    assert root.block_device().path == root.path
    assert read_image(root.path, 3) == b"<A>"
    write_image(root.path, b"VM!")
    assert read_image(committed(tpl), 3) == b"<A>"
    assert (os.stat(root.path).st_mode & 0o7777) == 0o600
    steps.names.clear()
    await root.stop()
    await pool.wait_background()
    assert "clone" not in steps.names and "copy" not in steps.names
    assert not os.path.exists(running)
    assert list(readies(root)) == [layout.spare_key(os.stat(committed(tpl)))]
    await pool.close()


async def test_start_without_ready_snapshots_the_snapbase(btrfs_dir, steps):
    """No ready snapshot (taken by a start a moment ago, or not made yet):
    the start is one snapshot of the snapbase, still no clone."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    for path in readies(root).values():
        btrfs.destroy(path)
    steps.names.clear()
    await root.start()
    assert steps.names.count("subvolume-snapshot") == 1
    assert "clone" not in steps.names and "copy" not in steps.names
    assert read_image(root.path, 3) == b"<A>"
    await root.stop()
    await pool.close()


async def test_snapbase_destroyed_during_a_start(btrfs_dir):
    """The template's snapbase goes (a newer version's background work
    destroys it) just as a start snapshots it: the start falls back to
    the template's spare or a clone, and the AppVM gets the template's
    committed data, on the real ioctls."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    for path in readies(root).values():
        btrfs.destroy(path)
    (snapbase,) = snapbases(tpl)
    gone = []

    def destroy_first(step, phase, paths):
        if (step, phase) == ("subvolume-snapshot", "before") and not gone:
            if paths[0] == snapbase:
                gone.append(snapbase)
                btrfs.destroy(snapbase)

    previous = fileops.set_step_hook(destroy_first)
    try:
        await root.start()
    finally:
        fileops.set_step_hook(previous)
    assert gone and not os.path.exists(snapbase)
    assert read_image(root.path, 3) == b"<A>"
    write_image(root.path, b"VM!")
    assert read_image(committed(tpl), 3) == b"<A>"
    await root.stop()
    await pool.wait_background()
    assert snapbases(tpl)  # made again for the next starts
    await pool.close()


async def test_many_start_together_each_its_own(btrfs_dir, steps):
    """Forty AppVMs started at once: forty renames of their ready
    snapshots, no snapshot and no clone on the way, each VM writing only
    its own image."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    roots = await appvms(pool, tpl, 40)
    steps.names.clear()
    await asyncio.gather(*(root.start() for root in roots))
    assert steps.names.count("rename") == 40
    # the next starts' ready snapshots, made in the background meanwhile
    assert steps.names.count("subvolume-snapshot") <= 40
    assert "clone" not in steps.names
    for number, root in enumerate(roots):
        write_image(root.path, f"{number:03}".encode())
    for number, root in enumerate(roots):
        assert read_image(root.path, 3) == f"{number:03}".encode()
    await asyncio.gather(*(root.stop() for root in roots))
    await pool.wait_background()
    assert read_image(committed(tpl), 3) == b"<A>"
    await pool.close()


async def test_dispvm_root_and_private(btrfs_dir):
    """A DispVM's root and private start as snapshots of the template's
    and of its AppVM's snapbases; the AppVM's private is untouched."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    private = origin(pool, FakeVM("dvm"), "private")
    await private.create()
    await commit(private, "P")
    disp = FakeVM("disp1")
    volumes = [
        snapshot(pool, disp, tpl, "root"),
        snapshot(pool, disp, private, "private"),
    ]
    for volume in volumes:
        await volume.create()
    await pool.wait_background()
    await asyncio.gather(*(volume.start() for volume in volumes))
    assert [read_image(v.path, 3) for v in volumes] == [b"<A>", b"<P>"]
    assert all(btrfs.is_subvolume(os.path.dirname(v.path)) for v in volumes)
    write_image(volumes[1].path, b"dsp")
    await asyncio.gather(*(volume.stop() for volume in volumes))
    await pool.wait_background()
    assert read_image(committed(private), 3) == b"<P>"
    await pool.close()


async def test_first_start_clones_then_snapbase_is_made(btrfs_dir, steps):
    """Without a snapbase (a source no snapshot volume started from yet in
    this qubesd) the start clones; the snapbase is made in the background
    and the next start snapshots it."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    root = snapshot(pool, FakeVM("app"), tpl)  # created by an older driver
    fileops.make_dirs(os.path.dirname(committed(root)))
    await pool.close()
    pool = ReflinkPool(name="test-pool", dir_path=pool.dir_path)
    tpl = origin(pool, FakeVM("tpl", "vm-templates"), "root")
    root = snapshot(pool, FakeVM("app"), tpl)
    assert snapbases(tpl) == []
    await root.start()
    assert not btrfs.is_subvolume(os.path.dirname(root.path))
    assert read_image(root.path, 3) == b"<A>"
    await root.stop()
    await pool.wait_background()
    assert len(snapbases(tpl)) == 1
    await root.start()
    assert btrfs.is_subvolume(os.path.dirname(root.path))
    await root.stop()
    await pool.close()


async def test_snapbase_once_per_commit(btrfs_dir):
    """Each commit of the template makes one new snapbase (read-only, its
    committed data) and destroys the older; a running AppVM keeps the data
    it started with and is outdated; its next start has the new data."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    (first,) = snapbases(tpl)
    await root.start()
    await commit(tpl, "B")
    (second,) = snapbases(tpl)
    assert second != first and not os.path.exists(first)
    image = os.path.join(second, "image.img")
    assert read_image(image, 3) == b"<B>"
    with pytest.raises(OSError):
        open(image, "r+b").close()
    assert read_image(root.path, 3) == b"<A>"
    assert root.is_outdated()
    # its ready snapshot is of the new version already
    assert list(readies(root)) == [layout.spare_key(os.stat(committed(tpl)))]
    await root.stop()
    await root.start()
    assert read_image(root.path, 3) == b"<B>" and not root.is_outdated()
    await root.stop()
    await pool.close()


async def test_resize_running_grows_the_image_in_its_subvolume(btrfs_dir):
    """A running snapshot volume's resize grows the image the VM has."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    await root.start()
    await root.resize(4 * MIB)
    assert os.path.getsize(root.path) == 4 * MIB
    assert root.size == 4 * MIB
    await root.stop()
    await pool.close()


async def test_renewal_asked_for_during_a_removal_makes_nothing(btrfs_dir):
    """A template's new snapbase renews its AppVMs' ready snapshots; one
    asked for while an AppVM's root is being removed must make nothing in
    the directory its other volumes are leaving (found by the long model
    run: the VM directory stayed, holding a ready snapshot)."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    vm = FakeVM("app")
    root = snapshot(pool, vm, tpl)
    private = origin(pool, vm)
    for volume in (root, private):
        await volume.create()
    await pool.wait_background()
    removal = asyncio.create_task(root.remove())
    while not pool.background.live(root.vid).lock.locked():
        await asyncio.sleep(0)
    pool.background.want(root)  # as the template's renewal would
    await removal
    await private.remove()
    await pool.wait_background()
    assert not os.path.lexists(os.path.join(pool.root, "appvms", "app"))
    await pool.close()


_REFUSED_LIFE = """
import asyncio, json, os, sys
from helpers import FakeVM, new_pool, origin, snapshot, read_image, write_image
from qubes_reflink import btrfs, fileops

async def run(volume, data):
    await volume.start()
    write_image(volume.path, data)
    await volume.stop()

async def main(top):
    probe = os.path.join(top, "probe")
    btrfs.create(probe)
    try:
        btrfs._destroy_ioctl(os.open(top, os.O_RDONLY), probe)
        refused = False
    except PermissionError:
        refused = True
    btrfs.destroy(probe)
    pool = await new_pool(top)
    tpl = origin(pool, FakeVM("tpl", "vm-templates"), "root")
    await tpl.create()
    await run(tpl, b"<A>")
    root = snapshot(pool, FakeVM("app"), tpl)
    await root.create()
    await pool.wait_background()
    seen = []
    for data in (b"<B>", b"<C>"):
        await root.start()
        seen.append(read_image(root.path, 3).decode())
        write_image(root.path, b"VM!")
        await root.stop()
        await run(tpl, data)
        await pool.wait_background()
    await root.remove()
    await tpl.remove()
    await pool.wait_background()
    await pool.close()
    left = [os.path.relpath(os.path.join(d, n), pool.root)
            for d, dirs, files in os.walk(pool.root) for n in dirs + files]
    print(json.dumps({"refused": refused, "seen": seen, "left": left,
                      "probe": os.path.exists(probe)}))

asyncio.run(main(sys.argv[1]))
"""


def test_destroy_refused_by_the_kernel_for_real(btrfs_dir, tmp_path):
    """In a user namespace root has no CAP_SYS_ADMIN over the filesystem:
    btrfs creates and snapshots subvolumes there but refuses to destroy
    them (EPERM), for real.  Stops, a template's new snapbase (read-only)
    and removals still destroy theirs (emptied and removed as directories,
    as their owner may), and AppVMs still start from their template's
    data."""
    top = tempfile.mkdtemp(dir=btrfs_dir)
    os.chmod(top, 0o755)
    script = tmp_path / "life.py"
    script.write_text(_REFUSED_LIFE)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            sys.executable,
            str(script),
            top,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["refused"], "the kernel did not refuse: nothing tested"
    assert not outcome["probe"]
    assert outcome["seen"] == ["<A>", "<B>"]
    assert sorted(outcome["left"]) == ["appvms", "vm-templates"]


async def test_remove_destroys_the_subvolumes(btrfs_dir):
    """Removing the template and its AppVM leaves no subvolume behind."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    await root.start()
    await root.remove()
    await tpl.remove()
    await pool.wait_background()
    assert tree(pool.root) == []
    assert os.listdir(os.path.join(pool.root, "vm-templates")) == []
    await pool.close()


# -- recovery ------------------------------------------------------------------


async def test_restart_after_crash_destroys_leftovers(btrfs_dir):
    """qubesd restarts after a crash while an AppVM ran and a snapbase was
    half made: the recovery stop destroys the running subvolume, the
    template's next operation the unfinished snapbase."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    await root.start()
    files = layout.VolumeFiles(pool.root, tpl.vid)
    btrfs.create(files.snaptemp())
    await pool.close()
    pool = ReflinkPool(name="test-pool", dir_path=pool.dir_path)
    tpl = origin(pool, FakeVM("tpl", "vm-templates"), "root")
    root = snapshot(pool, FakeVM("app0"), tpl)
    await root.stop()
    await tpl.stop()
    await pool.wait_background()
    listing = files.scan()
    assert listing.snaptemps == [] and len(listing.snapbases) == 1
    assert os.listdir(os.path.join(pool.root, "appvms", "app0")) == []
    await pool.close()


# -- where subvolumes can't be used ------------------------------------------------


@pytest.mark.parametrize("fs_dir", ["xfs", "ext4"], indirect=True)
async def test_fallback_to_clones_logged_once(fs_dir, caplog):
    """No btrfs: starts clone, as before, and the pool says why once."""
    caplog.set_level(logging.INFO, "qubes.storage.reflink")
    pool = await new_pool(fs_dir, setup_check="no")
    tpl = await template(pool)
    roots = await appvms(pool, tpl, 3)
    for _round in range(2):
        await asyncio.gather(*(root.start() for root in roots))
        assert [read_image(r.path, 3) for r in roots] == [b"<A>"] * 3
        await asyncio.gather(*(root.stop() for root in roots))
        await pool.wait_background()
    warnings = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "reflink clones instead" in warnings[0].getMessage()
    assert pool.subvolumes.refused
    assert snapbases(tpl) == []
    await pool.close()


@pytest.mark.parametrize("kind", ["subvolume", "mount point"])
async def test_dir_path_a_subvolume_or_a_mount_point(btrfs_dir, kind):
    """dir_path itself a subvolume, or a btrfs mounted right there: the
    snapshots are made and the committed images stay plain files."""
    top = os.path.join(btrfs_dir, "top")
    if kind == "subvolume":
        btrfs.create(top)

        def cleanup():  # the pool's own subvolume first (setup() made it)
            btrfs.destroy(os.path.join(top, "pool"))
            btrfs.destroy(top)

    else:
        os.mkdir(top)
        device = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", "--target", btrfs_dir],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        subprocess.run(["mount", device, top], check=True)
        cleanup = lambda: subprocess.run(["umount", top], check=True)  # noqa
    try:
        pool = await new_pool(top)
        tpl = await template(pool)
        (root,) = await appvms(pool, tpl, 1)
        await root.start()
        assert btrfs.is_subvolume(os.path.dirname(root.path))
        assert read_image(root.path, 3) == b"<A>"
        await root.stop()
        await root.remove()
        await tpl.remove()
        await pool.wait_background()
        await pool.close()
    finally:
        cleanup()


# -- the tool and the way back -------------------------------------------------


def run(capsys, *argv):
    """(exit code, stdout) of qubes-reflink with `argv`."""
    code = cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr().out


async def test_status_fsck_and_du_know_the_subvolumes(btrfs_dir, capsys):
    """status shows a running AppVM from its subvolume, fsck finds nothing
    wrong with a healthy pool, du measures the images in subvolumes."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    (root,) = await appvms(pool, tpl, 1)
    await root.start()
    code, out = run(capsys, "--json", "status", pool.root)
    status = {v["vid"]: v for v in json.loads(out)["volumes"]}
    assert code == 0 and status["appvms/app0/root"]["running"]
    assert status["appvms/app0/root"]["dirty"]["path"] == root.path
    assert run(capsys, "fsck", pool.root) == (0, "0 problems\n")
    code, out = run(capsys, "--json", "du", pool.root)
    paths = {f["path"] for v in json.loads(out)["volumes"] for f in v["files"]}
    assert root.path in paths
    assert os.path.join(snapbases(tpl)[0], "image.img") in paths
    await root.stop()
    await pool.close()


async def test_switching_back_removes_every_subvolume(btrfs_dir, capsys):
    """fsck --remove-subvolumes lists, with --repair removes, every
    subvolume: what is left is the plain layout of the file driver, with
    the committed images untouched."""
    pool = await new_pool(btrfs_dir)
    tpl = await template(pool)
    roots = await appvms(pool, tpl, 2)
    await roots[0].start()
    await pool.close()  # qubesd stopped (the VM died with it)
    before = os.stat(committed(tpl))
    code, out = run(capsys, "fsck", "--remove-subvolumes", pool.root)
    assert code == 1 and "--repair --remove-subvolumes removes it" in out
    code, out = run(
        capsys, "fsck", "--repair", "--remove-subvolumes", "--force", pool.root
    )
    assert code == 0, out
    names = tree(pool.root)
    assert not any("~snapbase" in n or "~running" in n for n in names)
    assert all(layout.classify(os.path.basename(n)) for n in names)
    after = os.stat(committed(tpl))
    assert (after.st_ino, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
    )
    assert read_image(committed(tpl), 3) == b"<A>"


async def test_source_in_a_pool_on_another_btrfs(btrfs_dir, tmp_path):
    """A template in a pool on another btrfs filesystem: a snapshot can't
    cross filesystems (EXDEV), so the AppVM's root is copied, and its own
    pool keeps using subvolumes for the volumes it can."""
    with loop_filesystem("btrfs", parent=str(tmp_path)) as other:
        far = await new_pool(other)
        tpl = await template(far)
        near = await new_pool(btrfs_dir, setup_check="no")
        root = snapshot(near, FakeVM("app"), tpl)
        await root.create()
        await far.wait_background()
        await near.wait_background()
        await root.start()
        assert read_image(root.path, 3) == b"<A>"
        assert not btrfs.is_subvolume(os.path.dirname(root.path))
        await root.stop()
        assert near.subvolumes.usable
        local = await template(near, "L", name="local")
        (mine,) = await appvms(near, local, 1)
        await mine.start()
        assert btrfs.is_subvolume(os.path.dirname(mine.path))
        await mine.stop()
        for pool in (near, far):
            await pool.wait_background()
            await pool.close()
