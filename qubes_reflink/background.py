"""The pool's background work: what the next start of each volume takes.

After an operation returns, the pool prepares what the next start will
rename into place, so that starts stay a rename: an origin volume's spare
(and on btrfs, while snapshot volumes start from it, the snapbase of its
committed version), and on btrfs a snapshot volume's ready snapshot.

Volumes tell the scheduler what happened (`committed`, `started`,
`forget`); it decides what to prepare, and for which volume.  It owns
what only this qubesd process knows about each vid (`LiveState`: the lock,
the exports and the import in use, the task preparing), and an explicit
index of which snapshot volumes start from which source, kept up to date
as volumes are made, loaded (`register`) and removed (`forget`): a new
snapbase of a source makes the ready snapshots of its dependents stale,
and they are made again.
"""

import asyncio
import contextlib
import functools
import logging

from .autodefrag import AutoDefrag

log = logging.getLogger("qubes.storage.reflink")


def locked(method):
    """Run the volume method `method` under the volume's lock, after
    pending background work on it.

    Waiting for the background task first (outside the lock) means an
    operation never races a spare being made and, in the common case, finds
    it ready.
    """

    @functools.wraps(method)
    async def wrapper(volume, *args, **kwargs):
        async with volume.pool.background.exclusive(volume.vid):
            return await method(volume, *args, **kwargs)

    return wrapper


class LiveState:
    """What only this qubesd process knows about a vid, shared by every
    Volume object of that vid."""

    # pylint: disable=too-few-public-methods
    def __init__(self):
        self.lock = asyncio.Lock()
        self.exports = set()
        self.import_path = None
        self.task = None
        self.wanted = False
        #: snapshot volumes start from this one: keep a snapbase of it
        self.snapbase_wanted = False


class Background:
    """The scheduler of one pool's background work."""

    def __init__(self, pool):
        self._pool = pool
        self._live = {}
        #: source vid -> {vid: snapshot volume started from it}
        self._dependents = {}
        #: set by `close`: no background work is started any more
        self.closed = False
        #: committed images defragmented after their stops
        self.defrags = AutoDefrag(pool)

    def live(self, vid):
        """The in-memory state of `vid`."""
        return self._live.setdefault(vid, LiveState())

    def register(self, volume):
        """Index `volume` (made or loaded): a snapshot volume that keeps
        ready snapshots depends on its source in this pool."""
        self._drop_dependent(volume.vid)
        source = volume.start_source()
        if source is not None and volume.keeps_ready_snapshots:
            if source.pool is self._pool:
                deps = self._dependents.setdefault(source.vid, {})
                deps[volume.vid] = volume

    def forget(self, vid):
        """`vid` was removed: nothing depends on it, it on nothing."""
        self._drop_dependent(vid)
        self._dependents.pop(vid, None)

    def _drop_dependent(self, vid):
        for deps in self._dependents.values():
            deps.pop(vid, None)

    def committed(self, volume):
        """`volume` has new committed data (or a snapshot volume started
        from its source): prepare what the next start takes."""
        source = volume.start_source()
        if source is not None:
            source.pool.background.committed(source)
            if not volume.keeps_ready_snapshots:
                return
            if not self._pool.subvolumes.usable:
                return
        self.want(volume)

    def started(self, volume):
        """The snapshot volume `volume` started (or was created): its
        source keeps a snapbase from now on, and a new spare."""
        source = volume.start_source()
        if volume.keeps_ready_snapshots:
            source.pool.background.live(source.vid).snapbase_wanted = True
        self.committed(volume)

    def want(self, volume):
        """Run (or ask once more of) `volume`'s preparation."""
        if self.closed:
            return
        live = self.live(volume.vid)
        live.wanted = True
        if live.task is None or live.task.done():
            loop = asyncio.get_running_loop()
            live.task = loop.create_task(self._prepare(volume, live))

    async def _prepare(self, volume, live):
        # A snapshot's start may take the spare just after this task found
        # it fresh: it asks again, and the task goes round once more.
        while live.wanted:
            live.wanted = False
            source = volume.start_source()
            if source is not None:  # its snapbase first
                await source.pool.background.settle(source.vid)
            async with live.lock:
                if self.closed or self._removed(volume.vid):
                    return  # closed or removed while this task waited
                made = await self._prepare_once(volume, live)
            if made:
                self._renew_dependents(volume.vid)
        self.defrags.consider(volume)

    def _removed(self, vid):
        """Whether the pool no longer has `vid`: a preparation asked for
        before its removal (a source's new snapbase renews its dependents'
        ready snapshots) must make nothing in the directory it left."""
        try:
            self._pool.get_volume(vid)
        except KeyError:
            return True
        return False

    async def _prepare_once(self, volume, live):
        """One preparation in a thread; True if it made a new snapbase."""
        try:
            return await asyncio.to_thread(
                volume.prepare_next_start, live.snapbase_wanted
            )
        except Exception as err:  # pylint: disable=broad-exception-caught
            # A spare only saves time; the next start will clone.
            log.warning("could not prepare a spare of %s: %s", volume.vid, err)
            return False
        finally:
            self._pool.trash.sweep_later()

    def _renew_dependents(self, vid):
        """A new snapbase of `vid`: the ready snapshots of the snapshot
        volumes started from it are of an older version now."""
        for dependent in list(self._dependents.get(vid, {}).values()):
            self.want(dependent)

    @contextlib.asynccontextmanager
    async def exclusive(self, vid):
        """Hold `vid`'s lock, after its background work has finished; then
        empty the trash if the work filled it.  A defragmentation of `vid`
        is told to stop, not waited for."""
        self.defrags.interrupt(vid)
        await self.settle(vid)
        try:
            async with self.live(vid).lock:
                yield
        finally:
            self._pool.trash.sweep_later()

    async def settle(self, vid):
        """Wait until background work on `vid` has finished."""
        task = self.live(vid).task
        if task is not None and not task.done():
            await asyncio.wait([task])

    async def wait(self):
        """Wait until no volume of the pool is being prepared, including
        the work the preparations ask for (a new snapbase renews the ready
        snapshots of its dependents), and the defragmentations they ask
        for."""
        while True:
            tasks = [
                state.task
                for state in self._live.values()
                if state.task is not None and not state.task.done()
            ]
            if not tasks:
                break
            await asyncio.wait(tasks)
        await self.defrags.wait()
