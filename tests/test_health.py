"""Pool health: btrfs metadata in usage_details, the warnings of
``qubes-reflink check``, and the pool directory as a subvolume of its own.
All on real loop-mounted filesystems; btrfs-progs' own figures are the
reference where there is one."""

import errno
import fcntl
import os
import random
import struct
import subprocess

import pytest

from helpers import FakeVM, new_pool, origin, run_tool_json
from loopfs import loop_filesystem
from qubes_reflink import btrfs, cli, health

MIB = 1024**2
FS_IOC_SETFLAGS = 0x40086602


def btrfs_metadata(path):
    """(total, used) of the metadata as `btrfs filesystem df -b` says."""
    out = subprocess.run(
        ["btrfs", "filesystem", "df", "-b", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Metadata"):
            fields = dict(
                part.strip().split("=")
                for part in line.split(":")[1].split(",")
            )
            return int(fields["total"]), int(fields["used"])
    raise AssertionError(out)


async def test_usage_details_has_btrfs_metadata(btrfs_dir):
    pool = await new_pool(btrfs_dir)
    details = pool.usage_details
    total, used = btrfs_metadata(pool.root)
    assert details["metadata_size"] == total
    # the metadata changes as btrfs commits: within a few blocks of it
    assert abs(details["metadata_usage"] - used) <= 1 * MIB
    assert details["data_size"] == pool.size
    assert details["data_usage"] == pool.usage
    await pool.close()


async def test_usage_details_elsewhere_is_data_only(xfs_dir):
    pool = await new_pool(xfs_dir)
    assert sorted(pool.usage_details) == ["data_size", "data_usage"]
    await pool.close()


async def test_new_dir_path_on_btrfs_is_a_subvolume(btrfs_dir, capsys):
    pool = await new_pool(btrfs_dir)  # dir_path did not exist
    assert btrfs.is_subvolume(pool.root)
    code, report = run_tool_json(capsys, "check", pool.root)
    assert code == 0 and report["subvolume"] is True
    # an existing directory stays what it is
    existing = os.path.join(btrfs_dir, "existing")
    os.makedirs(os.path.join(existing, "pool"))
    other = await new_pool(existing, name="other")
    assert not btrfs.is_subvolume(other.root)
    code, report = run_tool_json(capsys, "check", other.root)
    assert report["subvolume"] is False
    cli.main(["check", other.root])
    assert "is not a btrfs subvolume of its own" in capsys.readouterr().out
    await pool.close()
    await other.close()


async def test_new_dir_path_elsewhere_is_a_directory(xfs_dir, capsys):
    pool = await new_pool(xfs_dir)
    assert os.path.isdir(pool.root)
    code, report = run_tool_json(capsys, "check", pool.root)
    assert code == 0 and report["subvolume"] is None
    assert report["metadata"] is None
    await pool.close()


async def test_check_warns_about_nodatacow_images(btrfs_dir, capsys):
    pool = await new_pool(btrfs_dir)
    vol = origin(pool, FakeVM("work"))
    await vol.create()
    path = os.path.join(pool.root, vol.vid + ".img")
    code, report = run_tool_json(capsys, "check", pool.root)
    assert report["warnings"] == []
    # an image made with +C (as a user's chattr +C directory makes them)
    os.unlink(path)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("=q", 0x00800000))
    os.write(fd, b"x" * MIB)
    os.close(fd)
    code, report = run_tool_json(capsys, "check", pool.root)
    assert code == 0
    [warning] = report["warnings"]
    assert warning["kind"] == "nodatacow" and path in warning["message"]
    await pool.close()


async def test_check_names_fragmented_images_and_the_command(
    reflink_dir, capsys
):
    pool = await new_pool(reflink_dir, auto_defrag="False")
    vol = origin(pool, FakeVM("work"), size=16 * MIB)
    await vol.create()
    await vol.start()
    rng = random.Random(3)
    with open(vol.path, "r+b") as image:
        image.write(rng.randbytes(16 * MIB))
    await vol.stop()
    await vol.start()
    fd = os.open(vol.path, os.O_RDWR)
    for _ in range(300):
        os.pwrite(fd, rng.randbytes(4096), rng.randrange(4096) * 4096)
    os.close(fd)
    await vol.stop()
    await pool.wait_background()
    code, report = run_tool_json(capsys, "check", pool.root)
    assert code == 0 and report["warnings"] == []  # below the default
    argv = ("check", "--defrag-threshold", "100", pool.root)
    code, report = run_tool_json(capsys, *argv)
    [warning] = report["warnings"]
    assert warning["kind"] == "fragmented" and warning["vid"] == vol.vid
    assert f"qubes-reflink defrag {pool.root} {vol.vid}" in warning["message"]
    # what it says to run clears it
    assert cli.main(["-q", "defrag", pool.root, vol.vid]) == 0
    code, report = run_tool_json(capsys, *argv)
    assert report["warnings"] == []
    await pool.close()


def test_metadata_warning_needs_full_metadata_and_no_room():
    def space(size, usage, unallocated):
        return btrfs.Space(size, usage, 4 * MIB, unallocated)

    assert health.metadata_findings(space(100 * MIB, 72 * MIB, 0))
    assert not health.metadata_findings(space(100 * MIB, 60 * MIB, 0))
    assert not health.metadata_findings(
        space(100 * MIB, 95 * MIB, 2 * health.GIB)
    )
    assert not health.metadata_findings(None)


def test_check_warns_when_btrfs_metadata_fills_up(capsys):
    """A small btrfs whose data chunks took the whole disk, then filled
    with small files (kept in metadata) until it refused more."""
    with loop_filesystem("btrfs", size=300 * MIB) as mnt:
        with open(os.path.join(mnt, "data"), "wb") as data:
            try:
                while True:
                    data.write(b"d" * (4 * MIB))
            except OSError as err:
                assert err.errno == errno.ENOSPC
        os.sync()
        os.unlink(os.path.join(mnt, "data"))  # data chunks stay allocated
        os.sync()
        space = btrfs.space(mnt)
        assert space.unallocated < health.METADATA_ROOM
        small = os.path.join(mnt, "small")
        os.mkdir(small)
        try:
            for number in range(1_000_000):
                with open(os.path.join(small, str(number)), "wb") as f:
                    f.write(b"m" * 2000)  # inline: metadata
        except OSError as err:
            assert err.errno == errno.ENOSPC
        os.sync()
        code, report = run_tool_json(capsys, "check", mnt)
        # the probe files may find no room left: the answer is "can't tell"
        assert (code, report["reflink"]) in ((0, True), (2, None))
        kinds = [warning["kind"] for warning in report["warnings"]]
        assert kinds == ["metadata"], report
        total, used = btrfs_metadata(mnt)
        assert report["metadata"]["metadata_size"] == total
        reserve = report["metadata"]["global_reserve"]
        assert (used + reserve) / total >= health.METADATA_FULL


@pytest.mark.parametrize("fstype", ["btrfs", "xfs", "ext4"])
def test_nocow_reader_on_every_filesystem(mounts, fstype):
    path = os.path.join(mounts(fstype), f"plain-{os.getpid()}")
    with open(path, "wb") as plain:
        plain.write(b"p")
    try:
        assert health.nocow(path) is False
    finally:
        os.unlink(path)
