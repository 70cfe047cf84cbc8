"""Space accounting from FIEMAP extent maps, on real btrfs, XFS and ext4.

The exact byte counts rely on 4 KiB blocks (the mkfs defaults on x86) and
on every write being fsynced before the maps are read; `btrfs filesystem
du --raw` is the reference for files on btrfs.
"""

import fcntl
import os
import random
import struct
import subprocess

import pytest

from conftest import fstype_of
from qubes_reflink import extents
from qubes_reflink.extents import (
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNKNOWN,
    Extent,
    Usage,
    file_extents,
    space_usage,
    total_usage,
)

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4 * KiB

FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)


# Helpers


def random_bytes(size):
    return random.randbytes(size)


def compressible_bytes(size):
    """Data zstd shrinks a lot, but not to nothing: one random line a block."""
    out = bytearray()
    while len(out) < size:
        out += (random.randbytes(32).hex() + "\n").encode() * 64
    return bytes(out[:size])


def write(path, data, offset=0, truncate=None):
    """Write `data` at `offset` (creating the file), then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if truncate is not None:
            os.ftruncate(fd, truncate)
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def reflink(src, dst):
    subprocess.run(["cp", "--reflink=always", src, dst], check=True)


def clone_range(src, src_offset, dst, dst_offset, length):
    """FICLONERANGE: make `dst` map `length` bytes of `src` at `dst_offset`."""
    with open(src, "rb") as src_file, open(dst, "r+b") as dst_file:
        args = struct.pack(
            "=qQQQ", src_file.fileno(), src_offset, length, dst_offset
        )
        fcntl.ioctl(dst_file.fileno(), FICLONERANGE, args)
        os.fsync(dst_file.fileno())


def btrfs_du(path):
    """{path: (Total, Exclusive, Set shared or None)} from btrfs fi du."""
    output = subprocess.run(
        ["btrfs", "filesystem", "du", "--raw", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert output[0].split() == [
        "Total",
        "Exclusive",
        "Set",
        "shared",
        "Filename",
    ]
    rows = {}
    for line in output[1:]:
        total, exclusive, set_shared, name = line.split(maxsplit=3)
        rows[name] = (
            int(total),
            int(exclusive),
            None if set_shared == "-" else int(set_shared),
        )
    return rows


def usage(apparent, allocated, shared):
    return Usage(apparent, allocated, shared, allocated - shared)


# The sweep, against a byte-by-byte model of the documented definitions

INLINE = FIEMAP_EXTENT_DATA_INLINE
ENCODED = FIEMAP_EXTENT_ENCODED
SHARED = FIEMAP_EXTENT_SHARED


def reference(files):
    """The module docstring's definitions, evaluated one byte at a time."""

    def plain(extent):
        return not extent.flags & (INLINE | ENCODED)

    def cells(key, extent):
        return {(key, byte) for byte in range(extent.physical, extent.end)}

    plain_bytes = []
    flagged_bytes = []
    for key, _size, exts in files:
        plain_bytes.append(set())
        flagged_bytes.append(set())
        for ext in exts:
            if plain(ext):
                plain_bytes[-1] |= cells(key, ext)
                if ext.flags & SHARED:
                    flagged_bytes[-1] |= cells(key, ext)
    usages = []
    for index, (_key, size, exts) in enumerate(files):
        others = set().union(
            *(cells for i, cells in enumerate(plain_bytes) if i != index)
        )
        allocated = len(plain_bytes[index])
        shared = len(plain_bytes[index] & (others | flagged_bytes[index]))
        for ext in exts:
            if ext.flags & INLINE:
                allocated += ext.length
            elif ext.flags & ENCODED:
                allocated += ext.length
                shared += ext.length if ext.flags & SHARED else 0
        usages.append(usage(size, allocated, shared))

    union = set()
    any_flagged = set()
    inline = 0
    for key, _size, exts in files:
        for ext in exts:
            if ext.flags & INLINE:
                inline += ext.length
                continue
            union |= cells(key, ext)
            if ext.flags & SHARED:
                any_flagged |= cells(key, ext)
    several = {
        cell
        for cell in union
        if sum(cell in cells for cells in plain_bytes) >= 2
    }
    set_shared = len(union & (any_flagged | several))
    total = usage(
        sum(size for _key, size, _exts in files),
        len(union) + inline,
        set_shared,
    )
    return usages, total


