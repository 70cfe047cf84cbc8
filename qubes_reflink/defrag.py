"""Defragmentation of committed images that keeps their data shared.

A VM writes small random blocks; each write of a reflinked image is
copy-on-write, so an image splits into tens of thousands of extents, and
every clone of it (spares, snapbases, imports, AppVM starts) then costs
seconds, and reads slow down.  The filesystems' own defragmenters unshare
what they rewrite: the image stops sharing with its revisions, spares and
snapshots, and the pool grows by the image and more.

This module rewrites the fragmented ranges of a committed image
contiguously and keeps everything shared that was shared:

1. `plan`: the image's extent map (FIEMAP: a hint, never a decision about
   data) gives the *windows* (`WINDOW` bytes each) worth rewriting: those
   whose data is split into more than `WORTH` extents beyond its
   contiguous pieces.
2. `find_sharers`: the pool's other image files (revisions, spares,
   snapbases, ready snapshots, other volumes cloned from it; never a
   running image) that map the same disk ranges at the same offsets, by
   their extent maps (again only a hint of where to try).
3. `Defragmenter.run`, per window: the image's data is written into an
   unnamed file (O_TMPFILE) by plain writes, contiguously, and
   fdatasync'ed; then FIDEDUPERANGE makes the image, and each sharer in
   the ranges where it shared, refer to the new extents.  The kernel
   compares the bytes under lock first and changes nothing where they
   differ.  No byte of any file changes at any point: a crash anywhere
   leaves every file holding what it held, and the unnamed file, which
   nothing names, is freed by the filesystem.  The old extents are freed
   once nothing refers to them any more, so the pool's space stays the
   same.

It holds no lock: a start, stop or export of the volume works meanwhile
(each waits at most for one FIDEDUPERANGE call, `CHUNK` or `BTRFS_CHUNK`
bytes, on a file it uses), and `should_stop` is asked between calls: the
volume's start (or the commit of a new image) abandons the work, leaving
whatever was done, which is data-identical, in place.
"""

import contextlib
import ctypes
import logging
import os
import platform
import threading
import time
from typing import NamedTuple

from . import btrfs, extents, fileops, inspect, layout

log = logging.getLogger("qubes.storage.reflink")

MIB = 1024**2
#: Rewritten at once; btrfs's largest extent is 128 MiB, its dedupe
#: works in 16 MiB pieces: 32 windows of 1 to 2 extents per GiB.
WINDOW = 32 * MIB
#: Longest FIDEDUPERANGE call: what a rename, clone or fsync of the same
#: file may have to wait for.  XFS remaps extent by extent, a transaction
#: each, and merges adjacent mappings: short calls cost it no extents and
#: keep other files' fsyncs from queueing behind thousands of
#: transactions (a start beside a defragmentation took 22 x its median
#: with 16 MiB calls).  btrfs shares in 16 MiB pieces whatever the call,
#: each piece a file extent record of its own: shorter calls would leave
#: more records, and slower clones.
CHUNK = 1 * MIB
BTRFS_CHUNK = 16 * MIB
#: Data written anew between two fdatasyncs (XFS).
WRITE_BURST = 4 * MIB
#: Extents beyond its contiguous pieces that make a window worth it.
WORTH = 2
#: Rewritten bytes between two commits of the filesystem, which free the
#: old extents for reuse: what bounds the free space a run needs.
COMMIT_EVERY = 256 * MIB
#: btrfs frees an extent only when no file refers to any part of it.
BTRFS_LARGEST_EXTENT = 128 * MIB
#: The kinds of files that may share a committed image's extents and are
#: made to share the new ones.  Running images are left out: the VM
#: writing them will commit them later.
SHARER_KINDS = frozenset(
    {
        layout.COMMITTED,
        layout.REVISION,
        layout.SPARE,
        layout.SNAPBASE,
        layout.READY,
        layout.EXPORT,
    }
)


class Window(NamedTuple):
    """A range of an image to rewrite: its data regions and extents."""

    start: int
    end: int
    regions: tuple  # (offset, length) of the contiguous data pieces
    extents: int


class Plan(NamedTuple):
    """What defragmenting one committed image would do (from FIEMAP)."""

    vid: str
    path: str
    size: int
    data: int  # bytes of data (not holes)
    extents: int
    excess: int  # extents beyond the image's contiguous pieces
    windows: tuple  # of Window worth rewriting

    @property
    def rewrite(self):
        """Bytes this plan writes anew."""
        return sum(length for w in self.windows for _, length in w.regions)

    @property
    def extents_after(self):
        """The extents expected afterwards: one or two per window
        rewritten (a bound; `Result` says what came out)."""
        rewritten = sum(window.extents for window in self.windows)
        return self.extents - rewritten + 2 * len(self.windows)


