"""Refusals: files and directories the driver must not write through.

A VM writes to its running image, and a resize grows it: if a symbolic or
hard link had been planted there, or a volume's directory led out of the
pool through a symbolic link, the driver would change a file outside the
pool.  These checks refuse such paths before anything is touched.
"""

import stat

from . import fileops
from .host import StoragePoolException


def check_inside_pool(directories, root, vid):
    """Refuse to work on volume `vid` if one of its `directories` is (or
    lies below) a symbolic link: its files would lie outside the pool."""
    for directory in sorted(set(directories)):
        if fileops.through_symlink(directory, root):
            raise StoragePoolException(
                f"Refusing to touch volume {vid}: {directory} "
                "is (or lies below) a symbolic link, so it leads out of "
                f"the pool directory {root}; remove the link"
            )


def check_own_image(path):
    """Refuse a link planted where an image that a VM writes to goes.

    The driver's running images and spares are regular files with one
    name; a symbolic or hard link there would let the VM, or a resize,
    write into a file outside the pool.
    """
    stat_result = fileops.stat_or_none(path)
    if stat_result is not None and (
        not stat.S_ISREG(stat_result.st_mode) or stat_result.st_nlink != 1
    ):
        raise StoragePoolException(
            f"{path} is a symbolic link, a hard link or no regular file, "
            "where the driver expects an image file of its own: it will "
            "not attach or change it; move it away and try again"
        )


def link_count(path):
    """Names of the regular file `path` (1 for anything else or nothing).

    A power cut during a start that renamed a spare into a VM's directory
    can leave it under both names on btrfs (docs/DESIGN.md): then it is
    that VM's image, whatever it holds now, and no spare any more.
    """
    stat_result = fileops.stat_or_none(path)
    if stat_result is None or not stat.S_ISREG(stat_result.st_mode):
        return 1
    return stat_result.st_nlink