class Ext(Extent):
    """An Extent with its physical end, for the reference model."""

    @property
    def end(self):
        return self.physical + self.length


def random_files(rng):
    files = []
    for _ in range(rng.randint(1, 5)):
        exts = []
        for logical in range(rng.randint(0, 8)):
            flags = rng.choice(
                [0, 0, 0, SHARED, SHARED, ENCODED, ENCODED | SHARED, INLINE]
            )
            exts.append(
                Ext(logical, rng.randint(0, 120), rng.randint(1, 40), flags)
            )
        files.append((rng.choice("ab"), rng.randint(0, 500), exts))
    return files


@pytest.mark.parametrize("seed", range(400))
def test_sweep_matches_byte_model(seed):
    """Overlaps of any shape, self-overlaps, flags, two address spaces."""
    files = random_files(random.Random(seed))
    got = extents._account(files)  # pylint: disable=protected-access
    assert got == reference(files)


def test_sweep_counts_each_of_many_clones():
    """Twenty files on the same ranges: nothing exclusive, union once."""
    exts = [Extent(0, 0, 100, 0), Extent(100, 300, 50, 0)]
    files = [("a", 150, exts)] * 20
    usages, total = extents._account(files)  # pylint: disable=protected-access
    assert usages == [usage(150, 150, 150)] * 20
    assert total == usage(3000, 150, 150)


# file_extents


def test_file_extents_maps_unsynced_writes(any_dir):
    """FIEMAP_FLAG_SYNC maps delayed allocations: no DELALLOC, no holes."""
    path = os.path.join(any_dir, "img")
    with open(path, "wb") as image:
        image.write(random_bytes(3 * MiB + BLOCK))  # no fsync
    exts = file_extents(path)
    assert exts
    assert all(isinstance(ext, Extent) for ext in exts)
    assert not any(
        ext.flags & (FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN)
        for ext in exts
    )
    assert exts[0].logical == 0
    for ext, following in zip(exts, exts[1:]):
        assert ext.logical + ext.length == following.logical
    assert sum(ext.length for ext in exts) == 3 * MiB + BLOCK
    assert exts[-1].flags & extents.FIEMAP_EXTENT_LAST


def test_file_extents_reads_past_one_batch(any_dir):
    """1500 separate extents take three ioctls of 512; none lost or doubled."""
    path = os.path.join(any_dir, "fragmented")
    count = 1500
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, count * 2 * BLOCK)  # no speculative preallocation
        block = random_bytes(BLOCK)
        for index in range(count):
            os.pwrite(fd, block, index * 2 * BLOCK)
    finally:
        os.close(fd)
    exts = file_extents(path)
    assert [ext.logical for ext in exts] == [
        index * 2 * BLOCK for index in range(count)
    ]
    assert {ext.length for ext in exts} == {BLOCK}
    assert space_usage([path])[path] == usage(
        count * 2 * BLOCK, count * BLOCK, 0
    )


def test_file_extents_of_empty_file(any_dir):
    path = os.path.join(any_dir, "empty")
    write(path, b"")
    assert file_extents(path) == []
    assert space_usage([path]) == {path: Usage(0, 0, 0, 0)}


def test_file_extents_of_missing_file(any_dir):
    with pytest.raises(FileNotFoundError):
        file_extents(os.path.join(any_dir, "missing"))


# space_usage and total_usage on real filesystems


def test_random_file_is_all_exclusive(any_dir):
    path = os.path.join(any_dir, "img")
    write(path, random_bytes(2 * MiB))
    assert space_usage([path]) == {path: usage(2 * MiB, 2 * MiB, 0)}
    assert total_usage([path]) == usage(2 * MiB, 2 * MiB, 0)


def test_reflink_clone_is_all_shared(reflink_dir):
    image = os.path.join(reflink_dir, "img")
    clone = os.path.join(reflink_dir, "clone")
    write(image, random_bytes(2 * MiB))
    reflink(image, clone)
    both = usage(2 * MiB, 2 * MiB, 2 * MiB)
    assert space_usage([image, clone]) == {image: both, clone: both}
    # The filesystem flags the sharing: alone, each is still all shared.
    assert space_usage([clone]) == {clone: both}
    assert total_usage([image, clone]) == usage(4 * MiB, 2 * MiB, 2 * MiB)


