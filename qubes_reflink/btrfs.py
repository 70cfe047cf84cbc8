"""btrfs subvolume primitives: create, snapshot, destroy, through ioctls;
and what the filesystem says of its space (metadata, unallocated).

The second mechanism beside reflinks (`fileops`): a snapshot of a
subvolume costs the same whatever its files' size or fragmentation, where
a reflink clone walks every extent.  Called with `fcntl.ioctl` (no
subprocess, no btrfs-progs in dom0's way); each step is logged and goes
through the crash tests' step hook like every other change to files.

A snapshot is made in a transaction commit: once the ioctl returns, the
new subvolume and everything its source held is durable.  A destroyed
subvolume's extents are freed later by the filesystem's cleaner.
"""

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from typing import NamedTuple

from .fileops import remove_files, step

log = logging.getLogger("qubes.storage.reflink")


def _iow(number, size):
    """The Linux _IOW ioctl request for btrfs (magic 0x94)."""
    return (1 << 30) | (size << 16) | (0x94 << 8) | number


# struct btrfs_ioctl_vol_args: __s64 fd; char name[4088]
_VOL_ARGS = struct.Struct("=q4088s")
# struct btrfs_ioctl_vol_args_v2: __s64 fd; __u64 transid, flags;
# __u64 unused[4]; char name[4040]
_VOL_ARGS_V2 = struct.Struct("=qQQ32x4040s")
_SUBVOL_CREATE = _iow(14, _VOL_ARGS.size)
_SNAP_DESTROY = _iow(15, _VOL_ARGS.size)
_SNAP_CREATE_V2 = _iow(23, _VOL_ARGS_V2.size)
_SNAP_DESTROY_V2 = _iow(63, _VOL_ARGS_V2.size)
_SUBVOL_SETFLAGS = _iow(26, 8)  # __u64 flags
_SUBVOL_RDONLY = 1 << 1
# struct btrfs_ioctl_space_args: __u64 space_slots, total_spaces; then
# struct btrfs_ioctl_space_info: __u64 flags, total_bytes, used_bytes
_SPACE_ARGS = struct.Struct("=QQ")
_SPACE_INFO = struct.Struct("=QQQ")
_SPACE_INFO_IOC = (3 << 30) | (_SPACE_ARGS.size << 16) | (0x94 << 8) | 20
_BLOCK_GROUP_METADATA = 1 << 2
_SPACE_INFO_GLOBAL_RSV = 1 << 49
# struct btrfs_ioctl_fs_info_args (1024 bytes): __u64 max_id, num_devices
_FS_INFO_IOC = (2 << 30) | (1024 << 16) | (0x94 << 8) | 31
# struct btrfs_ioctl_dev_info_args (4096 bytes): __u64 devid;
# __u8 uuid[16]; __u64 bytes_used, total_bytes
_DEV_INFO = struct.Struct("=Q16sQQ")
_DEV_INFO_IOC = (3 << 30) | (4096 << 16) | (0x94 << 8) | 30
#: The inode number of every subvolume's top directory.
_SUBVOL_INODE = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: errno values that say "no subvolumes here", not "this one failed": not
#: btrfs (ENOTTY), no permission, an ioctl the kernel does not know.
UNSUPPORTED = frozenset(
    {
        errno.ENOTTY,
        errno.EPERM,
        errno.EACCES,
        errno.EOPNOTSUPP,
        errno.EINVAL,
    }
)


def _ioctl(fd, request, args):
    # a mutable buffer: fcntl copies at most 1024 bytes of an immutable one
    fcntl.ioctl(fd, request, bytearray(args))


@contextlib.contextmanager
def _dir_fd(path):
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _name(path):
    name = os.path.basename(path)
    return name.encode("utf-8", "surrogateescape")


def is_subvolume(path):
    """Whether `path` is the top directory of a btrfs subvolume (never
    following a symbolic link)."""
    try:
        stat_result = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(stat_result.st_mode)
        and stat_result.st_ino == _SUBVOL_INODE
    )


def create(path):
    """A new empty subvolume at `path`."""
    with step("subvolume-create", path), _dir_fd(os.path.dirname(path)) as fd:
        _ioctl(fd, _SUBVOL_CREATE, _VOL_ARGS.pack(-1, _name(path)))
    log.info("created subvolume %s", path)


def snapshot(src, dst, read_only=False):
    """Snapshot the subvolume `src` as `dst` (durable on return)."""
    flags = _SUBVOL_RDONLY if read_only else 0
    with step("subvolume-snapshot", src, dst), _dir_fd(src) as src_fd:
        with _dir_fd(os.path.dirname(dst)) as parent_fd:
            args = _VOL_ARGS_V2.pack(src_fd, 0, flags, _name(dst))
            _ioctl(parent_fd, _SNAP_CREATE_V2, args)
    log.info("snapshot of subvolume %s made as %s", src, dst)


