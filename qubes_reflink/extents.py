"""Space accounting of image files from their extent maps (FIEMAP).

``st_blocks`` counts every block a file maps, including the blocks it shares
with its reflink clones, so summing it over a pool overstates its usage and
says nothing about what deleting a volume would free.  This module reads the
files' extent maps with the FIEMAP ioctl and works it out, on btrfs and XFS
alike (and on ext4, where nothing is ever shared).  The cost goes with the
number of extents: one ioctl per 512 extents, then a sweep over the sorted
physical ranges (n log n for the sort); never anything per block.

Definitions
-----------
A file's *extents* are what FIEMAP reports (`file_extents`), with
FIEMAP_FLAG_SYNC so that delayed allocations are written and mapped first.
Extents whose location is still unknown (UNKNOWN, DELALLOC) are skipped.
The rest fall in three kinds:

* plain extents: ``[physical, physical + length)`` is a byte range of the
  filesystem's address space.  These are what the sweep below compares.
* inline extents (DATA_INLINE, DATA_TAIL or NOT_ALIGNED: btrfs keeps small
  files inside its metadata): their ``physical`` means nothing, so they take
  no part in the sweep; their length counts as allocated, exclusive data.
* encoded extents (ENCODED: compressed on btrfs): ``physical`` is the start
  of the compressed extent and ``length`` the *logical* length this file
  maps of it, so ``[physical, physical + length)`` is not a real byte range
  and two such ranges may overlap without sharing a byte.  They take part in
  no overlap test; each counts its length as allocated, and as shared when
  the filesystem flags it SHARED (which btrfs always does when another file
  or snapshot refers to the extent).

For each file (`space_usage`):

* ``apparent``  = st_size.
* ``allocated`` = bytes covered by the file's plain extents, each byte once
  even if the file maps it at several offsets, plus the lengths of its inline
  and encoded extents.
* ``shared``    = bytes of those plain ranges also covered by a plain extent
  of another file of the set, or covered by an extent of this file that the
  filesystem flags SHARED (referenced from anywhere else: a file outside the
  set, a snapshot), plus the SHARED encoded lengths.
* ``exclusive`` = allocated - shared: what deleting this file alone would
  free.  On btrfs the SHARED flag covers a whole data extent, even the parts
  of it that only this file still maps after its clone overwrote them; that
  is right, since btrfs frees a data extent only when its last reference
  goes.  XFS counts references per block, and so does this sweep.

For the set as a whole (`total_usage`): ``apparent`` is the sum of the
sizes; ``allocated`` the union of the plain and encoded ranges plus the
inline lengths; ``shared`` the part of that union covered by plain extents
of two or more files of the set, or by any extent flagged SHARED;
``exclusive`` = allocated - shared, what deleting the whole set would free.

Paths naming the same inode (hard links) are one file: they get the same
figures, and share nothing with each other.  Ranges are compared per
filesystem: per btrfs filesystem UUID, since btrfs gives each subvolume its
own ``st_dev`` over one address space, and per ``st_dev`` elsewhere.

Agreement with ``btrfs filesystem du``
--------------------------------------
btrfs-progs (cmds/filesystem-du.c) reads the same FIEMAP maps.  Per file,
"Total" is the sum of the lengths of the extents not flagged UNKNOWN,
DELALLOC or DATA_INLINE, and "Exclusive" is Total minus the lengths of the
extents flagged SHARED.  Given a directory, it lists every file below it
with "Set shared" left as "-", and on the directory's own line prints the
sums of Total and of Exclusive and, as "Set shared", the union of the
physical ranges ``[physical, physical + length)`` of the SHARED extents of
all those files (each file's inode counted once).

On btrfs every byte that two files map is flagged SHARED, so the cross-file
test adds nothing there.  Once the files are synced (btrfs-progs does not
ask FIEMAP to sync), the figures are those of btrfs-progs:

* ``allocated`` == Total and ``exclusive`` == Exclusive for every file that
  has no inline extent and maps no plain byte at two offsets;
* ``total_usage(paths).shared`` == the "Set shared" of a directory holding
  just these files (inline extents are out of both; a range a file maps
  twice is in both unions once).

The differences, by design:

* A small file kept inline counts here (btrfs-progs leaves it out, as it
  takes no data space).
* A file that maps the same plain bytes at two offsets (cloned onto itself,
  deduplicated blocks) has them once in ``allocated``, but once per mapping
  in Total.  Both btrfs and XFS flag such bytes SHARED, so ``exclusive``
  (0 for them) still equals Exclusive, though deleting the file would free
  them.

For encoded extents the set's figures take the ranges as FIEMAP gives them,
as "Set shared" does; since such a range spans the logical length from the
compressed extent's start, it may cover bytes of other extents, so the
set's ``allocated`` and ``shared`` are approximations there (and ``shared``
still equals "Set shared").
"""

