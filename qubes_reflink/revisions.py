"""A volume's revisions: commit, prune, pins, the restore point, reverts.

A commit never copies: the committed image gets a second name (a hard
link) as the newest revision, then the new image is renamed over the
committed name.  At every instant the volume has committed data, old or
new, and a crash between the two steps leaves the old data under both
names, which the next commit recognises (`fileops.same_file`) instead of
linking it twice.

Pruning keeps the newest `revisions_to_keep` revisions, and beyond them
the pinned ones (an empty marker ``~pin.<id>`` each, made by
``qubes-reflink pin``) and the *restore point*: with the pool option
``keep_revision_older_than=SECONDS``, the newest revision committed at
least SECONDS ago, so that however often a qube restarts, the data it had
SECONDS ago stays.  qubesd prunes while the tool may pin: both hold the
volume directory's lock (`fileops.directory_lock`), so a pin either holds
or fails.

A revert asked for while the volume runs is a marker ``~revert.<id>``,
applied by the stop (`apply_revert`): the run's data becomes the newest
revision, the chosen revision the committed data.  Each step leaves a
state from which the next stop (qubesd's recovery) finishes the revert.
"""

import calendar
import logging
import os
import time
from typing import NamedTuple

from . import fileops
from .host import StoragePoolException, isodate

log = logging.getLogger("qubes.storage.reflink")


class Policy(NamedTuple):
    """What pruning keeps."""

    keep: int  # revisions_to_keep (-1: snapshots disabled, none kept)
    older_than: int = 0  # keep_revision_older_than, seconds (0: off)


def epoch(timestamp):
    """Seconds since the epoch of a revision's UTC timestamp."""
    return calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%S"))


def restore_point(revisions, older_than, now=None):
    """The newest of `revisions` committed at least `older_than` seconds
    before `now`, or None."""
    if older_than <= 0:
        return None
    limit = (time.time() if now is None else now) - older_than
    old = [rev for rev in revisions if epoch(rev.timestamp) <= limit]
    return max(old, key=lambda rev: epoch(rev.timestamp), default=None)


def prunable(listing, policy, now=None):
    """The revisions of `listing` that pruning discards, oldest first."""
    ordinary = [rev for rev in listing.revisions if rev.id not in listing.pins]
    excess = ordinary[: max(len(ordinary) - max(policy.keep, 0), 0)]
    kept = restore_point(listing.revisions, policy.older_than, now)
    return [rev for rev in excess if rev != kept]