def test_clone_partly_overwritten(reflink_dir):
    """Three blocks of the clone rewritten: per filesystem, exact counts.

    XFS counts references per block, so the three old blocks become the
    image's own.  btrfs flags the image's whole data extent SHARED while
    the clone maps any part of it, and frees it only whole.
    """
    image = os.path.join(reflink_dir, "img")
    clone = os.path.join(reflink_dir, "clone")
    write(image, random_bytes(MiB))
    reflink(image, clone)
    rewritten = 3 * BLOCK
    write(clone, random_bytes(rewritten), offset=64 * BLOCK)

    got = space_usage([image, clone])
    total = total_usage([image, clone])
    assert got[clone] == usage(MiB, MiB, MiB - rewritten)
    if fstype_of(reflink_dir) == "xfs":
        assert got[image] == usage(MiB, MiB, MiB - rewritten)
        assert total == usage(2 * MiB, MiB + rewritten, MiB - rewritten)
    else:
        assert got[image] == usage(MiB, MiB, MiB)
        assert total == usage(2 * MiB, MiB + rewritten, MiB)


def test_sharing_outside_the_set_counts(reflink_dir):
    """A clone left out of `paths` still makes the bytes shared."""
    image = os.path.join(reflink_dir, "img")
    write(image, random_bytes(MiB))
    reflink(image, os.path.join(reflink_dir, "outside"))
    write(image, random_bytes(2 * BLOCK), offset=MiB)  # grows the image
    assert space_usage([image]) == {
        image: usage(MiB + 2 * BLOCK, MiB + 2 * BLOCK, MiB)
    }
    assert total_usage([image]) == usage(MiB + 2 * BLOCK, MiB + 2 * BLOCK, MiB)


def test_sparse_file(any_dir):
    path = os.path.join(any_dir, "sparse")
    write(path, random_bytes(64 * KiB), truncate=8 * MiB)
    write(path, random_bytes(64 * KiB), offset=4 * MiB)
    got = space_usage([path])[path]
    assert got == usage(8 * MiB, 128 * KiB, 0)
    assert got.allocated < got.apparent


def test_hard_links_are_one_file(any_dir):
    path = os.path.join(any_dir, "img")
    link = os.path.join(any_dir, "link")
    write(path, random_bytes(MiB))
    os.link(path, link)
    alone = usage(MiB, MiB, 0)
    assert space_usage([path, link]) == {path: alone, link: alone}
    assert total_usage([path, link]) == alone


def test_ext4_shares_nothing(ext4_dir):
    image = os.path.join(ext4_dir, "img")
    copy = os.path.join(ext4_dir, "copy")
    write(image, random_bytes(MiB))
    refused = subprocess.run(
        ["cp", "--reflink=always", image, copy],
        check=False,
        capture_output=True,
    )
    assert refused.returncode != 0
    subprocess.run(["cp", "--reflink=auto", image, copy], check=True)
    alone = usage(MiB, MiB, 0)
    assert space_usage([image, copy]) == {image: alone, copy: alone}
    assert total_usage([image, copy]) == usage(2 * MiB, 2 * MiB, 0)
    assert not any(
        ext.flags & SHARED
        for path in (image, copy)
        for ext in file_extents(path)
    )


def test_set_across_filesystems(btrfs_dir, xfs_dir):
    """Ranges of different filesystems never overlap, whatever the numbers."""
    paths = []
    for directory in (btrfs_dir, xfs_dir):
        paths.append(os.path.join(directory, "img"))
        write(paths[-1], random_bytes(MiB))
    got = space_usage(paths)
    assert got == {path: usage(MiB, MiB, 0) for path in paths}
    assert total_usage(paths) == usage(2 * MiB, 2 * MiB, 0)


# Documented differences from btrfs filesystem du


def test_self_clone_counts_once(reflink_dir):
    """A file mapping its own bytes twice: allocated once, flagged shared."""
    path = os.path.join(reflink_dir, "img")
    write(path, random_bytes(MiB))
    write(path, b"", truncate=2 * MiB)
    clone_range(path, 0, path, MiB, MiB)
    assert space_usage([path])[path] == usage(2 * MiB, MiB, MiB)
    if fstype_of(reflink_dir) == "btrfs":
        # btrfs-progs counts each mapping in Total; Exclusive agrees.
        assert btrfs_du(path)[path][:2] == (2 * MiB, 0)


