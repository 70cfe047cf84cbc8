"""Test images for the benchmark: random data, fragmented, sparse.

Images are built once per filesystem, outside any pool, and then put into
volumes through the driver's own import (import_data + a clone into the
path it returns), which keeps their extent maps as built.

Fragmentation is made with FICLONERANGE: a 1 GiB image of random data gets
every other range replaced by a range cloned from a second random file, so
its extent map alternates between the two; that takes seconds, where
writing 4 KiB blocks with an fsync each would take minutes.
"""

import fcntl
import os
import re
import struct
import subprocess

KIB = 1024
MIB = 1024**2
GIB = 1024**3

FICLONE = 0x40049409
FICLONERANGE = 0x4020940D
CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, length, dst_off

_BLOCK = 4 * KIB
_CHUNK = 64 * MIB


def _align(value):
    return value // _BLOCK * _BLOCK


def write_random(path, size, pieces=None):
    """Write `path` as an image of `size` bytes holding random data.

    With `pieces` = [(offset, length), ...] only those ranges hold data and
    the rest stays holes.  The data is incompressible (one random chunk,
    repeated); the file is fsynced.
    """
    chunk = os.urandom(_CHUNK)
    if pieces is None:
        pieces = [(0, size)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for offset, length in pieces:
            done = 0
            while done < length:
                part = min(_CHUNK, length - done)
                os.pwrite(fd, chunk[:part], offset + done)
                done += part
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def clone(src, dst):
    """Create `dst` as a reflink clone of `src` (FICLONE)."""
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def fragment(path, base, donor, extents):
    """Make `path` a clone of `base` with about `extents` extents.

    Every other range of the clone is replaced by a range cloned from the
    file `donor` (FICLONERANGE), so the extent map alternates between the
    two files: `extents` / 2 ranges of each.
    """
    clone(base, path)
    size = os.stat(path).st_size
    donor_size = os.stat(donor).st_size
    ranges = max(1, extents // 2)
    period = _align(size // ranges)
    length = _align(period // 2)
    if period < 2 * _BLOCK or length < _BLOCK:
        raise ValueError(f"{size} bytes can't hold {extents} extents")
    dst_fd = os.open(path, os.O_RDWR)
    src_fd = os.open(donor, os.O_RDONLY)
    try:
        for index in range(ranges):
            src_offset = _align((index * length) % (donor_size - length))
            fcntl.ioctl(
                dst_fd,
                FICLONERANGE,
                CLONE_RANGE.pack(src_fd, src_offset, length, index * period),
            )
        os.fsync(dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def data_extents(path):
    """(offset, length) of the data regions of `path` (holes skipped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                return
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, offset - start
    finally:
        os.close(fd)


def extent_count(path):
    """The number of extents of `path`, as filefrag (FIEMAP) counts them."""
    result = subprocess.run(
        ["filefrag", path], capture_output=True, text=True, check=True
    )
    match = re.search(r"(\d+) extents? found", result.stdout)
    return int(match.group(1)) if match else 0