class Revisions:
    """The revisions of one volume (`layout.VolumeFiles`)."""

    def __init__(self, files, trash):
        self._files = files
        self._trash = trash

    def commit(self, new_image, policy, listing):
        """Make `new_image` the committed image, durably and atomically;
        the previous one becomes the newest revision if `policy` keeps any.

        `listing` is the directory as read before; the commit reads it
        once more, after the rename, to prune.  Returns that listing.
        """
        fileops.fsync_file(new_image)
        if policy.keep > 0:
            self._keep_committed(listing)
        fileops.rename(new_image, self._files.committed)
        after = self.prune(policy)
        # copies of the image just replaced: taken away with the pruned
        # revisions, so that one sweep deletes both
        self._trash.discard(after.spares.values())
        return after

    def _keep_committed(self, listing):
        """Link the committed image as a new revision, unless a revision
        is that image already; made durable by the directory fsync of the
        rename that follows.  Returns the highest revision number now."""
        files = self._files
        number = max((r.number for r in listing.revisions), default=0)
        current = fileops.stat_or_none(files.committed)
        if current is None or any(
            fileops.same_file(r.path, files.committed)
            for r in listing.revisions
        ):
            return number
        stamp = isodate(int(current.st_mtime))
        path = files.revision(number + 1, stamp)
        fileops.link(files.committed, path, durable=False)
        return number + 1

    def prune(self, policy, now=None):
        """Discard what `prunable` says, holding the directory's lock so
        that a pin made meanwhile is seen; returns the listing read."""
        with fileops.directory_lock(self._files.directory):
            listing = self._files.scan()
            excess = prunable(listing, policy, now)
            self._trash.discard(rev.path for rev in excess)
        return listing

    def choose(self, revision, revisions):
        """The revision `revision` (None: the newest) among `revisions`."""
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
        return chosen[0]

    def revert(self, revision, policy):
        """Make `revision` (None: the newest) the committed data of the
        stopped volume; the current committed data becomes a revision."""
        listing = self._files.scan()
        chosen = self.choose(revision, listing.revisions)
        self.commit(self._committable(chosen, listing), policy, listing)

    def _committable(self, chosen, listing):
        """An image of revision `chosen` to commit: the revision itself
        (its name goes), or a clone of a pinned one, which stays."""
        if chosen.id not in listing.pins:
            return chosen.path
        clone = self._files.temp()
        fileops.make_copy(chosen.path, clone)
        return clone

    # -- a revert asked for while the volume runs -----------------------------

    def request_revert(self, revision):
        """Record that the stop is to revert to `revision` (None: the
        newest); a second request replaces the first.  Returns its id."""
        files = self._files
        with fileops.directory_lock(files.directory):
            listing = files.scan()
            chosen = self.choose(revision, listing.revisions)
            # the new request is durable before the old ones go
            fileops.write_file(
                files.revert_request(chosen.id), b"", files.temp()
            )
            old = [p for i, p in listing.reverts.items() if i != chosen.id]
            fileops.remove_files(old)
        log.info("%s: revert to revision %s at stop", files.vid, chosen.id)
        return chosen.id

    def apply_revert(self, policy, listing):
        """The stop of a volume with a revert request: keep the run's data
        (and the committed data it started from) as the newest revisions,
        make the requested revision the committed data, then drop the
        request.  From any step, the next stop finishes it."""
        files = self._files
        wanted = _newest_request(listing)
        if wanted not in {rev.id for rev in listing.revisions}:
            return self._revert_target_gone(wanted, policy, listing)
        if os.path.exists(files.dirty):
            self._retire_running(policy, listing)
            listing = files.scan()
        chosen = [rev for rev in listing.revisions if rev.id == wanted]
        if chosen:
            image = self._committable(chosen[0], listing)
            fileops.publish(image, files.committed)
            log.info("%s: reverted to revision %s", files.vid, wanted)
        self._trash.discard(listing.spares.values())
        after = self.prune(policy)
        # last: until the request is gone, the next stop finishes the work
        fileops.remove_files(listing.reverts.values())
        return after

    def _revert_target_gone(self, wanted, policy, listing):
        """The requested revision is gone: after a crash, because the revert
        renamed it into place already; else (removed by hand) the run is
        committed as without a request."""
        files = self._files
        fileops.remove_files(listing.reverts.values())
        if not os.path.exists(files.dirty):
            return self.prune(policy)
        log.warning(
            "%s: revision %s to revert to is gone: the run is committed",
            files.vid,
            wanted,
        )
        return self.commit(files.dirty, policy, listing)

    def _retire_running(self, policy, listing):
        """The run's data becomes the newest revision (after the committed
        data it started from), or, keeping none, goes."""
        files = self._files
        if policy.keep <= 0:
            self._trash.discard([files.dirty])
            return
        fileops.fsync_file(files.dirty)
        number = self._keep_committed(listing) + 1
        stamp = isodate(int(os.stat(files.dirty).st_mtime))
        fileops.rename(files.dirty, files.revision(number, stamp))


def _newest_request(listing):
    """The revision id of the newest revert request in `listing` (a crash
    while one replaced another may leave both)."""

    def age(revision_id):
        found = fileops.stat_or_none(listing.reverts[revision_id])
        return (found.st_mtime_ns if found else 0, revision_id)

    return max(listing.reverts, key=age)


# -- what the qubes-reflink tool changes, while qubesd may run ----------------


def pin(files, revision_id):
    """Pin revision `revision_id` of the volume `files`: pruning keeps it
    from now on.  False if it was pinned already; LookupError if there is
    no such revision."""
    with fileops.directory_lock(files.directory):
        listing = files.scan()
        _known(files, listing, revision_id)
        if revision_id in listing.pins:
            return False
        fileops.write_file(files.pin(revision_id), b"", files.temp())
    log.info("%s: pinned revision %s", files.vid, revision_id)
    return True


def unpin(files, revision_id):
    """Make the pinned revision `revision_id` ordinary again (the next
    commit prunes it if it is beyond the count)."""
    with fileops.directory_lock(files.directory):
        listing = files.scan()
        _known(files, listing, revision_id)
        if revision_id not in listing.pins:
            raise LookupError(
                f"revision {revision_id} of {files.vid} is not pinned "
                f"(pinned: {', '.join(sorted(listing.pins)) or 'none'})"
            )
        fileops.remove_files([listing.pins[revision_id]])
    log.info("%s: unpinned revision %s", files.vid, revision_id)


def cancel_revert(files):
    """Drop the volume's pending revert; returns the revision id it
    named, or None if there was none."""
    with fileops.directory_lock(files.directory):
        listing = files.scan()
        if not listing.reverts:
            return None
        wanted = _newest_request(listing)
        fileops.remove_files(listing.reverts.values())
    log.info("%s: cancelled the revert to revision %s", files.vid, wanted)
    return wanted


def _known(files, listing, revision_id):
    if revision_id not in {rev.id for rev in listing.revisions}:
        known = ", ".join(rev.id for rev in listing.revisions) or "none"
        raise LookupError(
            f"volume {files.vid} has no revision {revision_id!r} "
            f"(revisions: {known}); list them with 'qubes-reflink status'"
        )