class Result(NamedTuple):
    """What a run did to one image."""

    vid: str
    extents_before: int
    extents_after: int
    rewritten: int  # bytes
    sharers: int  # other files made to share the new extents
    shared: int  # bytes of those files now on the new extents
    differed: int  # bytes the extent maps suggested but the kernel refused
    abandoned: str  # why it stopped early ("": it did not)


def _pieces(extent_list):
    """(start, end) of the logically contiguous runs of extents."""
    pieces = []
    for extent in extent_list:
        end = extent.logical + extent.length
        if pieces and pieces[-1][1] == extent.logical:
            pieces[-1][1] = end
        else:
            pieces.append([extent.logical, end])
    return pieces


def _windows(extent_list):
    """The `Window`s of an extent map worth rewriting."""
    by_window = {}
    for extent in extent_list:
        first = extent.logical // WINDOW
        last = (extent.logical + extent.length - 1) // WINDOW
        for index in range(first, last + 1):
            by_window.setdefault(index, []).append(extent)
    worth = []
    for index, found in sorted(by_window.items()):
        if any(extent.flags & extents.NOT_PLAIN for extent in found):
            continue
        start, end = index * WINDOW, (index + 1) * WINDOW
        regions = tuple(
            (max(a, start), min(b, end) - max(a, start))
            for a, b in _pieces(found)
        )
        if len(found) - len(regions) > WORTH:
            worth.append(Window(start, end, regions, len(found)))
    return tuple(worth)


def plan(pool_dir, vid):
    """The `Plan` of the committed image of `vid`; FileNotFoundError if
    the volume has none."""
    path = layout.VolumeFiles(pool_dir, vid).committed
    extent_list = extents.file_extents(path)
    return Plan(
        vid=vid,
        path=path,
        size=os.stat(path).st_size,
        data=sum(extent.length for extent in extent_list),
        extents=len(extent_list),
        excess=len(extent_list) - len(_pieces(extent_list)),
        windows=_windows(extent_list),
    )


def space_needed(plans, filesystem_is_btrfs):
    """Free bytes a run of `plans` (one image after the other, the
    filesystem committed every `COMMIT_EVERY` bytes) needs at most."""
    bookend = BTRFS_LARGEST_EXTENT if filesystem_is_btrfs else 0
    return max(
        (min(p.rewrite, COMMIT_EVERY + WINDOW) + bookend for p in plans),
        default=0,
    )


def _same_offset_shares(target, other):
    """Whether `other` maps some disk bytes of `target` at the same file
    offset (both extent lists in file order)."""
    i = j = 0
    while i < len(target) and j < len(other):
        a, b = target[i], other[j]
        if (
            max(a.logical, b.logical)
            < min(a.logical + a.length, b.logical + b.length)
            and not (a.flags | b.flags) & extents.NOT_PLAIN
            and a.physical - a.logical == b.physical - b.logical
        ):
            return True
        if a.logical + a.length <= b.logical + b.length:
            i += 1
        else:
            j += 1
    return False


class Sharer(NamedTuple):
    """A file that shares extents with the image, and its extent map."""

    path: str
    extents: list


def find_sharers(pool_dir, path, target):
    """The image files of the pool (`SHARER_KINDS`) that share extents
    with `path` (extent map `target`) at the same offsets."""
    own = os.stat(path)
    found, seen = [], [target]
    for _vid, kind, other in inspect.pool_images(pool_dir):
        if kind not in SHARER_KINDS:
            continue
        try:
            if os.path.samestat(os.stat(other), own):
                continue
            other_extents = extents.file_extents(other)
        except layout.VANISHED:
            continue
        if not _same_offset_shares(target, other_extents):
            continue
        # one copy of each distinct map: forty ready snapshots of a
        # template map what its snapbase maps
        known = next((m for m in seen if m == other_extents), None)
        if known is None:
            seen.append(other_extents)
        found.append(Sharer(other, known or other_extents))
    return found


class Share(NamedTuple):
    """A range of a window that the same files map alike (same offset,
    same disk bytes): rewritten once, shared by all of them again."""

    start: int
    length: int
    files: frozenset  # indices of the distinct maps; 0 is the image's


