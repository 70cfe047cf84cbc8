"""A volume's revisions: commit, prune, revert.

A commit never copies: the committed image gets a second name (a hard
link) as the newest revision, then the new image is renamed over the
committed name.  At every instant the volume has committed data, old or
new, and a crash between the two steps leaves the old data under both
names, which the next commit recognises (`fileops.same_file`) instead of
linking it twice.  Revisions beyond the count to keep are discarded
oldest first, after the rename.
"""

from . import fileops
from .host import StoragePoolException, isodate


class Revisions:
    """The revisions of one volume (`layout.VolumeFiles`)."""

    def __init__(self, files, trash):
        self._files = files
        self._trash = trash

    def commit(self, new_image, keep, listing):
        """Make `new_image` the committed image, durably and atomically;
        the previous one becomes the newest revision if `keep` > 0.

        `listing` is the directory as read before; the commit reads it
        once more, after the rename, to prune.  Returns that listing.
        """
        fileops.fsync_file(new_image)
        files = self._files
        current = fileops.stat_or_none(files.committed)
        if (
            keep > 0
            and current is not None
            and not any(
                fileops.same_file(r.path, files.committed)
                for r in listing.revisions
            )
        ):
            number = max((r.number for r in listing.revisions), default=0)
            stamp = isodate(int(current.st_mtime))
            # made durable by the rename's directory fsync below
            fileops.link(
                files.committed,
                files.revision(number + 1, stamp),
                durable=False,
            )
        fileops.rename(new_image, files.committed)
        after = files.scan()
        self.prune(max(keep, 0), after.revisions)
        # copies of the image just replaced: taken away with the pruned
        # revisions, so that one sweep deletes both
        self._trash.discard(after.spares.values())
        return after

    def prune(self, keep, revisions):
        """Discard the oldest of `revisions` beyond the newest `keep`."""
        excess = revisions[: max(len(revisions) - keep, 0)]
        self._trash.discard(rev.path for rev in excess)

    def choose(self, revision, revisions):
        """The path of `revision` (None: the newest) among `revisions`."""
        if revision is None:
            chosen = revisions[-1:]
        else:
            chosen = [rev for rev in revisions if rev.id == revision]
        if len(chosen) != 1:
            known = ", ".join(rev.id for rev in revisions) or "none"
            problem = "ambiguous" if chosen else "unknown"
            raise StoragePoolException(
                f"Cannot revert volume {self._files.vid}: {problem} revision "
                f"{revision!r} (revisions: {known})"
            )
        return chosen[0].path
