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
for every volume when it starts, its crash recovery.  The same holds for
what a closed pool left (`close`) and for a sweep whose event loop was
closed before it ran (qubesd stops its loop without telling the pools).
"""

import asyncio
import itertools
import logging
import threading

from . import fileops, layout

log = logging.getLogger("qubes.storage.reflink")

#: Seconds a sweep waits after it is asked for, so that one pass deletes
#: what a burst of stops discards, after those stops have done their work.
SWEEP_DELAY = 1.0


class Trash:
    """The trash of one pool, and the task emptying it.

    The wait before a sweep is a timer of the event loop, not a sleeping
    task: a host that closes its loop (qubesd stops without telling the
    pools) drops a pending timer silently, so a task of the trash exists
    only while it deletes.
    """

    def __init__(self, pool):
        self._pool = pool
        self._filled = False  # set by worker threads, read on the loop
        self._wanted = False
        self._timer = None
        self._sweeper = None
        self._closed = False  # set on the loop, read by the worker thread
        # discards under way in worker threads: the sweep removes the empty
        # trash directory only while there are none
        self._moving = 0
        self._moving_lock = threading.Lock()

    def discard(self, paths):
        """Take `paths` away now; they are deleted by the next sweep.
        Runs in a worker thread."""
        root = self._pool.root
        with self._moving_lock:
            self._moving += 1
        try:
            moves = [(path, layout.trash_path(root)) for path in paths]
            if fileops.discard(moves):
                self._filled = True
        finally:
            with self._moving_lock:
                self._moving -= 1

    def sweep_later(self, always=False):
        """After an operation, on the event loop: empty the trash in the
        background if the operation filled it, or `always`."""
        if self._closed or not (always or self._filled):
            return
        self._filled = False
        self._wanted = True
        self._schedule()

    def _schedule(self):
        """Sweep after SWEEP_DELAY, unless a sweep is due or under way:
        one pass for a burst of stops (qubesd stopping many VMs), after
        their own work."""
        if self._sweeping() is None and self._due() is None:
            loop = asyncio.get_running_loop()
            self._timer = (
                loop,
                loop.call_later(SWEEP_DELAY, self._start_sweep),
            )

    def _due(self):
        """The pending timer of a sweep on this event loop, if any (one of
        a loop that has been closed will never fire)."""
        if self._timer is None:
            return None
        loop, timer = self._timer
        if timer.cancelled() or loop is not asyncio.get_running_loop():
            return None
        return timer

    def _start_sweep(self):
        self._timer = None
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def _sweeping(self):
        """The sweep task still running on this event loop, if any (one of
        a loop that has been closed will never finish)."""
        task = self._sweeper
        if task is None or task.done():
            return None
        return task if task.get_loop() is asyncio.get_running_loop() else None

    async def _sweep(self):
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
        # files discarded during this pass may have come after its listing
        if self._wanted and not self._closed:
            self._sweeper = None
            self._schedule()

    def _empty(self):
        # not durable: a deletion a crash undoes is done by the next sweep;
        # after `close`, the next sweep deletes the rest
        entries = layout.trash_entries(self._pool.root)
        fileops.remove_files(
            itertools.takewhile(lambda _path: not self._closed, entries),
            durable=False,
        )
        # an empty trash leaves the pool as it was
        with self._moving_lock:
            if not self._moving:
                fileops.remove_empty_dirs([layout.trash_dir(self._pool.root)])

    async def wait(self):
        """Wait until the trash has been emptied (a sweep that is due runs
        at once)."""
        while True:
            timer = self._due()
            if timer is not None:
                timer.cancel()
                self._start_sweep()
            task = self._sweeping()
            if task is None:
                return
            await asyncio.wait([task])

    async def close(self):
        """End the sweeping for good: a sweep that is due is not made, one
        deleting stops after the file at hand (a deletion in a thread
        can't be interrupted).  What stays in the trash is deleted by the
        first sweep after the next start of qubesd."""
        self._closed = True
        timer = self._due()
        if timer is not None:
            timer.cancel()
        task = self._sweeping()
        if task is not None:
            await asyncio.wait([task])