import fcntl
import itertools
import os
import struct
from typing import NamedTuple

from .layout import VANISHED

FS_IOC_FIEMAP = 0xC020660B
#: BTRFS_IOC_FS_INFO: _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)
BTRFS_IOC_FS_INFO = 0x8400941F
_BTRFS_FS_INFO_SIZE = 1024
_BTRFS_FSID = slice(16, 32)

FIEMAP_MAX_OFFSET = 2**64 - 1
FIEMAP_FLAG_SYNC = 0x00000001

FIEMAP_EXTENT_LAST = 0x00000001
FIEMAP_EXTENT_UNKNOWN = 0x00000002
FIEMAP_EXTENT_DELALLOC = 0x00000004
FIEMAP_EXTENT_ENCODED = 0x00000008
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x00000080
FIEMAP_EXTENT_NOT_ALIGNED = 0x00000100
FIEMAP_EXTENT_DATA_INLINE = 0x00000200
FIEMAP_EXTENT_DATA_TAIL = 0x00000400
FIEMAP_EXTENT_UNWRITTEN = 0x00000800
FIEMAP_EXTENT_MERGED = 0x00001000
FIEMAP_EXTENT_SHARED = 0x00002000

#: Extents without a known location: nothing to count yet.
_SKIP = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC
#: Extents stored with metadata, whose `physical` is no disk address.
_INLINE = (
    FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
    | FIEMAP_EXTENT_NOT_ALIGNED
)

#: Extents a rewrite would not make contiguous, or would make larger
#: (btrfs inline data, compressed extents): defragmentation leaves them.
NOT_PLAIN = _INLINE | FIEMAP_EXTENT_ENCODED

# struct fiemap: fm_start, fm_length, fm_flags, fm_mapped_extents,
# fm_extent_count, fm_reserved; then fm_extents[].
_FIEMAP = struct.Struct("=QQIIII")
# struct fiemap_extent: fe_logical, fe_physical, fe_length,
# fe_reserved64[2], fe_flags, fe_reserved[3].
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")
_BATCH = 512


class Extent(NamedTuple):
    """One FIEMAP extent: file offset, disk address, length (bytes), flags."""

    logical: int
    physical: int
    length: int
    flags: int


class Usage(NamedTuple):
    """Bytes of a file or a set of files (see the module docstring)."""

    apparent: int
    allocated: int
    shared: int
    exclusive: int


def file_extents(path):
    """The extents of the file at `path`, in file order, as FIEMAP maps them.

    FIEMAP_FLAG_SYNC writes back dirty data first, so that recent writes
    have their final location instead of a DELALLOC placeholder; extents
    still flagged UNKNOWN or DELALLOC are left out, having no location to
    account for.  Inline and encoded extents are returned as reported:
    their `physical` is no plain byte range (see the module docstring).
    Raises OSError (EOPNOTSUPP or ENOTTY) where the filesystem has no
    FIEMAP.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _fiemap(fd)
    finally:
        os.close(fd)


def _fiemap(fd):
    """Read the whole extent map of `fd`, `_BATCH` extents per ioctl."""
    buf = bytearray(_FIEMAP.size + _BATCH * _FIEMAP_EXTENT.size)
    view = memoryview(buf)
    extents = []
    start = 0
    flags = FIEMAP_FLAG_SYNC
    while True:
        _FIEMAP.pack_into(
            buf, 0, start, FIEMAP_MAX_OFFSET - start, flags, 0, _BATCH, 0
        )
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP.unpack_from(buf)[3]
        if mapped == 0:
            break
        records = view[
            _FIEMAP.size : _FIEMAP.size + mapped * _FIEMAP_EXTENT.size
        ]
        last = False
        end = start
        for logical, physical, length, fe_flags in _FIEMAP_EXTENT.iter_unpack(
            records
        ):
            last = last or bool(fe_flags & FIEMAP_EXTENT_LAST)
            end = max(end, logical + length)
            if fe_flags & _SKIP or length == 0 or logical + length <= start:
                continue
            extents.append(Extent(logical, physical, length, fe_flags))
        # Fewer extents than asked for also means the map is complete.
        if last or mapped < _BATCH or end <= start:
            break
        start = end
        flags = 0  # synced once is enough
    return extents


def _fs_key(fd, st):
    """What identifies the physical address space `fd` lives in."""
    args = bytearray(_BTRFS_FS_INFO_SIZE)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, args)
    except OSError:  # ENOTTY: not btrfs
        return ("dev", st.st_dev)
    return ("btrfs", bytes(args[_BTRFS_FSID]))


def _open(path):
    """A read-only descriptor of `path`, or None if the file is gone.

    Pools change while they are measured: qubesd renames spares into place
    and empties the trash, so a name listed a moment ago may be gone, or
    its directory (ENOTDIR: replaced by a file).  Such a file is measured
    as not there.  Any other error (EACCES, EIO, ...) is raised.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except VANISHED:
        return None


