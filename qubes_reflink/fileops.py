"""Filesystem primitives: the only module that changes files on disk.

Everything the driver does to a file goes through here: reflink clones
(FICLONE) with a sparse-copy fallback, atomic publication (temporary name,
fsync, rename, directory fsync), durable renames, links and removals,
loop device capacity updates, and for defragmentation unnamed files
(O_TMPFILE), plain rewrites and FIDEDUPERANGE (which changes which extents
a file uses, never its bytes).  Each primitive logs what it did at INFO, so
``journalctl -fu qubesd`` shows every file created, cloned, copied, renamed
or removed.

Files are opened with O_NOFOLLOW and created with O_EXCL: a symbolic link
planted where the driver expects an image is an error, never followed.

Every mutating system call is a numbered *step* that a test can observe
through `set_step_hook`, to stop the process right before or after it.
"""

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct

log = logging.getLogger("qubes.storage.reflink")

FICLONE = 0x40049409
FIDEDUPERANGE = 0xC0189436
# struct file_dedupe_range: src_offset, src_length, dest_count, 2 reserved;
# then per destination struct file_dedupe_range_info: dest_fd, dest_offset,
# bytes_deduped, status, reserved
_DEDUPE_RANGE = struct.Struct("=QQHHI")
_DEDUPE_INFO = struct.Struct("=qQQiI")
_DEDUPE_DIFFERS = 1
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")

