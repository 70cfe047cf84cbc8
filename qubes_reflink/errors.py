"""Turning operating system errors into messages a Qubes user can act on."""

import errno

from .host import StoragePoolException

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space (remove unused VMs, or "
    "lower revisions_to_keep with qvm-volume config) and try again",
    errno.EDQUOT: "the disk quota is exhausted: free some space and try "
    "again",
    errno.EROFS: "the filesystem is mounted read-only: find out why "
    "(dmesg), remount it read-write and try again",
    errno.ELOOP: "a symbolic link stands where the driver expects a file; "
    "the driver never follows links inside its pool: remove the link",
    errno.EACCES: "permission denied: check the ownership and mode of the "
    "pool directory",
    errno.EPERM: "operation not permitted: check the pool directory (for "
    "example immutable attributes, chattr)",
    errno.EIO: "the disk reported an I/O error: check dmesg and the disk's "
    "health before retrying",
}


def storage_error(action, err):
    """A StoragePoolException for `err` (an OSError) during `action`."""
    where = f" ({err.filename})" if err.filename else ""
    hint = _HINTS.get(err.errno, "nothing was changed by the failed step")
    return StoragePoolException(
        f"{action} failed: {err.strerror or err}{where}; {hint}"
    )
