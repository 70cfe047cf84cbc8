"""Timing: statistics, the floors and clone baselines, the loop ticker.

The *bare floor* is the least any start can cost: renaming a ready file to
another name in the same directory and fsyncing that directory, on the same
filesystem, measured in the same run.  The *thread floor* is the same run
through `asyncio.to_thread` from the event loop: the least a driver can do
that keeps blocking file work off qubesd's loop, as this one does; start
latency is judged against it.  The *clone* baseline is a plain FICLONE of
the same image, as a driver that clones at start would pay.
"""

import asyncio
import fcntl
import gc
import math
import os
import statistics
import subprocess
import time

from . import images


def ms(seconds):
    """Seconds to milliseconds."""
    return seconds * 1000.0


def summary(samples):
    """Median, p90, min and max (ms) of samples given in seconds."""
    ordered = sorted(samples)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "n": len(ordered),
        "median_ms": round(ms(statistics.median(ordered)), 3),
        "p90_ms": round(ms(p90), 3),
        "min_ms": round(ms(ordered[0]), 3),
        "max_ms": round(ms(ordered[-1]), 3),
    }


def median_ms(samples):
    """The median of samples given in seconds, in ms."""
    return ms(statistics.median(samples))


FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
_FSTYPES = {}  # st_dev -> filesystem type


def fstype(path):
    """The type of the filesystem holding `path` ("xfs", "btrfs", ...)."""
    dev = os.stat(path).st_dev
    if dev not in _FSTYPES:
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        _FSTYPES[dev] = None
        with open("/proc/self/mountinfo", encoding="utf-8") as info:
            for line in info:
                fields = line.split()
                if fields[2] == wanted:
                    _FSTYPES[dev] = fields[fields.index("-") + 1]
                    break
    return _FSTYPES[dev]


def _drain(path):
    """Wait until the filesystem of `path` has done the work it left for
    later: a freeze waits for it, and the thaw follows at once."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        fcntl.ioctl(fd, FITHAW, 0)
    finally:
        os.close(fd)


def syncfs(path):
    """Write back everything dirty on the filesystem of `path` (untimed),
    so one measurement does not pay for the previous one's writes.

    XFS frees the extents of a deleted file (for a reflinked image, tens of
    thousands of reference counts to update) in a background worker that
    `sync -f` does not wait for, and that slows the clones and fsyncs
    measured next: on XFS the filesystem is also frozen and thawed, which
    waits for that work."""
    subprocess.run(["sync", "-f", path], check=True)
    if fstype(path) == "xfs":
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        _drain(directory)


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def floor_files(directory):
    """A small durable file to rename, and the name to rename it to."""
    src = os.path.join(directory, ".bench-floor-a")
    dst = os.path.join(directory, ".bench-floor-b")
    fd = os.open(src, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(64 * images.KIB))
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(directory)
    syncfs(directory)
    return src, dst


def rename_durably(src, dst):
    os.rename(src, dst)
    _fsync_dir(os.path.dirname(dst))


def floor_sample(directory):
    """Seconds for a bare rename + directory fsync in `directory`.

    The file renamed is a small, durable one (rename cost does not depend
    on the size or extents of the file).
    """
    src, dst = floor_files(directory)
    start = time.perf_counter()
    rename_durably(src, dst)
    elapsed = time.perf_counter() - start
    os.unlink(dst)
    return elapsed


async def thread_floor_sample(directory):
    """The floor as a non-blocking driver can reach it: the same rename +
    directory fsync, run by `asyncio.to_thread` from the event loop."""
    src, dst = floor_files(directory)
    start = time.perf_counter()
    await asyncio.to_thread(rename_durably, src, dst)
    elapsed = time.perf_counter() - start
    os.unlink(dst)
    return elapsed


async def floor_samples(directory):
    """(bare floor, thread floor) in seconds: one sample of each, one right
    after the other, in `directory` (beside the image measured next)."""
    bare = floor_sample(directory)
    return bare, await thread_floor_sample(directory)


def clone_sample(image, copies=1):
    """Seconds for `copies` plain clones (FICLONE) of `image`, one after
    the other, beside it; the clones are removed afterwards, and that
    written back, so the next measurement does not pay for it (btrfs
    frees the extents of a removed file in its next transaction)."""
    directory = os.path.dirname(image)
    targets = [
        os.path.join(directory, f".bench-clone-{index}")
        for index in range(copies)
    ]
    syncfs(directory)
    start = time.perf_counter()
    for target in targets:
        images.clone(image, target)
    elapsed = time.perf_counter() - start
    for target in targets:
        os.unlink(target)
    syncfs(directory)
    return elapsed


def clone_delete_sample(image):
    """(seconds for a plain clone of `image`, seconds to delete it): the
    clone (FICLONE) is made beside the image and written back, untimed;
    the deletion is `unlink` + `syncfs` (btrfs drops the references of the
    clone's extents in its next transaction, which `sync -f` waits for;
    XFS in a background worker, which the freeze of `syncfs` waits for)."""
    directory = os.path.dirname(image)
    target = os.path.join(directory, ".bench-clone-delete")
    syncfs(directory)
    start = time.perf_counter()
    images.clone(image, target)
    cloned = time.perf_counter() - start
    syncfs(directory)
    start = time.perf_counter()
    os.unlink(target)
    syncfs(directory)
    return cloned, time.perf_counter() - start


async def timed(awaitable):
    """Seconds `awaitable` took, awaited on the running loop."""
    start = time.perf_counter()
    await awaitable
    return time.perf_counter() - start


class Ticker:
    """Measure how long the event loop is blocked.

    A task sleeps 1 ms in a loop; the longest time between two wake-ups,
    less the 1 ms asked for, is the longest the loop could not run it.

    Python's garbage collector stops every thread while it runs, for a
    time that grows with the number of objects of the whole process.  So
    the window starts with a full collection (untimed, as `syncfs` before a
    sample): a collection owed to earlier work does not fall into it.  The
    collections that still run inside the window are recorded:
    `max_gc` is the longest.
    """

    PERIOD = 0.001

    def __init__(self):
        self.max_block = 0.0
        self.max_gc = 0.0
        self._gc_started = None
        self._task = None

    def _on_gc(self, phase, _info):
        now = time.perf_counter()
        if phase == "start":
            self._gc_started = now
        elif self._gc_started is not None:
            self.max_gc = max(self.max_gc, now - self._gc_started)

    async def _tick(self):
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.PERIOD)
            now = time.perf_counter()
            self.max_block = max(self.max_block, now - last - self.PERIOD)
            last = now

    async def __aenter__(self):
        self.max_block = self.max_gc = 0.0
        gc.collect()
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info):
        gc.callbacks.remove(self._on_gc)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
