"""Fixtures: real btrfs, XFS and ext4 filesystems on loop devices."""

import contextlib
import os
import shutil
import tempfile

import pytest

from helpers import new_pool
from loopfs import on_demand

from qubes_reflink import trash

REFLINK_FILESYSTEMS = ("btrfs", "xfs")
ALL_FILESYSTEMS = ("btrfs", "xfs", "ext4")


@pytest.fixture(autouse=True)
def no_sweep_delay(monkeypatch):
    """The trash is swept right after a stop in tests, for the same reason."""
    monkeypatch.setattr(trash, "SWEEP_DELAY", 0.0)


@pytest.fixture(scope="session")
def mounts():
    """Mount points of one filesystem of each type, made on first use."""
    with contextlib.ExitStack() as stack:
        yield on_demand(stack)


def _fresh_dir(mounts, fstype):
    """A new empty directory on the session's `fstype` filesystem."""
    return tempfile.mkdtemp(prefix="t-", dir=mounts(fstype))


@pytest.fixture
def fs_dir(mounts, request):
    """Directory on the filesystem named by the test's `fstype` param."""
    path = _fresh_dir(mounts, request.param)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=REFLINK_FILESYSTEMS)
def reflink_dir(mounts, request):
    """A fresh directory on btrfs, then on XFS."""
    path = _fresh_dir(mounts, request.param)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=ALL_FILESYSTEMS)
def any_dir(mounts, request):
    """A fresh directory on btrfs, XFS and ext4 (no reflinks) in turn."""
    path = _fresh_dir(mounts, request.param)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def btrfs_dir(mounts):
    path = _fresh_dir(mounts, "btrfs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def xfs_dir(mounts):
    path = _fresh_dir(mounts, "xfs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ext4_dir(mounts):
    path = _fresh_dir(mounts, "ext4")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fstype_of(path):
    """The filesystem type of `path`, from /proc/self/mounts."""
    best = ("", "")
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="ascii") as mounts_file:
        for line in mounts_file:
            _dev, mnt, fstype = line.split()[:3]
            if (real + "/").startswith(mnt.rstrip("/") + "/") and len(
                mnt
            ) > len(best[0]):
                best = (mnt, fstype)
    return best[1]


@pytest.fixture
async def pool(any_dir):
    """A pool on btrfs, XFS and ext4 in turn; background work awaited,
    then the pool closed (no task outlives the test's event loop)."""
    the_pool = await new_pool(any_dir, setup_check="no")
    yield the_pool
    await the_pool.wait_background()
    await the_pool.close()


#: `make test PARTIAL=1`: a test that can't run here is reported, not failed
PARTIAL = os.environ.get("PARTIAL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
    """A skipped test did not run: it fails, saying why, unless the run was
    asked to be partial; then the summary lists it (pytest -rs)."""
    outcome = yield
    report = outcome.get_result()
    if PARTIAL or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr
    if isinstance(reason, tuple):
        reason = reason[2]
    report.outcome = "failed"
    report.longrepr = (
        f"did not run: {reason}\nInstall what it needs (as root, `make "
        "test` installs it), or run `make test PARTIAL=1` for a partial run."
    )
