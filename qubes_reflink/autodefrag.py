"""Automatic defragmentation of committed images, in the background.

After a stop (once the next start's spare is made), a volume whose
committed image is fragmented past the pool's ``defrag_threshold`` and
was not defragmented within ``defrag_interval`` is defragmented by
`defrag` (which keeps everything shared), in a thread of its own at idle
I/O and CPU priority, one volume at a time per pool.

It never delays a start or stop: it holds no volume lock, and an
operation on the volume (`interrupt`, from the scheduler's
`Background.exclusive`) makes it stop after the step at hand, without
being waited for; what it did is data-identical and stays.  It also
stops at once when the image is replaced or the volume runs.
"""

import asyncio
import concurrent.futures
import logging
import threading
import time

from . import btrfs, defrag, fileops, layout

log = logging.getLogger("qubes.storage.reflink")


class AutoDefrag:
    """The background defragmentations of one pool."""

    def __init__(self, pool):
        self._pool = pool
        self._executor = None  # its one thread, made when first needed
        self._tasks = {}  # vid -> asyncio task
        self._stops = {}  # vid -> threading.Event
        self.closed = False

    def consider(self, volume):
        """`volume` committed new data: defragment it later if it needs
        it (decided in the thread: reading an extent map takes time)."""
        if self.closed or not volume.save_on_stop:
            return
        if not self._pool.auto_defrag:
            return
        task = self._tasks.get(volume.vid)
        if task is not None and not task.done():
            return
        stop = threading.Event()
        self._stops[volume.vid] = stop
        self._tasks[volume.vid] = asyncio.get_running_loop().create_task(
            self._run(volume.vid, stop)
        )

    def interrupt(self, vid):
        """An operation on `vid` begins: its defragmentation, if one
        runs, stops after the step at hand (not waited for)."""
        stop = self._stops.get(vid)
        if stop is not None:
            stop.set()

    async def _run(self, vid, stop):
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="qubes-reflink-defrag"
            )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._executor, self._defragment, vid, stop
            )
        except Exception as err:  # pylint: disable=broad-exception-caught
            # only speed is at stake: the next stop tries again
            log.warning("could not defragment %s: %s", vid, err)

    def _defragment(self, vid, stop):
        """In the defragmentation thread: check, then defragment."""
        defrag.idle_priority()
        root = self._pool.root

        def should_stop(_vid):
            return stop.is_set() or self.closed

        if should_stop(vid) or defrag.volume_running(root, vid):
            return
        when = defrag.last_done(root, vid)
        if when is not None and time.time() - when < self._pool.defrag_interval:
            return
        try:
            the_plan = defrag.plan(root, vid)
        except layout.VANISHED:
            return
        if the_plan.excess < self._pool.defrag_threshold:
            return
        need = defrag.space_needed([the_plan], btrfs.space(root) is not None)
        if fileops.free_space(root) < need:
            log.warning(
                "not defragmenting %s: it needs %d bytes free, the pool has "
                "less",
                vid,
                need,
            )
            return
        defrag.Defragmenter(root, should_stop=should_stop).run(the_plan)

    async def wait(self):
        """Wait for the defragmentations running or asked for."""
        while True:
            tasks = [task for task in self._tasks.values() if not task.done()]
            if not tasks:
                return
            await asyncio.wait(tasks)

    async def close(self):
        """Stop every defragmentation after its step at hand; no new one
        starts."""
        self.closed = True
        for stop in self._stops.values():
            stop.set()
        await self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