#: errno values by which a filesystem (or a pair of them) declines to clone.
_NO_CLONE = frozenset(
    {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)
#: errno values by which copy_file_range declines a pair of files.
_NO_COPY_RANGE = _NO_CLONE | {errno.EBADF, errno.EPERM}

#: errno values by which rmdir finds nothing to do: not empty, missing, or
#: not a directory (a symbolic link is never followed).
_NOT_REMOVABLE_DIR = frozenset(
    {errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST, errno.ENOTDIR}
)
_DIRECTORY_NOFOLLOW = (
    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
)

COPY_CHUNK = 64 * 1024**2
SEND_CHUNK = 8 * 1024**2
WRITE_BUFFER = 1024**2
_IMAGE_MODE = 0o600

_step_hook = None  # pylint: disable=invalid-name


class SourceChanged(Exception):
    """The file to copy is no longer the version the caller looked at."""


def set_step_hook(hook):
    """Call ``hook(step, phase, paths)`` around every mutating step.

    `phase` is "before" or "after".  Crash tests use it to kill the process
    at an exact point.  Returns the previous hook.
    """
    global _step_hook  # pylint: disable=global-statement
    previous, _step_hook = _step_hook, hook
    return previous


@contextlib.contextmanager
def step(name, *paths):
    """Mark a mutating step for the hook of `set_step_hook` (also used by
    the btrfs primitives)."""
    if _step_hook is not None:
        _step_hook(name, "before", paths)
    yield
    if _step_hook is not None:
        _step_hook(name, "after", paths)


def _open_existing(path, flags=os.O_RDONLY):
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def _create(path):
    """Create `path`, which must not exist yet, as an empty 0600 file."""
    with step("create", path):
        fd = os.open(
            path,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            _IMAGE_MODE,
        )
    log.info("created %s", path)
    return fd


def _fsync(fd, path):
    with step("fsync", path):
        os.fsync(fd)


def fsync_dir(path):
    """Make the entries of directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def fsync_file(path):
    """Make the data of file `path` durable."""
    fd = _open_existing(path)
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def _truncate(fd, path, size):
    with step("truncate", path):
        os.ftruncate(fd, size)


def _try_clone(src_fd, dst_fd, src, dst):
    """FICLONE `src` into `dst`; False if this pair of files can't do it."""
    try:
        with step("clone", src, dst):
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as err:
        if err.errno in _NO_CLONE:
            return False
        raise
    log.info("cloned %s to %s", src, dst)
    return True


def _data_extents(fd, size):
    """Yield (offset, length) of the data regions of a file; holes skipped."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def _copy_range(src_fd, dst_fd, offset, length):
    """Copy one data region in large chunks; False if the kernel declines."""
    end = offset + length
    while offset < end:
        try:
            copied = os.copy_file_range(
                src_fd, dst_fd, min(COPY_CHUNK, end - offset), offset, offset
            )
        except OSError as err:
            if err.errno in _NO_COPY_RANGE:
                return offset
            raise
        if copied == 0:
            break
        offset += copied
    return offset


def _send_range(src_fd, dst_fd, offset, end):
    """sendfile what copy_file_range could not do (another filesystem):
    page cache to page cache in the kernel, faster than ``cp``'s
    read/write.  Returns where it stopped (`end` unless declined)."""
    os.lseek(dst_fd, offset, os.SEEK_SET)
    while offset < end:
        try:
            sent = os.sendfile(
                dst_fd, src_fd, offset, min(SEND_CHUNK, end - offset)
            )
        except OSError as err:
            if err.errno in _NO_COPY_RANGE:
                return offset
            raise
        if sent == 0:
            break
        offset += sent
    return offset


def _write_range(src_fd, dst_fd, src_offset, dst_offset, length, buffer):
    """Plain read/write of `length` bytes (what neither copy_file_range nor
    sendfile could do, or what must not share extents), through one reused
    `buffer` (a memoryview): a new bytes object per read costs an mmap and
    page faults each time."""
    done = 0
    while done < length:
        count = os.preadv(
            src_fd,
            [buffer[: min(len(buffer), length - done)]],
            src_offset + done,
        )
        if not count:
            break
        written = 0
        while written < count:
            written += os.pwrite(
                dst_fd, buffer[written:count], dst_offset + done + written
            )
        done += count


def _sparse_copy(src_fd, dst_fd, src, dst):
    """Copy only the data regions of `src`, so holes stay holes in `dst`.

    A 64 GiB image holding 1 GiB of data costs 1 GiB of I/O.
    """
    size = os.fstat(src_fd).st_size
    buffer = memoryview(bytearray(WRITE_BUFFER))
    # read ahead as for a sequential reader (twice the default window),
    # as cp does: a copy from another disk waits on its reads
    os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    regions = list(_data_extents(src_fd, size))
    with step("copy", src, dst):
        if not regions or sum(regions[-1]) < size:
            # a hole at the end: size first, as growing a file whose data
            # is still in the page cache makes XFS write all of it back,
            # inside the truncate; else the copy appends, which XFS
            # allocates (and an fsync writes back) faster than writes
            # into a file already that large
            os.ftruncate(dst_fd, size)
        for offset, length in regions:
            done = _copy_range(src_fd, dst_fd, offset, length)
            if done < offset + length:
                done = _send_range(src_fd, dst_fd, done, offset + length)
            _write_range(
                src_fd, dst_fd, done, done, offset + length - done, buffer
            )
    log.info("copied %s to %s (sparse copy, no reflink)", src, dst)


def _same_version(stat_a, stat_b):
    return os.path.samestat(stat_a, stat_b) and (
        stat_a.st_mtime_ns,
        stat_a.st_size,
    ) == (stat_b.st_mtime_ns, stat_b.st_size)


def _fill(dst_fd, dst, src, size, expected=None):
    """Fill the new file `dst` with `src`'s data, then give it `size` bytes
    (grown with zeros, or cut).

    With `expected` (an os.stat_result), refuse with SourceChanged unless
    the file opened is still that version.
    """
    src_fd = _open_existing(src)
    try:
        if expected is not None and not _same_version(
            os.fstat(src_fd), expected
        ):
            raise SourceChanged(src)
        method = "clone"
        if not _try_clone(src_fd, dst_fd, src, dst):
            _sparse_copy(src_fd, dst_fd, src, dst)
            method = "copy"
        if size is not None and size != os.fstat(dst_fd).st_size:
            _truncate(dst_fd, dst, size)
        return method
    finally:
        os.close(src_fd)


def _remove_quietly(path):
    with contextlib.suppress(FileNotFoundError):
        with step("unlink", path):
            os.unlink(path)
        log.info("removed %s", path)


def make_copy(src, dst, size=None, expected=None):
    """Create `dst` as a copy (reflink if possible) of `src`; not published.

    For files that are garbage after a crash anyway (export snapshots, the
    image in a subvolume not yet snapshotted): no temporary name, no
    fsync.  `expected`: see `_fill`.  Returns "clone" or "copy".
    """
    dst_fd = _create(dst)
    try:
        return _fill(dst_fd, dst, src, size, expected)
    except BaseException:
        _remove_quietly(dst)
        raise
    finally:
        os.close(dst_fd)


def make_sparse(path, size):
    """Create `path` as an empty sparse file of `size` bytes; not published."""
    fd = _create(path)
    try:
        _truncate(fd, path, size)
    except BaseException:
        _remove_quietly(path)
        raise
    finally:
        os.close(fd)


def _publish(tmp, dst, fill):
    """Write `tmp` with `fill(fd)`, fsync it, rename it to `dst`, fsync dir."""
    fd = _create(tmp)
    try:
        result = fill(fd)
        _fsync(fd, tmp)
        os.close(fd)
        fd = None
        rename(tmp, dst)
        return result
    except BaseException:
        _remove_quietly(tmp)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def publish_copy(src, dst, tmp, size=None, expected=None):
    """Atomically make `dst` a durable copy of `src` (reflink if possible).

    The copy is written as `tmp` in the same directory; `dst` appears only
    complete.  `expected`: see `_fill`.  Returns "clone" or "copy".
    """
    return _publish(tmp, dst, lambda fd: _fill(fd, tmp, src, size, expected))


def publish_sparse(dst, tmp, size):
    """Atomically make `dst` a durable empty sparse file of `size` bytes."""
    _publish(tmp, dst, lambda fd: _truncate(fd, tmp, size))


def publish(tmp, dst):
    """Make the finished file `tmp` durable and atomically rename it to `dst`."""
    fsync_file(tmp)
    rename(tmp, dst)


def rename(src, dst):
    """Rename `src` to `dst` (replacing it) and make that durable.

    The fsync of `dst`'s directory makes the new name durable; on XFS and
    ext4 a rename is one journal transaction, so that also removes the old
    name for good.  btrfs does not: after a rename across directories and
    an fsync of the new one only, a power cut there leaves the file under
    both names (a hard link; see docs/DESIGN.md, "What a power cut leaves
    on btrfs").  So the old directory is fsynced too: once this returns,
    the old name is durably gone on every filesystem.
    """
    with step("rename", src, dst):
        os.rename(src, dst)
    log.info("renamed %s to %s", src, dst)
    _fsync_dirs(dst)
    if os.path.dirname(src) != os.path.dirname(dst):
        _fsync_dirs(src)


def link(src, dst, durable=True):
    """Give the file `src` the second name `dst`; never follows.

    With ``durable=False`` the directory is not fsynced: for a caller whose
    next step is a durable `rename` in the same directory, whose directory
    fsync makes this link durable too (one fsync less on a start or stop).
    """
    with step("link", src, dst):
        os.link(src, dst, follow_symlinks=False)
    log.info("linked %s to %s", src, dst)
    if durable:
        _fsync_dirs(dst)


def remove_files(paths, durable=True):
    """Remove `paths` (missing ones are fine) and make that durable.

    Returns the paths actually removed.  Symbolic links are removed as
    links; their targets are never touched.  With ``durable=False`` the
    directories are not fsynced: for files nothing refers to any more
    (the trash), whose removal a crash may undo without harm.
    """
    removed = []
    for path in paths:
        try:
            with step("unlink", path):
                os.unlink(path)
        except FileNotFoundError:
            continue
        log.info("removed %s", path)
        removed.append(path)
    if durable:
        _fsync_dirs(*removed)
    return removed


def discard(moves):
    """Take files away now and leave their deletion for later.

    Deleting a file whose extents are shared with other files costs time in
    proportion to its extents (a third of a second at 30,000 on btrfs) that
    a VM's stop need not wait for.  So each `path` of the (path, trash_path)
    pairs `moves` is renamed to its `trash_path`, and their directories are
    fsynced: once this returns, they are durably gone.  Where the trash
    can't take a file (on another filesystem, as a VM directory on a mount
    or subvolume of its own; a trash directory that is a symbolic link,
    never followed; any other error), it is removed here instead, as it
    would be without a trash.  Missing files are fine.  Returns the paths
    moved to the trash.
    """
    moved = []
    for path, trash_path in moves:
        try:
            _move_into_trash(path, trash_path)
        except FileNotFoundError:
            if os.path.lexists(path):  # the trash went away meanwhile
                remove_files([path])
            continue
        except OSError as err:
            log.info(
                "%s can't go to the trash (%s): removing it now", path, err
            )
            remove_files([path])
            continue
        moved.append(path)
    _fsync_dirs(*moved)
    return moved


def _move_into_trash(path, trash_path):
    """Rename `path` to `trash_path`, making the trash directory if missing;
    the rename goes through a descriptor of that directory opened without
    following a symbolic link."""
    directory, name = os.path.split(trash_path)
    make_dirs(directory)
    dir_fd = os.open(directory, _DIRECTORY_NOFOLLOW)
    try:
        with step("rename", path, trash_path):
            os.rename(path, name, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    log.info(
        "moved %s to %s, to be removed in the background", path, trash_path
    )


def _fsync_dirs(*paths):
    for directory in sorted({os.path.dirname(path) for path in paths}):
        # a directory removed meanwhile (the last volume of a VM going away
        # concurrently) has no entries left to make durable
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)


def resize_in_place(path, size):
    """Give the file `path` `size` bytes in place (grown with zeros, or
    cut), durably."""
    fd = _open_existing(path, os.O_WRONLY)
    try:
        _truncate(fd, path, size)
        _fsync(fd, path)
    finally:
        os.close(fd)
    log.info("resized %s to %d bytes", path, size)


@contextlib.contextmanager
def directory_lock(path):
    """Hold an exclusive lock on the directory `path` (flock), between
    processes: qubesd pruning revisions and the qubes-reflink tool pinning
    one, for instance, must not interleave.  A missing directory is no
    lock, and nothing to protect."""
    try:
        fd = os.open(path, _DIRECTORY_NOFOLLOW)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def make_dirs(path):
    """Create directory `path` and missing parents; return those created."""
    created = []
    missing = path
    while not os.path.isdir(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    made = []
    for directory in reversed(created):
        try:
            with step("mkdir", directory):
                os.mkdir(directory, 0o755)
        except FileExistsError:
            if os.path.isdir(directory):  # made meanwhile by another volume
                continue
            raise
        log.info("created directory %s", directory)
        fsync_dir(os.path.dirname(directory))
        made.append(directory)
    return made


def remove_empty_dirs(paths):
    """Remove those of the directories `paths` that are empty, in order."""
    for directory in paths:
        try:
            with step("rmdir", directory):
                os.rmdir(directory)
        except OSError as err:
            if err.errno in _NOT_REMOVABLE_DIR:
                continue
            raise
        log.info("removed directory %s", directory)
        fsync_dir(os.path.dirname(directory))


def can_reflink(src_probe, dst_probe):
    """Whether files can be reflinked from where `src_probe` lies to where
    `dst_probe` lies, found out by cloning a small throwaway file.

    Both probes are fresh names that this call creates and removes.
    """
    src_fd = _create(src_probe)
    try:
        os.write(src_fd, b"qubes-reflink probe\n" * 205)
        dst_fd = _create(dst_probe)
        try:
            return _try_clone(src_fd, dst_fd, src_probe, dst_probe)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
        remove_files([src_probe, dst_probe])


def same_file(path_a, path_b):
    """True if both paths name the same inode; False if either is missing."""
    try:
        stat_a = os.stat(path_a, follow_symlinks=False)
        stat_b = os.stat(path_b, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return os.path.samestat(stat_a, stat_b)


def through_symlink(path, root):
    """True if a component of `path` below the directory `root` is a
    symbolic link (a missing component ends the check: nothing to follow).
    """
    current = root
    for part in os.path.relpath(path, root).split(os.sep):
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return True
        except FileNotFoundError:
            return False
    return False


def stat_or_none(path):
    """os.stat of `path` without following links, None if it is missing."""
    try:
        return os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None


def filesystem_usage(path):
    """(size, used) in bytes of the filesystem holding `path`."""
    stats = os.statvfs(path)
    size = stats.f_blocks * stats.f_frsize
    return size, size - stats.f_bfree * stats.f_frsize


def free_space(path):
    """Bytes an unprivileged writer could still allocate on the
    filesystem of `path`, once what it freed is committed (btrfs counts
    freed extents, and allocations, only then)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        commit_filesystem(fd)
        stats = os.fstatvfs(fd)
    finally:
        os.close(fd)
    return stats.f_bavail * stats.f_frsize


def _kernel_dev(encoded):
    """(major, minor) of a dev_t in the kernel's new encoding."""
    return (encoded & 0xFFF00) >> 8, (encoded & 0xFF) | (
        (encoded >> 12) & 0xFFF00
    )


def _refresh_if_backed_by(loop_dev, stat_result):
    """LOOP_SET_CAPACITY on `loop_dev` if its backing file is that inode."""
    try:
        fd = os.open(loop_dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = bytearray(_LOOP_INFO64.size)
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        except OSError:  # not bound to a file
            return False
        lo_device, lo_inode = _LOOP_INFO64.unpack(info)[:2]
        if lo_inode != stat_result.st_ino or _kernel_dev(lo_device) != (
            os.major(stat_result.st_dev),
            os.minor(stat_result.st_dev),
        ):
            return False
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
        return True
    finally:
        os.close(fd)


def refresh_loop_devices(path):
    """Tell every loop device backed by `path` that its size changed.

    A running VM's disk is a loop device over its ``-dirty.img``; after the
    file grows, LOOP_SET_CAPACITY makes the device (and so the VM) see it.
    Returns the loop devices updated.
    """
    stat_result = os.stat(path)
    updated = []
    for name in sorted(os.listdir("/sys/block")):
        loop_dev = "/dev/" + name
        if name.startswith("loop") and _refresh_if_backed_by(
            loop_dev, stat_result
        ):
            log.info("updated capacity of %s backed by %s", loop_dev, path)
            updated.append(loop_dev)
    return updated


def set_image_mode(path):
    """Give the image `path` the driver's mode 0600, durably; never follows
    a symbolic link.  Returns the previous mode bits."""
    fd = _open_existing(path)
    try:
        old = os.fstat(fd).st_mode & 0o7777
        with step("chmod", path):
            os.fchmod(fd, _IMAGE_MODE)
        _fsync(fd, path)
    finally:
        os.close(fd)
    log.info("changed mode of %s from %04o to %04o", path, old, _IMAGE_MODE)
    return old


def _write_all(fd, data, like):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if like is not None:
        os.fchown(fd, like.st_uid, like.st_gid)
        os.fchmod(fd, like.st_mode & 0o7777)


def write_file(path, data, tmp, like=None, replace=True):
    """Atomically make `path` a durable file holding the bytes `data`.

    Written and fsynced as `tmp` first; `like` (an os.stat_result) gives the
    mode and owner to keep, e.g. those of the file being replaced.  With
    `replace=False` an existing `path` is an error (FileExistsError), never
    overwritten.
    """
    fd = _create(tmp)
    try:
        _write_all(fd, data, like)
        _fsync(fd, tmp)
        os.close(fd)
        fd = None
        if replace:
            rename(tmp, path)
        else:
            link(tmp, path)
    finally:
        if fd is not None:
            os.close(fd)
        if not replace or os.path.lexists(tmp):
            _remove_quietly(tmp)


def open_unnamed(directory):
    """A new file without a name in `directory` (O_TMPFILE), open for
    writing: what a crash leaves of it, the filesystem frees at its next
    mount, so it never needs cleaning up."""
    with step("create", directory):
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    log.info("created an unnamed temporary file in %s", directory)
    return fd


def rewrite_regions(src_fd, dst_fd, moves, src, dst):
    """Write the byte ranges `moves` ((src_offset, dst_offset, length)) of
    `src` into the file `dst` by plain reads and writes, never
    copy_file_range or a clone, which would share `src`'s (fragmented)
    extents instead of allocating new ones.  Not durable: see
    `fdatasync`."""
    buffer = memoryview(bytearray(WRITE_BUFFER))
    with step("write", src, dst):
        for src_offset, dst_offset, length in moves:
            _write_range(src_fd, dst_fd, src_offset, dst_offset, length, buffer)
    log.debug("rewrote %d ranges of %s into %s", len(moves), src, dst)


def fdatasync(fd, path):
    """Make the data written to `fd` durable (before anything is made to
    share it)."""
    with step("fsync", path):
        os.fdatasync(fd)


def dedupe(src_fd, src_offset, dst_fd, offset, length, dst):
    """Make `dst`'s bytes [offset, offset + length) use the extents of
    `src_fd`'s bytes from `src_offset`, if the kernel finds them identical
    (FIDEDUPERANGE compares the data under lock and changes no byte).

    Returns the bytes now shared: less than `length` where the data
    differ (that part is left as it was).  OSError for files the kernel
    can't dedupe (another filesystem, a file being swapped...).
    """
    done = 0
    while done < length:
        buf = bytearray(_DEDUPE_RANGE.size + _DEDUPE_INFO.size)
        _DEDUPE_RANGE.pack_into(
            buf, 0, src_offset + done, length - done, 1, 0, 0
        )
        _DEDUPE_INFO.pack_into(
            buf, _DEDUPE_RANGE.size, dst_fd, offset + done, 0, 0, 0
        )
        with step("dedupe", dst):
            fcntl.ioctl(src_fd, FIDEDUPERANGE, buf)
        _fd, _off, deduped, status, _ = _DEDUPE_INFO.unpack_from(
            buf, _DEDUPE_RANGE.size
        )
        if status < 0:
            raise OSError(-status, os.strerror(-status), dst)
        if status == _DEDUPE_DIFFERS or deduped == 0:
            break
        done += deduped
    log.debug("shared %d of %d bytes at %d of %s", done, length, offset, dst)
    return done


def prefetch(fd, offset, length):
    """Read a range into the page cache ahead of a FIDEDUPERANGE, whose
    comparison reads one page at a time, waiting for each."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def drop_cache(fd, offset, length):
    """Ask the kernel to drop the cached pages of a range it read for a
    defragmentation, not to crowd out what the VMs use."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def commit_filesystem(fd):
    """Commit the filesystem holding `fd` (syncfs): what its last changes
    freed becomes free space (btrfs holds freed extents until then)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def set_attribute(path, name, value):
    """Set the extended attribute `name` of `path` to the bytes `value`
    (one atomic step)."""
    with step("setxattr", path):
        os.setxattr(path, name, value, follow_symlinks=False)
    log.info("set %s of %s to %s", name, path, value.decode(errors="replace"))
