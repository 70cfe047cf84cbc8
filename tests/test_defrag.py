"""Defragmentation that keeps reflinks shared (defrag.py, autodefrag.py).

Images are aged through the driver (a full write, then rounds of random
4 KiB writes, each committed with revisions kept), on real btrfs and XFS.
Afterwards every file holds what it held (compared byte for byte), the
committed image is contiguous again, and the pool's allocated space
(FIEMAP sweep over every file of the pool: a report, not a decision) has
not grown: its revisions, spare, snapbase and ready snapshots share the
new extents.
"""

import asyncio
import hashlib
import os
import random
import threading

import pytest

from helpers import FakeVM, committed, new_pool, origin, run_tool_json
from helpers import snapshot
from qubes_reflink.host import StoragePoolException
from qubes_reflink import cli, defrag, extents, fileops, layout, settings

MIB = 1024**2
BLOCK = 4096
SIZE = 64 * MIB


async def aged(pool, rounds=6, writes=150, name="tpl", seed=7):
    """A template root of SIZE bytes, written whole, then `rounds` times
    started, written at `writes` random blocks and stopped (rtk 2);
    background work done."""
    vol = origin(
        pool,
        FakeVM(name, "vm-templates"),
        "root",
        size=SIZE,
        revisions_to_keep=2,
    )
    await vol.create()
    rng = random.Random(seed)
    await vol.start()
    with open(vol.path, "r+b") as image:
        for offset in range(0, SIZE, MIB):
            image.seek(offset)
            image.write(rng.randbytes(MIB))
    await vol.stop()
    for _ in range(rounds):
        await vol.start()
        fd = os.open(vol.path, os.O_RDWR)
        try:
            for _ in range(writes):
                block = rng.randrange(SIZE // BLOCK)
                os.pwrite(fd, rng.randbytes(BLOCK), block * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        await vol.stop()
        await pool.wait_background()
    return vol


def pool_files(root):
    """Every regular file below the pool directory (subvolumes too)."""
    found = []
    for directory, _dirs, files in os.walk(root):
        found += [os.path.join(directory, name) for name in files]
    return sorted(found)


def contents(root):
    """{path: (inode, sha256)} of every file of the pool."""
    found = {}
    for path in pool_files(root):

        with open(path, "rb") as image:
            digest = hashlib.file_digest(image, "sha256").hexdigest()
        found[path] = (os.stat(path).st_ino, digest)
    return found


def allocated(root):
    """Bytes the pool's files take on disk, each shared byte once."""
    return extents.total_usage(pool_files(root)).allocated


@pytest.fixture
async def pool(reflink_dir):
    the_pool = await new_pool(reflink_dir, auto_defrag="False")
    yield the_pool
    await the_pool.wait_background()
    await the_pool.close()


# -- the tool --------------------------------------------------------------


async def test_defrag_rewrites_and_keeps_everything_shared(pool, capsys):
    tpl = await aged(pool)
    # snapshot volumes of the template: a ready snapshot and snapbase on
    # btrfs, the template's spare everywhere
    app = snapshot(pool, FakeVM("app"), tpl)
    await app.create()
    await app.start()
    await app.stop()
    await pool.wait_background()
    before = contents(pool.root)
    space = allocated(pool.root)
    fragmented = len(extents.file_extents(committed(tpl)))
    assert fragmented > 500

    code, report = run_tool_json(capsys, "defrag", pool.root)

    assert code == 0 and not report["refused"]
    [result] = report["results"]
    assert result["vid"] == tpl.vid and result["abandoned"] == ""
    assert contents(pool.root) == before  # every byte, every inode
    assert len(extents.file_extents(committed(tpl))) <= 8
    # revisions, spare (and snapbase, ready snapshot) share the new extents
    assert result["sharers"] >= 3
    assert allocated(pool.root) <= space * 1.05
    assert result["extents_after"] <= 8


async def test_dry_run_says_what_it_would_do_and_changes_nothing(pool, capsys):
    tpl = await aged(pool, rounds=3)
    before = contents(pool.root)
    code, report = run_tool_json(capsys, "defrag", "--dry-run", pool.root)
    assert code == 0 and report["results"] == []
    [facts] = report["volumes"]
    assert facts["vid"] == tpl.vid
    assert facts["extents"] > facts["extents_after"]
    assert facts["rewrite"] == SIZE
    assert 0 < report["space_needed"] <= report["space_free"]
    assert contents(pool.root) == before
    assert defrag.last_done(pool.root, tpl.vid) is None


async def test_refused_when_the_free_space_is_not_there(pool, capsys):
    await aged(pool, rounds=3)
    before = contents(pool.root)
    code, report = run_tool_json(capsys, "defrag", "--dry-run", pool.root)
    filler = os.path.join(os.path.dirname(pool.root), "filler")
    room = report["space_free"] - report["space_needed"] // 2
    with open(filler, "wb") as fill:
        os.posix_fallocate(fill.fileno(), 0, room)
    try:
        code, report = run_tool_json(capsys, "defrag", pool.root)
    finally:
        os.unlink(filler)
    assert code == cli.EXIT_NO and report["refused"]
    assert report["space_needed"] > report["space_free"]
    assert contents(pool.root) == before


async def test_running_volume_and_unknown_volume(pool, capsys):
    tpl = await aged(pool, rounds=2)
    await tpl.start()
    before = contents(pool.root)
    code, report = run_tool_json(capsys, "defrag", pool.root)
    assert code == 0 and report["volumes"] == []
    assert "running" in report["skipped"][tpl.vid]
    assert contents(pool.root) == before
    await tpl.stop()
    code = cli.main(["defrag", pool.root, "appvms/none/private"])
    assert code == cli.EXIT_ERROR
    assert "has no committed image" in capsys.readouterr().err
    code = cli.main(["defrag", pool.root, "../etc"])
    assert code == cli.EXIT_ERROR


async def test_a_start_during_the_tool_is_served_and_ends_the_work(pool):
    """The tool holds no lock: a start that arrives while it is at work
    completes while the tool is stopped inside a step (so it did not wait
    for the tool), and the tool then leaves the volume, data intact."""
    tpl = await aged(pool, rounds=3)
    before = {
        path: digest
        for path, (_ino, digest) in contents(pool.root).items()
        if not path.endswith("~spare") and "~spare." not in path
    }
    the_plan = defrag.plan(pool.root, tpl.vid)
    loop = asyncio.get_running_loop()
    started = threading.Event()

    def hook(step, phase, _paths):
        if step == "dedupe" and phase == "before" and not started.is_set():
            asyncio.run_coroutine_threadsafe(tpl.start(), loop).result(30)
            started.set()

    previous = fileops.set_step_hook(hook)
    try:
        runner = defrag.Defragmenter(pool.root, cli.defrag_stop(pool.root))
        result = await asyncio.to_thread(runner.run, the_plan)
    finally:
        fileops.set_step_hook(previous)
    assert started.is_set()
    assert result.abandoned == "the volume started"
    after = contents(pool.root)
    for path, digest in before.items():
        assert after[path][1] == digest, path
    with open(committed(tpl), "rb") as one, open(tpl.path, "rb") as two:
        assert one.read() == two.read()  # the start got the committed data
    await tpl.stop()


async def test_a_sharer_written_meanwhile_keeps_what_was_written(pool):
    """The extent maps only suggest where to share: a sharer written after
    they were read (a spare a start took, its VM writing) differs there,
    and the kernel's comparison leaves it as written."""
    tpl = await aged(pool, rounds=2)
    the_plan = defrag.plan(pool.root, tpl.vid)
    [spare] = layout.VolumeFiles(pool.root, tpl.vid).scan().spares.values()
    written = b"written meanwhile" * 240
    offsets = [0, 5 * MIB, SIZE - 2 * BLOCK]

    def hook(step, phase, _paths):
        if step == "dedupe" and phase == "before" and offsets:
            fd = os.open(spare, os.O_WRONLY)
            for offset in offsets:
                os.pwrite(fd, written, offset)
            os.close(fd)
            offsets.clear()

    previous = fileops.set_step_hook(hook)
    try:
        runner = defrag.Defragmenter(pool.root)
        result = await asyncio.to_thread(runner.run, the_plan)
    finally:
        fileops.set_step_hook(previous)
    assert result.abandoned == "" and result.differed > 0
    with open(spare, "rb") as image:
        for offset in (0, 5 * MIB, SIZE - 2 * BLOCK):
            image.seek(offset)
            assert image.read(len(written)) == written


async def test_files_gone_meanwhile_are_left_out(pool, monkeypatch):
    """qubesd takes spares and discards revisions while the tool works: a
    sharer gone after it was found is skipped, and an image replaced
    before the work began ends it with what it was."""
    tpl = await aged(pool, rounds=2)
    the_plan = defrag.plan(pool.root, tpl.vid)
    [spare] = layout.VolumeFiles(pool.root, tpl.vid).scan().spares.values()
    found = defrag.find_sharers

    def then_the_spare_goes(*args):
        sharers = found(*args)
        os.unlink(spare)
        return sharers

    monkeypatch.setattr(defrag, "find_sharers", then_the_spare_goes)
    before = contents(pool.root)
    del before[spare]
    result = defrag.Defragmenter(pool.root).run(the_plan)
    assert result.abandoned == "" and result.sharers == 2  # the revisions
    assert contents(pool.root) == before
    monkeypatch.setattr(defrag, "find_sharers", found)
    os.unlink(committed(tpl))  # as if renamed away by a commit
    result = defrag.Defragmenter(pool.root).run(the_plan)
    assert result.abandoned == "a new image was committed"


# -- in the background, after a stop ---------------------------------------


async def test_a_stop_defragments_a_fragmented_image(reflink_dir):
    pool = await new_pool(reflink_dir, defrag_threshold="64")
    try:
        tpl = await aged(pool, rounds=1)
        assert len(extents.file_extents(committed(tpl))) <= 8
        assert defrag.last_done(pool.root, tpl.vid) is not None
        # within the interval: the next fragmenting stop is left alone
        await _fragment(tpl)
        assert len(extents.file_extents(committed(tpl))) > 64
        # the interval passed (or is set to 0): defragmented again
        settings.store(pool.root, settings.DEFRAG_INTERVAL, "0")
        await _fragment(tpl)
        assert len(extents.file_extents(committed(tpl))) <= 8
    finally:
        await pool.close()


async def _fragment(volume, writes=200):
    """One more round of random writes, stopped and settled."""
    rng = random.Random(writes)
    await volume.start()
    fd = os.open(volume.path, os.O_RDWR)
    for _ in range(writes):
        block = rng.randrange(SIZE // BLOCK)
        os.pwrite(fd, rng.randbytes(BLOCK), block * BLOCK)
    os.close(fd)
    await volume.stop()
    await volume.pool.wait_background()


@pytest.mark.parametrize(
    "options", [{"auto_defrag": "False"}, {"defrag_threshold": "100000"}]
)
async def test_off_or_below_the_threshold_nothing_is_rewritten(
    reflink_dir, options
):
    pool = await new_pool(reflink_dir, **options)
    try:
        tpl = await aged(pool, rounds=3)
        assert len(extents.file_extents(committed(tpl))) > 300
        assert defrag.last_done(pool.root, tpl.vid) is None
    finally:
        await pool.close()


async def test_a_start_is_not_kept_waiting_by_a_background_defrag(
    reflink_dir,
):
    pool = await new_pool(reflink_dir, defrag_threshold="64")
    pool.background.defrags.closed = True  # not yet: aged() stops often
    tpl = await aged(pool, rounds=3)
    pool.background.defrags.closed = False
    inside, release = threading.Event(), threading.Event()

    def hook(step, phase, _paths):
        if step == "dedupe" and phase == "before" and not inside.is_set():
            inside.set()
            release.wait(60)

    previous = fileops.set_step_hook(hook)
    try:
        pool.background.defrags.consider(tpl)
        assert await asyncio.to_thread(inside.wait, 60)
        # the defragmentation is held inside a step: the start goes on
        await asyncio.wait_for(tpl.start(), 30)
        release.set()
        await pool.wait_background()
    finally:
        release.set()
        fileops.set_step_hook(previous)
    assert defrag.last_done(pool.root, tpl.vid) is None  # abandoned
    with open(committed(tpl), "rb") as one, open(tpl.path, "rb") as two:
        assert one.read() == two.read()
    await tpl.stop()
    await pool.close()


async def test_options_are_checked_and_shown(reflink_dir):
    pool = await new_pool(reflink_dir, auto_defrag="no", defrag_interval="60")
    assert pool.config["auto_defrag"] == "False"
    assert pool.config["defrag_interval"] == 60
    assert pool.config["defrag_threshold"] == 2048
    settings.store(pool.root, settings.DEFRAG_THRESHOLD, "10")
    assert pool.config["defrag_threshold"] == 10
    for option, value in (
        ("defrag_threshold", "-1"),
        ("defrag_interval", "soon"),
        ("auto_defrag", "maybe"),
    ):
        with pytest.raises(StoragePoolException, match=option):
            await new_pool(reflink_dir, name="other", **{option: value})
    await pool.close()