def destroy(path):
    """Delete the subvolume `path` with what it holds; missing is fine.

    The v2 ioctl first; kernels before 5.7 (EINVAL, ENOTTY) get the old
    one.  Where the kernel does not permit it (no CAP_SYS_ADMIN, as in a
    user namespace), the subvolume is emptied and removed as a directory,
    which its owner may do.  A directory that is no subvolume is refused
    (EINVAL).
    """
    if not os.path.lexists(path):
        return
    if not is_subvolume(path):
        raise OSError(errno.EINVAL, "not a btrfs subvolume", path)
    with step("subvolume-destroy", path), _dir_fd(os.path.dirname(path)) as fd:
        try:
            _destroy_ioctl(fd, path)
        except PermissionError:
            _remove_as_directory(path)
    log.info("destroyed subvolume %s", path)


def _destroy_ioctl(fd, path):
    try:
        args = _VOL_ARGS_V2.pack(0, 0, 0, _name(path))
        _ioctl(fd, _SNAP_DESTROY_V2, args)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
        _ioctl(fd, _SNAP_DESTROY, _VOL_ARGS.pack(0, _name(path)))


def _remove_as_directory(path):
    """Remove the subvolume `path` the way its owner may (Linux 4.18 and
    later rmdir an empty subvolume): made writable if it is read-only (a
    snapbase), then the files the layout keeps in it (``image.img``) are
    unlinked, then the directory removed."""
    with _dir_fd(path) as fd:
        fcntl.ioctl(fd, _SUBVOL_SETFLAGS, struct.pack("=Q", 0))
    # not durable: they go with the subvolume, whose removal is the step
    remove_files(
        [os.path.join(path, name) for name in os.listdir(path)], durable=False
    )
    os.rmdir(path)


class Space(NamedTuple):
    """What a btrfs filesystem allocated to metadata and used of it, the
    part of it kept in reserve for emergencies, and what no chunk holds
    yet (where metadata can still grow)."""

    metadata_size: int
    metadata_usage: int
    global_reserve: int
    unallocated: int


def space(path):
    """The `Space` of the btrfs filesystem holding the directory `path`,
    from the kernel's space info (no btrfs-progs); None if it is no
    btrfs.  Metadata counts once, whatever its profile (DUP)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        infos = _space_infos(fd)
        if infos is None:
            return None
        size = usage = reserve = 0
        for flags, total, used in infos:
            if flags & _SPACE_INFO_GLOBAL_RSV:
                reserve += total
            elif flags & _BLOCK_GROUP_METADATA:
                size += total
                usage += used
        return Space(size, usage, reserve, _unallocated(fd))
    finally:
        os.close(fd)


def _space_infos(fd):
    """(flags, total_bytes, used_bytes) of each space kind; None: not
    btrfs."""
    head = bytearray(_SPACE_ARGS.size)
    try:
        fcntl.ioctl(fd, _SPACE_INFO_IOC, head)
    except OSError as err:
        if err.errno in UNSUPPORTED:
            return None
        raise
    count = _SPACE_ARGS.unpack_from(head)[1]
    buf = bytearray(_SPACE_ARGS.size + count * _SPACE_INFO.size)
    _SPACE_ARGS.pack_into(buf, 0, count, 0)
    fcntl.ioctl(fd, _SPACE_INFO_IOC, buf)
    found = _SPACE_ARGS.unpack_from(buf)[1]
    return [
        _SPACE_INFO.unpack_from(buf, _SPACE_ARGS.size + i * _SPACE_INFO.size)
        for i in range(min(found, count))
    ]


def _unallocated(fd):
    """Bytes of the filesystem's devices that no chunk holds yet."""
    info = bytearray(1024)
    fcntl.ioctl(fd, _FS_INFO_IOC, info)
    max_id, num_devices = struct.unpack_from("=QQ", info)
    free = 0
    for devid in range(1, max_id + 1):
        args = bytearray(4096)
        _DEV_INFO.pack_into(args, 0, devid, bytes(16), 0, 0)
        try:
            fcntl.ioctl(fd, _DEV_INFO_IOC, args)
        except FileNotFoundError:  # a removed device's id
            continue
        _devid, _uuid, used, total = _DEV_INFO.unpack_from(args)
        free += max(total - used, 0)
        num_devices -= 1
        if num_devices == 0:
            break
    return free