def shares(maps, window):
    """The `Share`s of `window` among the extent maps `maps`."""
    by_delta = {}
    for index, extent_list in enumerate(maps):
        for extent in extent_list:
            start = max(extent.logical, window.start)
            end = min(extent.logical + extent.length, window.end)
            if start < end and not extent.flags & extents.NOT_PLAIN:
                delta = extent.physical - extent.logical
                by_delta.setdefault(delta, []).append((start, end, index))
    found = []
    for items in by_delta.values():
        found.extend(_sweep(items))
    return sorted(found)


def _sweep(items):
    """Maximal ranges of (start, end, file) `items` with one set of files."""
    events = sorted(
        [(start, 1, index) for start, _end, index in items]
        + [(end, -1, index) for _start, end, index in items]
    )
    active, found, previous = {}, [], None
    for position, change, index in events:
        files = frozenset(k for k, count in active.items() if count > 0)
        if files and previous is not None and position > previous:
            last = found[-1] if found else None
            if (
                last
                and last.start + last.length == previous
                and (last.files == files)
            ):
                found[-1] = last._replace(length=position - last.start)
            else:
                found.append(Share(previous, position - previous, files))
        active[index] = active.get(index, 0) + change
        previous = position
    return found


class _Job:
    """One image being defragmented: its files, open, and where the
    unnamed file's next free bytes are."""

    # pylint: disable=too-few-public-methods
    def __init__(self, stack, the_plan, sharers, every_share):
        self.plan = the_plan
        self.fds = [_open(stack, the_plan.path)]
        # qubesd takes spares and discards revisions meanwhile: a sharer
        # gone since it was found has nothing left to share
        sharers = [s for s in sharers if _open_into(stack, s.path, self.fds)]
        self.paths = [the_plan.path] + [s.path for s in sharers]
        #: the distinct extent maps (the image's first) and which map
        #: each file has: a template's spare, snapbase and the ready
        #: snapshots of its AppVMs all map what it maps, and the window's
        #: shares are worked out once for all of them
        self.maps, self.map_of = [], []
        for extent_list in [extents.file_extents(the_plan.path)] + [
            s.extents for s in sharers
        ]:
            if extent_list not in self.maps:
                self.maps.append(extent_list)
            self.map_of.append(self.maps.index(extent_list))
        self.identity = os.fstat(self.fds[0])
        self.tmp = fileops.open_unnamed(os.path.dirname(the_plan.path))
        stack.callback(os.close, self.tmp)
        #: btrfs frees an extent only when no file refers to any part of
        #: it: the sharers' other ranges move to new extents too
        self.every_share = every_share
        ends = [os.fstat(fd).st_size for fd in self.fds]
        self.free = -(-max(ends) // MIB) * MIB
        self.shared = self.differed = 0
        self.sharers = set()

    def place(self, length):
        """Offset in the unnamed file for `length` bytes more."""
        offset = self.free
        self.free += -(-length // BLOCK) * BLOCK
        return offset


BLOCK = 4096


class Defragmenter:
    """Defragments committed images of one pool, one after the other.

    `should_stop(vid)`: asked between steps; True abandons that image
    (its start arrived).  `progress(done, total)`: bytes rewritten.
    `every_share`: move every range of the sharers, not only those
    shared with the image (btrfs, where a partly referenced extent is
    not freed).
    """

    def __init__(self, pool_dir, should_stop=None, progress=None):
        self.pool_dir = pool_dir
        self.should_stop = should_stop or (lambda vid: False)
        self.progress = progress or (lambda done, total: None)
        on_btrfs = btrfs.space(pool_dir) is not None
        self.every_share = on_btrfs
        self.chunk = BTRFS_CHUNK if on_btrfs else CHUNK
        #: XFS logs a transaction per extent remapped: after each call the
        #: log is left idle as long again, so that other files' fsyncs
        #: find it free half of the time (a start beside a run without
        #: this took 10 x its median)
        self.duty = 1.0 if on_btrfs else 0.5

    def run(self, the_plan):
        """Carry out `the_plan`; a `Result`."""
        abandoned, job = "", None
        if the_plan.windows:
            with contextlib.ExitStack() as stack:
                try:
                    job = self._job(stack, the_plan)
                except layout.VANISHED:
                    return self._gone(the_plan)
                abandoned = self._rewrite(job)
        try:
            after = len(extents.file_extents(the_plan.path))
        except layout.VANISHED:  # the volume was removed meanwhile
            after = 0
        if not abandoned:
            record_done(self.pool_dir, the_plan.vid)
        result = Result(
            the_plan.vid,
            the_plan.extents,
            after,
            the_plan.rewrite,
            len(job.sharers) if job else 0,
            job.shared if job else 0,
            job.differed if job else 0,
            abandoned,
        )
        log.info("defragmented %s: %s", the_plan.path, result)
        if job and job.sharers:
            log.info(
                "files now on the new extents of %s: %s",
                the_plan.path,
                ", ".join(sorted(job.sharers)),
            )
        return result

    def rest(self, busy):
        """Leave the filesystem to others after `busy` seconds of work."""
        if self.duty < 1.0:
            time.sleep(busy * (1.0 - self.duty) / self.duty)

    def _gone(self, the_plan):
        """The `Result` for an image gone (replaced) before the work."""
        log.info("%s was replaced before its defragmentation", the_plan.path)
        abandoned = "a new image was committed"
        return Result(the_plan.vid, the_plan.extents, 0, 0, 0, 0, 0, abandoned)

    def _job(self, stack, the_plan):
        target = extents.file_extents(the_plan.path)
        sharers = find_sharers(self.pool_dir, the_plan.path, target)
        return _Job(stack, the_plan, sharers, self.every_share)

    def _rewrite(self, job):
        """Rewrite every window of the job; why it stopped early, or ""."""
        done = since_commit = 0
        for window in job.plan.windows:
            why = self._why_stop(job)
            if why:
                return why
            placed = self._write_window(job, window)
            why = self._share_window(job, placed)
            if why:
                return why
            for fd in job.fds + [job.tmp]:
                fileops.drop_cache(fd, 0, 0)
            written = sum(length for _, length in window.regions)
            done += written
            since_commit += written
            if since_commit >= COMMIT_EVERY:
                # frees the old extents for the next windows to reuse
                fileops.commit_filesystem(job.tmp)
                since_commit = 0
            self.progress(done, job.plan.rewrite)
        return ""

    def _why_stop(self, job):
        """Why to abandon now ("" to go on)."""
        if self.should_stop(job.plan.vid):
            return "the volume started"
        current = fileops.stat_or_none(job.plan.path)
        if current is None or not os.path.samestat(current, job.identity):
            return "a new image was committed"
        return ""

    def _write_window(self, job, window):
        """Write the window's data into the unnamed file, durably: the
        image's at its own offsets, the other shares (`every_share`)
        after the end; (unnamed-file offset, Share) of each share."""
        # written and made durable a burst at a time: a file's fsync
        # beside waits for the device's queue, which no I/O priority
        # orders on a loop device or NVMe (btrfs: one burst, as each
        # writeback of it would be an extent record of its own)
        burst = WINDOW if self.chunk == BTRFS_CHUNK else WRITE_BURST
        for piece in _bursts(window.regions, burst):
            fileops.rewrite_regions(
                job.fds[0], job.tmp, [piece], job.plan.path, "(new extents)"
            )
            fileops.fdatasync(job.tmp, "(new extents)")
        placed = []
        by_reader = {}
        for share in shares(job.maps, window):
            if 0 in share.files:
                placed.append((share.start, share))
            elif job.every_share:
                offset = job.place(share.length)
                placed.append((offset, share))
                reader = job.map_of.index(min(share.files))
                by_reader.setdefault(reader, []).append(
                    (share.start, offset, share.length)
                )
        for reader, moves in sorted(by_reader.items()):
            fileops.rewrite_regions(
                job.fds[reader], job.tmp, moves, job.paths[reader], "(new)"
            )
        fileops.fdatasync(job.tmp, "(new extents)")
        return placed

    def _share_window(self, job, placed):
        """Make the image, then its sharers, use the new extents; why it
        stopped early, or ""."""
        by_map = {}
        for index, map_index in enumerate(job.map_of):
            if map_index not in by_map:
                by_map[map_index] = _ranges_of(map_index, placed)
            ranges = by_map[map_index]
            for source, offset, length in ranges:
                why = self._dedupe(job, index, source, offset, length)
                if why:
                    return why
        return ""

    def _dedupe(self, job, index, source, offset, length):
        """Share `length` bytes of the unnamed file at `source` with file
        `index` at `offset`, in chunks; why it stopped early, or ""."""
        for step in range(0, length, self.chunk):
            if self.should_stop(job.plan.vid):
                return "the volume started"
            size = min(self.chunk, length - step)
            fileops.prefetch(job.fds[index], offset + step, size)
            began = time.monotonic()
            shared = _dedupe(
                job.tmp,
                source + step,
                job.fds[index],
                offset + step,
                size,
                job.paths[index],
            )
            self.rest(time.monotonic() - began)
            job.differed += size - shared
            if index and shared:
                job.shared += shared
                job.sharers.add(job.paths[index])
        return ""


def _bursts(regions, size):
    """(offset, offset, length) moves of `regions`, at most `size` each."""
    for offset, length in regions:
        for start in range(offset, offset + length, size):
            piece = min(size, offset + length - start)
            yield (start, start, piece)


def _ranges_of(index, placed):
    """(source, offset, length) of the files of map `index` among the
    `placed` shares, merged where both sides are contiguous: fewer,
    longer dedupe calls, and fewer extent records in the file."""
    ranges = []
    for source, share in sorted(placed, key=lambda item: item[1].start):
        if index not in share.files:
            continue
        if ranges and (
            ranges[-1][0] + ranges[-1][2] == source
            and ranges[-1][1] + ranges[-1][2] == share.start
        ):
            ranges[-1][2] += share.length
        else:
            ranges.append([source, share.start, share.length])
    return ranges


def _open(stack, path):
    """A read-only descriptor of `path` closed with `stack` (enough for
    FIDEDUPERANGE as root, and for a read-only snapbase)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


def _open_into(stack, path, fds):
    """Append a read-only descriptor of `path` to `fds`; False if the file
    is gone."""
    try:
        fds.append(_open(stack, path))
    except layout.VANISHED:
        return False
    return True


def _dedupe(tmp_fd, source, fd, offset, size, path):
    """Bytes shared; 0 where the kernel can't (another filesystem)."""
    try:
        return fileops.dedupe(tmp_fd, source, fd, offset, size, path)
    except OSError as err:
        log.info("could not share new extents with %s: %s", path, err)
        return 0


# -- when each volume was last defragmented ---------------------------------


def last_done(pool_dir, vid):
    """When `vid` was last defragmented completely (seconds since the
    epoch), or None."""
    files = layout.VolumeFiles(pool_dir, vid)
    try:
        value = os.getxattr(files.directory, files.defrag_attribute)
        return float(value)
    except (OSError, ValueError):
        return None


def record_done(pool_dir, vid):
    """Note that `vid` was defragmented now."""
    files = layout.VolumeFiles(pool_dir, vid)
    stamp = str(int(time.time())).encode()  # never in the future
    fileops.set_attribute(files.directory, files.defrag_attribute, stamp)


# -- how and where it runs --------------------------------------------------------------

#: ioprio_set(2) by machine: not in Python's os module.
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13


def idle_priority():
    """Give the calling thread idle I/O priority (it gets the disk only
    when nothing else wants it) and the lowest CPU priority.  Linux keeps
    both per thread; best effort: an unknown machine keeps its priority."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    value = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
    if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, value) != 0:
        log.debug("ioprio_set: %s", os.strerror(ctypes.get_errno()))


def committed_vids(pool_dir):
    """The vids of the pool that have a committed image."""
    return sorted(
        vid
        for vid, kind, _path in inspect.pool_images(pool_dir)
        if kind == layout.COMMITTED
    )


def volume_running(pool_dir, vid):
    """Whether the volume has a running image on disk (a start arrived:
    its committed image is left alone)."""
    listing = layout.VolumeFiles(pool_dir, vid).scan()
    return listing.dirty or listing.running


def plan_pool(pool_dir, vids=None):
    """(plans worth carrying out, {vid: why it is left out}) for `vids`
    (default: every volume with a committed image).  ValueError names a
    vid that has no committed image."""
    known = committed_vids(pool_dir)
    for vid in vids or ():
        layout.check_vid(vid)
        if vid not in known:
            raise ValueError(
                f"{vid} has no committed image in {pool_dir}: "
                f"'qubes-reflink status {pool_dir}' lists the volumes"
            )
    plans, skipped = [], {}
    for vid in vids or known:
        if volume_running(pool_dir, vid):
            skipped[vid] = "running: defragmented after its stop"
            continue
        the_plan = plan(pool_dir, vid)
        if not the_plan.windows:
            skipped[vid] = f"not fragmented ({the_plan.extents} extents)"
            continue
        plans.append(the_plan)
    return plans, skipped