class ExtentMaps:
    """The extent maps of a set of files, each file read once.

    A set and its subsets (a pool, each of its volumes) are measured from
    the same reading, so their figures agree even while the files change:
    a file that vanished before it was opened is in none of them, and one
    that vanishes after is in all (its open descriptor keeps its extents).
    Paths naming the same inode are one file.
    """

    def __init__(self, paths=()):
        self._index = {}  # path (os.fspath) -> index in _files
        self._inodes = {}  # (st_dev, st_ino) -> index in _files
        self._files = []  # (filesystem key, st_size, extents)
        self.add(paths)

    def add(self, paths):
        """Read the maps of those `paths` not read yet, except the gone."""
        for path in map(os.fspath, paths):
            if path not in self._index:
                index = self._read(path)
                if index is not None:
                    self._index[path] = index

    def _read(self, path):
        """Index of `path`'s inode in _files, mapped first if new; None if
        the file is gone."""
        fd = _open(path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            inode = (st.st_dev, st.st_ino)
            if inode not in self._inodes:
                self._inodes[inode] = len(self._files)
                self._files.append((_fs_key(fd, st), st.st_size, _fiemap(fd)))
            return self._inodes[inode]
        finally:
            os.close(fd)

    def measure(self, paths=None):
        """({path: Usage}, Usage of the set) of `paths` (default: all read),
        sharing judged within them; paths not read (gone) are left out."""
        wanted = self._index if paths is None else map(os.fspath, paths)
        chosen = {
            path: self._index[path] for path in wanted if path in self._index
        }
        indices = sorted(set(chosen.values()))
        usages, total = _account([self._files[i] for i in indices])
        by_index = dict(zip(indices, usages))
        return {path: by_index[i] for path, i in chosen.items()}, total


class _Sweep:
    """A sweep over the physical ranges of one address space.

    Each range gives two events, (position, file, delta, flagged): delta 1
    at its start and -1 at its end; file is -1 for an encoded extent, which
    counts for the set only.  Between two consecutive event positions
    nothing changes, so a file's state (covered, shared) is re-evaluated
    only at the events touching it.  The one state that depends on other
    files, "two or more distinct files cover this byte", flips only when
    the number of distinct files crosses 2, and at such a point at most one
    file without an event there is concerned.  So the work is
    O(events log events), whatever the number of files and their overlaps.
    """

    def __init__(self, nfiles):
        self.mult = [0] * nfiles  # the file's plain ranges covering the line
        self.flagged = [0] * nfiles  # ... of them flagged SHARED
        self.since = [0] * nfiles  # where the file's current state began
        self.is_shared = [False] * nfiles
        self.alloc = [0] * nfiles  # results: plain bytes covered, shared
        self.shared = [0] * nfiles
        self.active = set()  # files with mult > 0
        self.cover = 0  # ranges of any kind covering the line
        self.cover_flagged = 0  # ... of them flagged SHARED
        self.union = 0  # results for the set
        self.set_shared = 0

    def run(self, events):
        """Sweep `events` (any order); accumulates into the results."""
        events.sort(key=_position)
        last = 0
        for pos, group in itertools.groupby(events, key=_position):
            if self.cover:  # the set, over [last, pos)
                self.union += pos - last
                if self.cover_flagged or len(self.active) >= 2:
                    self.set_shared += pos - last
            last = pos
            self._apply(pos, self._net(group))

    def _net(self, group):
        """Apply the set's counts of `group`; {file: [delta, flagged]}."""
        deltas = {}
        for _pos, file, delta, flag in group:
            self.cover += delta
            if flag:
                self.cover_flagged += delta
            if file >= 0:
                change = deltas.setdefault(file, [0, 0])
                change[0] += delta
                if flag:
                    change[1] += delta
        return deltas

    def _apply(self, pos, deltas):
        """Account for every file whose state changes at `pos`, change it."""
        mult = self.mult
        after = len(self.active)
        for file, (delta, _flag) in deltas.items():
            if not mult[file] and delta:
                after += 1
            elif mult[file] and not mult[file] + delta:
                after -= 1
        concerned = deltas.keys()
        if (len(self.active) >= 2) != (after >= 2):
            concerned = concerned | self.active  # one more file at most
        for file in concerned:  # [since, pos) in the old state
            if mult[file]:
                self.alloc[file] += pos - self.since[file]
                if self.is_shared[file]:
                    self.shared[file] += pos - self.since[file]
            self.since[file] = pos
        for file, (delta, flag) in deltas.items():
            mult[file] += delta
            self.flagged[file] += flag
            if mult[file]:
                self.active.add(file)
            else:
                self.active.discard(file)
        several = after >= 2
        for file in concerned:
            self.is_shared[file] = bool(mult[file]) and (
                several or bool(self.flagged[file])
            )


def _position(event):
    return event[0]


def _events(index, extents):
    """The sweep events of the plain and encoded extents of file `index`."""
    for ext in extents:
        if ext.flags & _INLINE:
            continue
        flag = bool(ext.flags & FIEMAP_EXTENT_SHARED)
        owner = -1 if ext.flags & FIEMAP_EXTENT_ENCODED else index
        yield (ext.physical, owner, 1, flag)
        yield (ext.physical + ext.length, owner, -1, flag)


def _unswept(extents):
    """(allocated, shared, inline) bytes of the inline and encoded extents."""
    allocated = shared = inline = 0
    for ext in extents:
        if ext.flags & _INLINE:
            allocated += ext.length
            inline += ext.length
        elif ext.flags & FIEMAP_EXTENT_ENCODED:
            allocated += ext.length
            if ext.flags & FIEMAP_EXTENT_SHARED:
                shared += ext.length
    return allocated, shared, inline


def _account(files):
    """([Usage of each file], Usage of the set) for `files` from `_load`."""
    groups = {}  # filesystem key: sweep events
    for index, (key, _size, extents) in enumerate(files):
        groups.setdefault(key, []).extend(_events(index, extents))
    sweep = _Sweep(len(files))
    for events in groups.values():  # ranges compare within a filesystem
        sweep.run(events)
    return _usages(files, sweep)


def _usages(files, sweep):
    """Add the inline and encoded bytes to the `sweep` results."""
    usages = []
    set_allocated = sweep.union
    for index, (_key, size, extents) in enumerate(files):
        allocated, shared, inline = _unswept(extents)
        allocated += sweep.alloc[index]
        shared += sweep.shared[index]
        usages.append(Usage(size, allocated, shared, allocated - shared))
        set_allocated += inline
    total = Usage(
        sum(usage.apparent for usage in usages),
        set_allocated,
        sweep.set_shared,
        set_allocated - sweep.set_shared,
    )
    return usages, total


def space_usage(paths):
    """Usage of each file of `paths`, sharing judged within the set.

    A byte counts as shared when another file of `paths` maps it too, or
    when the filesystem says something else does; so the same file can show
    less exclusive space in a larger set only where the filesystem does not
    flag sharing itself.  Returns {path: Usage}, keyed by the paths as given
    (os.fspath); a file gone before it could be opened has no entry.  See
    the module docstring for the exact definitions.
    """
    return ExtentMaps(paths).measure()[0]


def total_usage(paths):
    """Usage of the set `paths` as a whole: what it takes, what it shares.

    ``exclusive`` is what deleting every file of the set would free, which
    is not the sum of what deleting each alone would free once they share.
    Files gone before they could be opened count for nothing.
    """
    return ExtentMaps(paths).measure()[1]
