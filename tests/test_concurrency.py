"""Many VMs through one event loop, as qubesd boots them; and logging."""

import asyncio
import logging
import os
import threading

import pytest

from helpers import (
    FakeVM,
    MIB,
    committed,
    data,
    dirty,
    new_pool,
    origin,
    read_image,
    snapshot,
    volatile,
    write_image,
)
from qubes_reflink import fileops

CHUNK = 64 * 1024
VMS = 40


@pytest.fixture
def steps_off_loop():
    """Record the thread of every mutating file step the driver takes."""
    threads = []

    def hook(_step, phase, _paths):
        if phase == "before":
            threads.append(threading.current_thread())

    previous = fileops.set_step_hook(hook)
    try:
        yield threads
    finally:
        fileops.set_step_hook(previous)


async def test_forty_vms_concurrently(reflink_dir, steps_off_loop):
    pool = await new_pool(reflink_dir)
    template = origin(pool, FakeVM("tpl", "vm-templates"), name="root")
    await template.create()
    await template.start()
    write_image(dirty(template), data("template"))
    await template.stop()
    await pool.wait_background()

    vms = {}
    for index in range(VMS):
        vm = FakeVM(f"vm{index}")
        vms[vm.name] = (
            snapshot(pool, vm, template),
            origin(pool, vm),
            volatile(pool, vm),
        )
    volumes = [v for triple in vms.values() for v in triple]
    await asyncio.gather(*(v.create() for v in volumes))
    assert all(await asyncio.gather(*(v.verify() for v in volumes)))

    for round_ in range(2):
        await asyncio.gather(*(v.start() for v in volumes))
        for name, (root, private, vol) in vms.items():
            assert read_image(dirty(root), CHUNK) == data("template")
            expected = data(f"{name}-private-{round_ - 1}")
            if round_ == 0:
                expected = bytes(CHUNK)
            assert read_image(dirty(private), CHUNK) == expected
            assert read_image(dirty(vol), CHUNK) == bytes(CHUNK)
            write_image(dirty(root), data(f"{name}-root"))
            write_image(dirty(private), data(f"{name}-private-{round_}"))
            write_image(dirty(vol), data(f"{name}-volatile"))
        # every running image is a file of its own
        # (in subvolumes of their own on btrfs: one inode number, many st_dev)
        inodes = {
            (os.stat(dirty(v)).st_dev, os.stat(dirty(v)).st_ino)
            for v in volumes
        }
        assert len(inodes) == len(volumes)
        await asyncio.gather(*(v.stop() for v in volumes))
        for name, (root, private, vol) in vms.items():
            assert not os.path.exists(dirty(root))
            assert not os.path.exists(dirty(vol))
            assert read_image(committed(private), CHUNK) == data(
                f"{name}-private-{round_}"
            )
            assert not private.is_dirty()
    assert read_image(committed(template), CHUNK) == data("template")
    await pool.wait_background()

    # no file work ran on the event loop's thread
    assert steps_off_loop
    assert threading.main_thread() not in steps_off_loop

    await asyncio.gather(*(v.remove() for v in volumes))
    assert os.listdir(os.path.join(pool.root, "appvms")) == []
    await pool.wait_background()


async def test_concurrent_calls_on_one_volume(reflink_dir):
    """The per-volume lock serialises overlapping host calls."""
    pool = await new_pool(reflink_dir)
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    exports = await asyncio.gather(*(volume.export() for _ in range(10)))
    assert len(set(exports)) == 10
    await asyncio.gather(*(volume.export_end(p) for p in exports))
    await asyncio.gather(volume.start(), volume.start())
    write_image(dirty(volume), data("x"))
    await asyncio.gather(volume.stop(), volume.stop())
    assert read_image(committed(volume), CHUNK) == data("x")
    assert not os.path.exists(dirty(volume))
    await pool.wait_background()


def _messages(caplog):
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "qubes.storage.reflink"
        and record.levelno == logging.INFO
    ]


async def test_logging_of_file_changes(any_dir, caplog):
    pool = await new_pool(any_dir, setup_check="no")
    caplog.set_level(logging.INFO, logger="qubes.storage.reflink")
    vm = FakeVM("work")
    private = origin(pool, vm, revisions_to_keep=1)
    vol = volatile(pool, vm, size=MIB)
    await private.create()
    await vol.create()
    messages = _messages(caplog)
    assert any(
        m.startswith("created directory ") and m.endswith("/appvms/work")
        for m in messages
    )
    assert any(
        m.startswith("created ") and "private.img~tmp." in m for m in messages
    )
    assert any(
        m.startswith("renamed ") and m.endswith(" to " + committed(private))
        for m in messages
    )

    for cycle in range(2):
        caplog.clear()
        await private.start()
        await vol.start()
        messages = _messages(caplog)
        # the origin's running image: cloned/copied, or a spare renamed
        assert any(
            m.startswith("renamed ") and m.endswith(" to " + dirty(private))
            for m in messages
        ), messages
        if cycle == 0:
            assert any(
                m.startswith(("cloned ", "copied ")) and committed(private) in m
                for m in messages
            ), messages
        assert any(
            m.startswith("created ") and "volatile.img~tmp." in m
            for m in messages
        )
        assert any(m.endswith(" to " + dirty(vol)) for m in messages)

        caplog.clear()
        await private.stop()
        await vol.stop()
        await pool.wait_background()
        messages = _messages(caplog)
        assert f"renamed {dirty(private)} to {committed(private)}" in messages
        assert any(
            m.startswith(
                f"linked {committed(private)} to {committed(private)}."
            )
            for m in messages
        ), messages
        # discarded images go to the trash, which is emptied in the
        # background: both steps are logged
        trashed = [
            m.split(" to ")[1].split(",")[0]
            for m in messages
            if m.startswith("moved ")
        ]
        assert any(m.startswith(f"moved {dirty(vol)} to ") for m in messages)
        if cycle == 1:  # revision 1 pruned
            assert any(
                m.startswith(f"moved {committed(private)}.1@") for m in messages
            ), messages
        assert trashed and all(f"removed {t}" in messages for t in trashed)
        # the spare made in the background is logged too
        assert any("private.img~spare." in m for m in messages), messages
    # every path logged is absolute
    for record in caplog.records:
        for arg in record.args or ():
            if isinstance(arg, str) and "/" in arg:
                assert os.path.isabs(arg)
    await pool.wait_background()