def test_inline_extent_is_exclusive(btrfs_dir):
    """btrfs keeps a tiny file in its metadata: counted, though du skips it."""
    path = os.path.join(btrfs_dir, "tiny")
    write(path, b"x" * 100)
    exts = file_extents(path)
    assert len(exts) == 1
    ext = exts[0]
    assert ext.flags & FIEMAP_EXTENT_DATA_INLINE
    assert space_usage([path])[path] == usage(100, ext.length, 0)
    assert total_usage([path]) == usage(100, ext.length, 0)
    assert btrfs_du(path)[path][:2] == (0, 0)


# Agreement with btrfs filesystem du on a realistic set


def _build_set(directory, variant):
    """An image, two clones rewritten differently, a sparse file.

    `variant` "subvolume" puts the second clone in a subvolume (another
    st_dev, same address space); "compressed" makes btrfs compress new
    files of the directory, and the image compressible (encoded extents).
    """
    if variant == "compressed":
        subprocess.run(
            ["btrfs", "property", "set", directory, "compression", "zstd"],
            check=True,
        )
        data = compressible_bytes
    else:
        data = random_bytes
    image = os.path.join(directory, "image")
    for chunk in range(6):  # several extents
        write(image, data(MiB), offset=chunk * MiB)

    clone1 = os.path.join(directory, "clone1")
    reflink(image, clone1)
    write(clone1, random_bytes(64 * KiB), offset=MiB)
    write(clone1, random_bytes(BLOCK), offset=5 * MiB + 3 * BLOCK)

    clone2_dir = directory
    if variant == "subvolume":
        clone2_dir = os.path.join(directory, "subvol")
        subprocess.run(
            ["btrfs", "subvolume", "create", clone2_dir],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    clone2 = os.path.join(clone2_dir, "clone2")
    reflink(image, clone2)
    write(clone2, data(256 * KiB), offset=2 * MiB + 8 * KiB)
    write(clone2, random_bytes(128 * KiB), offset=6 * MiB)  # grows it

    # The image itself changes after its clones were taken.
    write(image, data(8 * KiB), offset=4 * MiB)

    sparse = os.path.join(directory, "sparse")
    write(sparse, random_bytes(100 * KiB), offset=MiB, truncate=16 * MiB)
    write(sparse, random_bytes(BLOCK), offset=12 * MiB)
    return [image, clone1, clone2, sparse]


@pytest.mark.parametrize("variant", ["plain", "subvolume", "compressed"])
def test_agrees_with_btrfs_filesystem_du(btrfs_dir, variant):
    paths = _build_set(btrfs_dir, variant)
    os.sync()
    rows = btrfs_du(btrfs_dir)
    got = space_usage(paths)
    total = total_usage(paths)

    for path in paths:
        du_total, du_exclusive, _ = rows[path]
        assert (got[path].allocated, got[path].exclusive) == (
            du_total,
            du_exclusive,
        ), path
    du_total, du_exclusive, du_set_shared = rows[btrfs_dir]
    assert du_total == sum(got[path].allocated for path in paths)
    assert du_exclusive == sum(got[path].exclusive for path in paths)
    assert total.shared == du_set_shared
    assert total.apparent == sum(os.stat(path).st_size for path in paths)

    # The set is not trivial: sharing, private blocks, holes.
    assert 0 < total.shared < total.allocated
    assert all(got[path].exclusive > 0 for path in paths)
    assert got[paths[3]].allocated < got[paths[3]].apparent
    if variant == "subvolume":
        assert os.stat(paths[2]).st_dev != os.stat(paths[0]).st_dev
    if variant == "compressed":
        assert any(
            ext.flags & ENCODED and ext.flags & SHARED
            for ext in file_extents(paths[0])
        )
    else:
        # Plain extents only: the union is exact, so the set's exclusive
        # bytes are those of its files, and allocated what the four
        # distinct block sets add up to.
        assert total.exclusive == sum(got[path].exclusive for path in paths)
        image_blocks = 6 * MiB + 8 * KiB  # the 8 KiB rewrite is new space
        rewrites = 64 * KiB + BLOCK + 256 * KiB + 128 * KiB
        assert total.allocated == image_blocks + rewrites + 100 * KiB + BLOCK
