"""The spare cache: ready copies of committed images, so a start renames.

Starting a VM should cost a rename, not a clone.  So each origin volume
keeps a *spare*: a reflink copy of its committed image, named after the
identity (inode, mtime, size) of that image (`layout.spare_key`).  A start
renames a spare of the current version into place; one of another version
no longer matches any name a start looks for, and `judgement` calls it
garbage.  Spares are made in the background (`background`), under the
volume's lock.

Snapshot volumes (an AppVM's root, a disposable VM's volumes) keep no
spare of their own: they take their source's, and the source makes the
next one.  On btrfs every reflink of an extent makes later clones and
deletions of it slower, so one spare per template version, not one per
stopped AppVM, keeps a template's updates and the background work after a
burst of stops independent of how many AppVMs use it.
"""

import contextlib
import errno

from . import fileops, guards, layout


def make(files, stat_result):
    """Clone `files`' committed image, whose stat is `stat_result`, as its
    spare; nothing if the image changes meanwhile (the next commit asks
    for a new one)."""
    with contextlib.suppress(fileops.SourceChanged):
        fileops.publish_copy(
            files.committed,
            files.spare(layout.spare_key(stat_result)),
            files.temp(),
            expected=stat_result,
        )


def take(files, key, dst, trash):
    """Rename the spare of version `key` found in `files`' directory to
    `dst`; False if there is none (another start took it first, it lies on
    another filesystem, or a power cut left it linked to another image,
    then it is discarded to `trash`)."""
    spare = files.spare(key)
    if guards.link_count(spare) > 1:
        trash.discard([spare])
        return False
    guards.check_own_image(spare)
    try:
        fileops.rename(spare, dst)
    except FileNotFoundError:
        return False
    except OSError as err:
        if err.errno != errno.EXDEV:  # a source in a pool elsewhere
            raise
        return False
    return True
