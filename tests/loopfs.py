"""Real loop-mounted filesystems for the tests.

Every filesystem is a sparse image file, formatted with mkfs and mounted
with ``mount -o loop``; the loop device is created with autoclear, so the
unmount in the ``finally`` clause also detaches it, whatever the test did.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile

import pytest

MKFS = {
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}

# mkfs.xfs refuses filesystems smaller than 300 MiB
DEFAULT_SIZE = 1024**3


def unavailable_reason(fstype):
    """Why a loop-mounted `fstype` can't be made here, or None if it can."""
    if os.geteuid() != 0:
        return "loop-mounting filesystems needs root"
    if shutil.which(MKFS[fstype][0]) is None:
        return f"{MKFS[fstype][0]} is not installed"
    return None


def _run(*cmd):
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@contextlib.contextmanager
def loop_filesystem(fstype, size=DEFAULT_SIZE, options=None, parent=None):
    """Yield the mount point of a fresh `fstype` filesystem of `size` bytes.

    The image file lives beside the mount point in a temporary directory
    (in `parent`, default the system's temporary directory) and is removed
    afterwards.
    """
    workdir = tempfile.mkdtemp(prefix=f"qubes-reflink-{fstype}-", dir=parent)
    image = os.path.join(workdir, "image")
    mountpoint = os.path.join(workdir, "mnt")
    os.mkdir(mountpoint)
    mounted = False
    try:
        with open(image, "wb") as image_file:
            image_file.truncate(size)
        _run(*MKFS[fstype], image)
        mount_options = "loop" + (f",{options}" if options else "")
        _run("mount", "-o", mount_options, image, mountpoint)
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            unmount(mountpoint)
        shutil.rmtree(workdir, ignore_errors=True)


def unmount(mountpoint):
    """Unmount (lazily if it is busy) and detach the autoclear loop device."""
    result = subprocess.run(
        ["umount", mountpoint], stderr=subprocess.PIPE, check=False
    )
    if result.returncode != 0:
        subprocess.run(["umount", "-l", mountpoint], check=False)


def on_demand(stack, parent=None):
    """A function giving the mount point of one filesystem per type, made
    on first use and unmounted when `stack` (an ExitStack) closes; it skips
    the calling test when that type can't be made here."""
    made = {}

    def get(fstype):
        reason = unavailable_reason(fstype)
        if reason:
            pytest.skip(reason)
        if fstype not in made:
            made[fstype] = stack.enter_context(
                loop_filesystem(fstype, parent=parent)
            )
        return made[fstype]

    return get
