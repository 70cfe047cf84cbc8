"""The pool's trash: images taken away at once, deleted in the background.

A stop discards files whose deletion can take long: the revision an origin
volume's commit prunes, the running image of a snapshot or volatile volume.
With reflinks, deleting a file costs time in proportion to its extents (a
third of a second at 30,000 on btrfs), which a VM's shutdown need not wait
for.  So the stop moves them into the pool's trash directory (a rename) and
a background task of the pool deletes them.  The end of an export and the
removal of a volume discard their files the same way.

Nothing in the trash is ever read again.  What a crash leaves there is
deleted by the next sweep, which every stop asks for: qubesd calls stop()
for every volume when it starts, its crash recovery.
"""

import asyncio
import logging

from . import fileops, layout

log = logging.getLogger("qubes.storage.reflink")

#: Seconds a sweep waits after it is asked for, so that one pass deletes
#: what a burst of stops discards, after those stops have done their work.
SWEEP_DELAY = 1.0


class Trash:
    """The trash of one pool, and the task emptying it."""

    def __init__(self, pool):
        self._pool = pool
        self._filled = False  # set by worker threads, read on the loop
        self._wanted = False
        self._sweeper = None

    def discard(self, paths):
        """Take `paths` away now; they are deleted by the next sweep.
        Runs in a worker thread."""
        root = self._pool.root
        if fileops.discard((path, layout.trash_path(root)) for path in paths):
            self._filled = True

    def sweep_later(self, always=False):
        """After an operation, on the event loop: empty the trash in the
        background if the operation filled it, or `always`."""
        if not (always or self._filled):
            return
        self._filled = False
        self._wanted = True
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep()
            )

    async def _sweep(self):
        # Files discarded while a sweep runs may come after its listing:
        # go round again until no sweep was asked for meanwhile.
        while self._wanted:
            # one pass for a burst of stops (qubesd stopping many VMs),
            # after their own work
            await asyncio.sleep(SWEEP_DELAY)
            self._wanted = False
            try:
                await asyncio.to_thread(self._empty)
            except OSError as err:
                # the next sweep tries again; only space is lost meanwhile
                log.warning(
                    "could not empty the trash of pool %s: %s",
                    self._pool.name,
                    err,
                )

    def _empty(self):
        # not durable: a deletion a crash undoes is done by the next sweep
        fileops.remove_files(
            layout.trash_entries(self._pool.root), durable=False
        )

    async def wait(self):
        """Wait until the trash has been emptied."""
        if self._sweeper is not None:
            await asyncio.wait([self._sweeper])
