"""The pool's end: `ReflinkPool.close` leaves no task on the event loop,
and what a host that just closes its loop leaves behind is made good by
the next start (docs/DESIGN.md, "When qubesd stops").

A spare being cloned is held in its worker thread by an event (the clone
itself is the real FICLONE on a real filesystem); everything asserted is
what is on disk and on the loop.
"""

import asyncio
import gc
import logging
import os
import threading

from helpers import (
    MIB,
    FakeVM,
    committed,
    data,
    new_pool,
    origin,
    read_image,
    volatile,
    write_image,
)
from qubes_reflink import fileops, layout, trash, volume as volume_module


def other_tasks():
    """The tasks on this loop besides the test's own."""
    return asyncio.all_tasks() - {asyncio.current_task()}


def listing(volume):
    return layout.VolumeFiles(volume.pool.root, volume.vid).scan()


class HeldClone:
    """Holds the clones that make spares in their worker thread until
    released (other copies, a start's clone among them, run free)."""

    def __init__(self, monkeypatch):
        self.started = threading.Event()
        self.release = threading.Event()
        real = fileops.publish_copy

        def held(src, dst, *args, **kwargs):
            entry = layout.classify(os.path.basename(dst))
            if entry is not None and entry.kind == layout.SPARE:
                self.started.set()
                self.release.wait(timeout=30)
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(volume_module.fileops, "publish_copy", held)

    async def wait_started(self):
        assert await asyncio.to_thread(self.started.wait, 30)


async def stopped_private(pool, tag=b"committed"):
    """A private volume started, written and stopped: its spare is then
    being made in the background."""
    private = origin(pool, FakeVM("work"), size=MIB)
    await private.create()
    await private.start()
    write_image(private.path, tag)
    await private.stop()
    return private


async def test_close_leaves_no_task(reflink_dir, monkeypatch):
    monkeypatch.setattr(trash, "SWEEP_DELAY", 60.0)
    pool = await new_pool(reflink_dir)
    private = await stopped_private(pool)
    scratch = volatile(pool, FakeVM("work"))
    await scratch.create()
    await scratch.start()
    await scratch.stop()  # its running image waits in the trash
    await pool.close()
    assert not other_tasks()
    assert read_image(committed(private), 9) == b"committed"
    assert listing(private).temps == []
    # the sweep was due in a minute: not made, the file waits for the next
    assert len(layout.trash_entries(pool.root)) == 1


async def test_close_finishes_the_spare_being_cloned(reflink_dir, monkeypatch):
    held = HeldClone(monkeypatch)
    pool = await new_pool(reflink_dir)
    private = await stopped_private(pool)
    await held.wait_started()
    closer = asyncio.create_task(pool.close())
    await asyncio.sleep(0.05)
    assert not closer.done()  # the clone in its thread is waited for
    held.release.set()
    await closer
    assert not other_tasks()
    files = listing(private)
    assert files.temps == []
    (spare,) = files.spares.values()
    assert read_image(spare, 9) == b"committed"
    # and a start takes it: the next start after qubesd's is instant
    inode = os.stat(spare).st_ino
    await private.start()
    assert os.stat(private.path).st_ino == inode


async def test_closed_pool_still_runs_volumes(reflink_dir):
    """Closed before a stop's spare task began: no spare is made; the
    volume still starts (by a clone) and commits."""
    pool = await new_pool(reflink_dir)
    private = await stopped_private(pool)
    await pool.close()  # before the spare's task began: none is made
    assert listing(private).spares == {}
    await private.start()  # the start clones
    assert read_image(private.path, 9) == b"committed"
    write_image(private.path, b"after-close")
    await private.stop()
    assert not other_tasks()  # no spare, no sweep after the close
    assert listing(private).spares == {}
    assert read_image(committed(private), 11) == b"after-close"


async def test_close_stops_the_sweep_between_files(any_dir, monkeypatch):
    pool = await new_pool(any_dir, setup_check="no")
    vms = [volatile(pool, FakeVM(f"vm{i}")) for i in range(3)]
    for scratch in vms:
        await scratch.create()
        await scratch.start()
    taken = threading.Event()
    release = threading.Event()
    real = fileops.remove_files

    def slow_remove(paths, durable=True):
        def one_at_a_time():
            for path in paths:
                yield path
                taken.set()
                release.wait(timeout=30)

        return real(one_at_a_time(), durable=durable)

    monkeypatch.setattr(trash.fileops, "remove_files", slow_remove)
    await asyncio.gather(*(scratch.stop() for scratch in vms))
    assert await asyncio.to_thread(taken.wait, 30)
    closer = asyncio.create_task(pool.close())
    await asyncio.sleep(0)
    release.set()
    await closer
    assert not other_tasks()
    assert len(layout.trash_entries(pool.root)) == 2

    # qubesd's next start: a new pool object, the stop of every volume
    monkeypatch.setattr(trash.fileops, "remove_files", real)
    again = await new_pool(any_dir, setup_check="no")
    for scratch in vms:
        await again.init_volume(
            FakeVM(scratch.vid.split("/")[1]), {"name": "volatile", "rw": True}
        ).stop()
    await again.wait_background()
    assert layout.trash_entries(again.root) == []
    assert not os.path.exists(layout.trash_dir(again.root))


def test_closing_the_loop_leaves_no_pending_task(
    reflink_dir, monkeypatch, caplog
):
    """qubesd never tells its pools it stops: SIGTERM stops the loop,
    which is then closed.  A sweep that was due is a timer, dropped with
    the loop; asyncio reports no task destroyed while pending, and the
    next start of the host sweeps."""
    monkeypatch.setattr(trash, "SWEEP_DELAY", 60.0)
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(new_pool(reflink_dir))
    scratch = volatile(pool, FakeVM("work"))
    for step in (scratch.create, scratch.start, scratch.stop):
        loop.run_until_complete(step())
    loop.run_until_complete(pool.wait_spares())
    assert not asyncio.all_tasks(loop)
    loop.close()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    assert "Task was destroyed" not in caplog.text
    assert len(layout.trash_entries(pool.root)) == 1

    monkeypatch.setattr(trash, "SWEEP_DELAY", 0.0)

    async def next_start():
        await scratch.stop()
        await pool.wait_background()

    asyncio.run(next_start())
    assert layout.trash_entries(pool.root) == []


async def test_a_temp_left_by_a_killed_clone_is_removed(reflink_dir):
    """A qubesd killed mid-clone leaves half a spare as a `~tmp.` file:
    the next locked operation of the volume removes it, and a spare is
    made anew."""
    tag = b"committed"
    pool = await new_pool(reflink_dir)
    private = await stopped_private(pool, tag)
    await pool.wait_background()
    files = layout.VolumeFiles(pool.root, private.vid)
    half = files.temp()
    with open(half, "wb") as half_file:
        half_file.write(data("half", 4096))
    again = await new_pool(reflink_dir)
    private = origin(again, FakeVM("work"), size=MIB)
    await private.stop()  # qubesd's stop of every volume at its start
    await again.wait_background()
    assert not os.path.exists(half)
    assert listing(private).temps == []
    assert read_image(committed(private), len(tag)) == tag
