"""Crash harness: kill an operation at every mutating step, then recover.

Run as ``python3 tests/crashharness.py CONFIG.json``; CONFIG names the
scenario (``op``), the directories to build the pools in (``dirs``: pool key
-> directory on a real filesystem), which pools are set up with
``setup_check`` (``checks``) and where the JSON result goes (``out``).

For one scenario the driver process:

1. forks a child that builds the scenario's world (pools, VMs, volumes and
   their data, through the driver's own API) and stops: the *before* state;
2. forks a child that builds the world, installs a step hook
   (`qubes_reflink.fileops.set_step_hook`) that records every call, and runs
   the operation to its end: the *after* state and the number of crash
   points (every mutating step, before and after it);
3. for every crash point N: forks a child that builds the world and runs the
   operation with a hook that does ``os.kill(os.getpid(), SIGKILL)`` at the
   N-th call.

After each child, the driver simulates a qubesd restart the way the host
does it: fresh pool and volume objects; ``stop()`` on every volume of every
VM (none runs any more); then it observes the state, checks it, runs a
start/stop cycle (or the retry the scenario calls for) and checks again.

The driver itself never runs the driver code outside ``asyncio.run`` (whose
end joins its worker threads), so forking it is safe.
"""

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from typing import NamedTuple

from qubes_reflink import ReflinkPool, btrfs, defrag, fileops, layout
from qubes_reflink import revisions
from qubes_reflink import settings
from qubes_reflink import trash
from qubes_reflink.host import StoragePoolException

# The trash is swept right after a stop here, as in the other tests
# (conftest.no_sweep_delay): waiting out the delay at every one of hundreds
# of crash points would only cost time.
trash.SWEEP_DELAY = 0.0

MIB = 1024**2
SIZE = MIB
BIG = 2 * MIB
BLOCK = 4096
LEFTOVER_MARKS = (
    "~revert.",
    "~tmp.",
    "~import.",
    "~export.",
    "~snaptmp.",
    ".qubes-reflink-probe",
)


class FakeVM:
    """What init_volume reads of a VM."""

    def __init__(self, name, dir_path_prefix):
        self.name = name
        self.dir_path_prefix = dir_path_prefix


class Vol(NamedTuple):
    """One volume of a scenario's world."""

    key: str  # "<vm>/<volume>"
    kind: str  # origin, snapshot, origin_snapshot, volatile
    prefix: str = "appvms"
    pool: str = "main"
    rtk: object = None  # revisions_to_keep; None: the pool's
    source: str = None  # key of the source volume (snapshots)

    @property
    def vm(self):
        """The VM name."""
        return self.key.split("/")[0]

    @property
    def name(self):
        """The volume name."""
        return self.key.split("/")[1]

    @property
    def save_on_stop(self):
        """Whether the volume keeps data of its own."""
        return self.kind in ("origin", "origin_snapshot")


TPL_ROOT = Vol("tpl/root", "origin", prefix="vm-templates", rtk=2)
APP_PRIVATE = Vol("app/private", "origin", rtk=1)
APP_ROOT = Vol("app/root", "snapshot", source="tpl/root")
APP_VOLATILE = Vol("app/volatile", "volatile")
SOLO_ROOT = Vol("solo/root", "origin_snapshot", source="tpl/root", rtk=1)
NOREV = Vol("norev/private", "origin", rtk=0)
DISABLED = Vol("nosnap/private", "origin", rtk=-1)
CLONE = Vol("clone/private", "origin", rtk=1)
SRC_FOREIGN = Vol("srcvm/private", "origin", pool="src", rtk=1)
# a DispVM of the AppVM "app": its root and private are snapshots
DISP_ROOT = Vol("disp1/root", "snapshot", source="tpl/root")
DISP_PRIVATE = Vol("disp1/private", "snapshot", source="app/private")
DISP_VOLATILE = Vol("disp1/volatile", "volatile")
DISP = [DISP_ROOT, DISP_PRIVATE, DISP_VOLATILE]


# -- contents ----------------------------------------------------------------


def _block(label):
    return (label.encode() * BLOCK)[:BLOCK]


def _offsets(size):
    return (0, size // 2, size - BLOCK)


def write_label(path, label, size=SIZE):
    """Write the blocks that make an image of `size` hold version `label`."""
    with open(path, "r+b") as image:
        for offset in _offsets(size):
            image.seek(offset)
            image.write(_block(label))


def expected_digest(label, size=SIZE, file_size=None):
    """Digest of an image holding `label` written at `size`, grown to
    `file_size` (zeros after the old end)."""
    data = bytearray(file_size or size)
    if label != "zero":
        for offset in _offsets(size):
            data[offset : offset + BLOCK] = _block(label)
    return hashlib.sha256(bytes(data)).hexdigest()[:16]


def digest(path):
    """Digest of a file's whole content, None if it is missing."""
    try:
        with open(path, "rb") as image:
            return hashlib.sha256(image.read()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def _known_digests():
    known = {}
    for label in ("zero", "A", "B", "C", "P1", "P2", "S", "I"):
        for size in (SIZE, BIG):
            known[expected_digest(label, size)] = f"{label}/{size // MIB}M"
        known[expected_digest(label, SIZE, BIG)] = f"{label}/1M>2M"
    return known


KNOWN = _known_digests()


def show(value):
    """A digest as a readable label where it is a known version."""
    return KNOWN.get(value, value)


# -- the world -------------------------------------------------------------


class World:
    """Pools and volumes of one scenario, built on fresh directories."""

    def __init__(self, dirs, checks, vols):
        self.dirs = dirs
        self.checks = checks
        self.specs = vols
        self.pools = {}
        self.vols = {}

    def make_pools(self):
        """Fresh pool objects (touch nothing on disk)."""
        for key, directory in self.dirs.items():
            self.pools[key] = ReflinkPool(
                name=key,
                dir_path=os.path.join(directory, "pool"),
                revisions_to_keep="1",
                setup_check="yes" if self.checks[key] else "no",
            )

    def make_volumes(self):
        """Fresh volume objects, as qubesd's init_volume at its start."""
        for spec in self.specs:
            config = {
                "name": spec.name,
                "size": str(SIZE),
                "rw": "True",
                "save_on_stop": str(spec.save_on_stop),
                "snap_on_start": str(spec.source is not None),
            }
            if spec.rtk is not None:
                config["revisions_to_keep"] = str(spec.rtk)
            if spec.source is not None:
                config["source"] = self.vols[spec.source]
            self.vols[spec.key] = self.pools[spec.pool].init_volume(
                FakeVM(spec.vm, spec.prefix), config
            )

    def spec(self, key):
        """The Vol of `key`."""
        return next(spec for spec in self.specs if spec.key == key)

    def files(self, key):
        """The VolumeFiles of volume `key`."""
        return layout.VolumeFiles(self.vols[key].pool.root, self.vols[key].vid)

    def vms(self):
        """VM name -> list of its volume keys, in spec order."""
        found = {}
        for spec in self.specs:
            found.setdefault(spec.vm, []).append(spec.key)
        return found

    async def wait_background(self):
        """Let every pool finish its background spare preparation."""
        for pool in self.pools.values():
            await pool.wait_background()

    async def run(self, key, label):
        """Start volume `key`, write version `label`, stop it."""
        await self.wait_background()
        vol = self.vols[key]
        await vol.start()
        write_label(vol.path, label)
        await vol.stop()
        await self.wait_background()

    async def start_write(self, key, label):
        """Start volume `key` and write version `label` into it (after the
        background work: whether a spare or snapbase is ready must not
        depend on timing, or the crash points would differ between runs)."""
        await self.wait_background()
        vol = self.vols[key]
        await vol.start()
        write_label(vol.path, label)


# -- scenarios -------------------------------------------------------------


class Scenario(NamedTuple):
    """An operation and the world it runs in."""

    vols: tuple
    build: object  # async (world, state) -> None
    op: object  # async (world, state) -> None
    target: str = None  # the volume the operation is about
    after: dict = {}  # key -> expected committed digest after the op
    before: dict = {}  # key -> expected committed digest before the op
    cycle: str = "start_stop"  # or "recreate", "remove", "setup"
    setup_pools: bool = True
    pools: tuple = ("main",)
    #: key -> data every crash state must still hold, committed or as a
    #: revision; None: what `must_survive` derives
    keeps: dict = None


SCENARIOS = {}


def scenario(name, vols, **kwargs):
    """Register the scenario `name` whose build and op follow as methods."""

    def register(cls):
        SCENARIOS[name] = Scenario(
            vols=tuple(vols), build=cls.build, op=cls.op, **kwargs
        )
        return cls

    return register


async def nothing(_world, _state):
    """A build step that builds nothing more."""


async def build_template(world, _state):
    """tpl/root: committed A, revision 1 (zero)."""
    await world.vols["tpl/root"].create()
    await world.run("tpl/root", "A")


async def build_app(world, state):
    """Template plus app/private with committed P2 and revision 2 (P1)."""
    if "tpl/root" in world.vols:
        await build_template(world, state)
    for key in ("app/private", "app/root", "app/volatile"):
        if key in world.vols:
            await world.vols[key].create()
    if "app/private" in world.vols:
        await world.run("app/private", "P1")
        await world.run("app/private", "P2")


def D(label, size=SIZE, file_size=None):  # pylint: disable=invalid-name
    """Short for expected_digest."""
    return expected_digest(label, size, file_size)


NONE = None


@scenario("setup", [], cycle="setup", setup_pools=False, target=None)
class _Setup:
    build = nothing

    @staticmethod
    async def op(world, _state):
        """qvm-pool add."""
        await world.pools["main"].setup()


def _create_scenario(name, vol, extra, build):
    class _Create:
        @staticmethod
        async def op(world, _state):
            """VM creation."""
            await world.vols[vol.key].create()

    _Create.build = build
    after = {vol.key: D("zero")} if vol.kind == "origin" else {}
    scenario(
        name,
        list(extra) + [vol],
        target=vol.key,
        cycle="recreate",
        before={vol.key: NONE},
        after=after,
    )(_Create)


_create_scenario("create_origin", CLONE, [], nothing)
_create_scenario("create_snapshot", APP_ROOT, [TPL_ROOT], build_template)
_create_scenario("create_volatile", APP_VOLATILE, [], nothing)
_create_scenario(
    "create_origin_snapshot", SOLO_ROOT, [TPL_ROOT], build_template
)


def _simple(name, vols, build, op, **kwargs):
    scenario(name, vols, **kwargs)(type(name, (), {"build": build, "op": op}))


def _start(key):
    async def op(world, _state):
        await world.vols[key].start()

    return op


def _stop(key):
    async def op(world, _state):
        await world.vols[key].stop()

    return op


def _drop_spares(*keys):
    """Remove every spare of the volumes `keys` (files only the test
    knows are disposable)."""

    def drop(world):
        for key in keys:
            for path in world.files(key).scan().spares.values():
                os.unlink(path)

    return drop


def _then(*steps):
    async def build(world, state):
        for step in steps:
            result = step(world, state) if callable(step) else None
            if asyncio.iscoroutine(result):
                await result

    return build


def _sync(func):
    def step(world, _state):
        func(world)

    return step


APP = [TPL_ROOT, APP_PRIVATE, APP_ROOT, APP_VOLATILE]

# start, each kind
_simple(
    "start_origin",
    [APP_PRIVATE],
    build_app,
    _start("app/private"),
    target="app/private",
    before={"app/private": D("P2")},
    after={"app/private": D("P2")},
)
_simple(
    "start_origin_nospare",
    [APP_PRIVATE],
    _then(build_app, _sync(_drop_spares("app/private"))),
    _start("app/private"),
    target="app/private",
    after={"app/private": D("P2")},
)
_simple(
    "start_snapshot_takes_source_spare",
    [TPL_ROOT, APP_ROOT],
    build_app,
    _start("app/root"),
    target="app/root",
    after={"tpl/root": D("A")},
)
_simple(
    "start_snapshot_again",
    [TPL_ROOT, APP_ROOT],
    _then(build_app, lambda w, s: w.run("app/root", "S")),
    _start("app/root"),
    target="app/root",
    after={"tpl/root": D("A")},
)
_simple(
    "start_snapshot_nospare",
    [TPL_ROOT, APP_ROOT],
    _then(
        build_app,
        lambda w, s: w.run("app/root", "S"),
        _sync(_drop_spares("app/root", "tpl/root")),
    ),
    _start("app/root"),
    target="app/root",
    after={"tpl/root": D("A")},
)
_simple(
    "start_origin_snapshot",
    [TPL_ROOT, SOLO_ROOT],
    _then(build_template, lambda w, s: w.vols["solo/root"].create()),
    _start("solo/root"),
    target="solo/root",
    after={"solo/root": D("A")},
)
_simple(
    "start_volatile",
    [APP_VOLATILE],
    lambda w, s: w.vols["app/volatile"].create(),
    _start("app/volatile"),
    target="app/volatile",
)
_simple(
    "start_snapshots_disabled",
    [DISABLED],
    _then(
        lambda w, s: w.vols["nosnap/private"].create(),
        lambda w, s: w.run("nosnap/private", "P1"),
    ),
    _start("nosnap/private"),
    target="nosnap/private",
    before={"nosnap/private": D("P1")},
    after={"nosnap/private": D("P1")},
)

# stop, each kind
_simple(
    "stop_origin",
    [APP_PRIVATE],
    _then(build_app, lambda w, s: w.start_write("app/private", "B")),
    _stop("app/private"),
    target="app/private",
    before={"app/private": D("B")},
    after={"app/private": D("B")},
)
_simple(
    "stop_prune",
    [TPL_ROOT],
    _then(
        build_template,
        lambda w, s: w.run("tpl/root", "B"),
        lambda w, s: w.start_write("tpl/root", "C"),
    ),
    _stop("tpl/root"),
    target="tpl/root",
    after={"tpl/root": D("C")},
)
_simple(
    "stop_no_revisions",
    [NOREV],
    _then(
        lambda w, s: w.vols["norev/private"].create(),
        lambda w, s: w.run("norev/private", "P1"),
        lambda w, s: w.start_write("norev/private", "B"),
    ),
    _stop("norev/private"),
    target="norev/private",
    after={"norev/private": D("B")},
)
_simple(
    "stop_snapshots_disabled",
    [DISABLED],
    _then(
        lambda w, s: w.vols["nosnap/private"].create(),
        lambda w, s: w.start_write("nosnap/private", "B"),
    ),
    _stop("nosnap/private"),
    target="nosnap/private",
    after={"nosnap/private": D("B")},
)
_simple(
    "stop_snapshot",
    [TPL_ROOT, APP_ROOT],
    _then(build_app, lambda w, s: w.start_write("app/root", "S")),
    _stop("app/root"),
    target="app/root",
    after={"tpl/root": D("A")},
)
# a template update while its AppVM holds a ready snapshot (btrfs): the
# commit, then in the background a new snapbase, a spare, and the AppVM's
# ready snapshot made again
_simple(
    "stop_template_with_ready_snapshots",
    [TPL_ROOT, APP_ROOT],
    _then(
        build_app,
        lambda w, s: w.run("app/root", "S"),
        lambda w, s: w.start_write("tpl/root", "C"),
    ),
    _stop("tpl/root"),
    target="tpl/root",
    before={"tpl/root": D("C")},
    after={"tpl/root": D("C")},
)


def _drop_readies(key):
    """Destroy the ready snapshots of `key` (btrfs): its start then
    snapshots its source's snapbase."""

    def drop(world):
        for path in world.files(key).scan().readies.values():
            btrfs.destroy(path)

    return drop


def _start_as_the_snapbase_goes(key, source):
    """Start `key` while its source's snapbase is destroyed (as a newer
    version's background work does) just before the start snapshots it:
    chained after the harness's own step hook, so crash points stay the
    same from run to run."""

    async def op(world, _state):
        snapbases = set(world.files(source).scan().snapbases.values())
        previous = fileops.set_step_hook(None)

        def hook(step, phase, paths):
            if previous is not None:
                previous(step, phase, paths)
            if step == "subvolume-snapshot" and phase == "before":
                if paths[0] in snapbases:
                    snapbases.clear()
                    btrfs.destroy(paths[0])

        fileops.set_step_hook(hook)
        try:
            await world.vols[key].start()
        finally:
            fileops.set_step_hook(previous)

    return op


_simple(
    "start_snapshot_as_the_snapbase_goes",
    [TPL_ROOT, APP_ROOT],
    _then(
        build_app,
        lambda w, s: w.run("app/root", "S"),
        _sync(_drop_readies("app/root")),
    ),
    _start_as_the_snapbase_goes("app/root", "tpl/root"),
    target="app/root",
    after={"tpl/root": D("A")},
)
_simple(
    "stop_origin_snapshot",
    [TPL_ROOT, SOLO_ROOT],
    _then(
        build_template,
        lambda w, s: w.vols["solo/root"].create(),
        lambda w, s: w.start_write("solo/root", "B"),
    ),
    _stop("solo/root"),
    target="solo/root",
    after={"solo/root": D("B")},
)
_simple(
    "stop_volatile",
    [APP_VOLATILE],
    _then(
        lambda w, s: w.vols["app/volatile"].create(),
        lambda w, s: w.start_write("app/volatile", "S"),
    ),
    _stop("app/volatile"),
    target="app/volatile",
)


# a DispVM: its root and volatile as an AppVM's; its private a snapshot of
# its AppVM's private, whose start and stop are the operations (all three
# together would make the crash points differ from run to run)
async def _build_dispvm(world, state):
    await build_app(world, state)
    for vol in DISP:
        await world.vols[vol.key].create()


async def _build_running_dispvm(world, state):
    await _build_dispvm(world, state)
    for vol in DISP:
        await world.start_write(vol.key, "S")
    await world.wait_background()


_simple(
    "start_dispvm",
    [TPL_ROOT, APP_PRIVATE] + DISP,
    _build_dispvm,
    _start("disp1/private"),
    target="disp1/private",
    after={"tpl/root": D("A"), "app/private": D("P2")},
)
_simple(
    "stop_dispvm",
    [TPL_ROOT, APP_PRIVATE] + DISP,
    _build_running_dispvm,
    _stop("disp1/private"),
    target="disp1/private",
    after={"tpl/root": D("A"), "app/private": D("P2")},
)


# revert
def _revert(key, revision=None):
    async def op(world, _state):
        await world.vols[key].revert(revision)

    return op


_REVERT_BUILD = _then(build_template, lambda w, s: w.run("tpl/root", "B"))
# tpl/root: committed B, revisions 1 (zero), 2 (A)
_simple(
    "revert_newest",
    [TPL_ROOT],
    _REVERT_BUILD,
    _revert("tpl/root"),
    target="tpl/root",
    before={"tpl/root": D("B")},
    after={"tpl/root": D("A")},
)
_simple(
    "revert_older",
    [TPL_ROOT],
    _REVERT_BUILD,
    _revert("tpl/root", "1"),
    target="tpl/root",
    before={"tpl/root": D("B")},
    after={"tpl/root": D("zero")},
)


# revisions users can trust: pins, the restore point, revert while running
def _pin(key, revision, pin=True):
    """A build step or an operation: pin (or unpin) a revision as
    qubes-reflink does."""

    async def step(world, _state):
        change = revisions.pin if pin else revisions.unpin
        change(world.files(key), revision)

    return step


_simple(
    "pin",
    [TPL_ROOT],
    _REVERT_BUILD,
    _pin("tpl/root", "1"),
    target="tpl/root",
    before={"tpl/root": D("B")},
    after={"tpl/root": D("B")},
)
_simple(
    "unpin",
    [TPL_ROOT],
    _then(_REVERT_BUILD, _pin("tpl/root", "1")),
    _pin("tpl/root", "1", pin=False),
    target="tpl/root",
    before={"tpl/root": D("B")},
    after={"tpl/root": D("B")},
)
# app/private (rtk 1): committed P2, revision 2 (P1), pinned: the stop
# keeps it beyond the count
_simple(
    "stop_prune_pinned",
    [APP_PRIVATE],
    _then(
        build_app,
        _pin("app/private", "2"),
        lambda w, s: w.start_write("app/private", "B"),
    ),
    _stop("app/private"),
    target="app/private",
    before={"app/private": D("B")},
    after={"app/private": D("B")},
)


async def _build_restore_point(world, _state):
    """app/private (rtk 1): revision 2 holds P1 from two days ago,
    committed P2, running B; the pool keeps revisions a day old."""
    settings.store(
        world.pools["main"].root, settings.KEEP_REVISION_OLDER_THAN, "86400"
    )
    await world.vols["app/private"].create()
    await world.run("app/private", "P1")
    then = time.time() - 2 * 86400
    os.utime(world.files("app/private").committed, (then, then))
    await world.run("app/private", "P2")
    await world.start_write("app/private", "B")


_simple(
    "stop_restore_point",
    [APP_PRIVATE],
    _build_restore_point,
    _stop("app/private"),
    target="app/private",
    before={"app/private": D("B")},
    after={"app/private": D("B")},
)
_simple(
    "revert_running",
    [APP_PRIVATE],
    _then(build_app, lambda w, s: w.start_write("app/private", "B")),
    _revert("app/private", "2"),
    target="app/private",
    # recovered without the request, the run is committed; with it, the
    # stop reverts
    before={"app/private": D("B")},
    after={"app/private": D("P1")},
    # the run's data, committed or the one revision kept (not P2)
    keeps={"app/private": D("B")},
)
for _name, _pinned in (
    ("stop_pending_revert", ()),
    ("stop_pending_revert_pinned", (_pin("app/private", "2"),)),
):
    _simple(
        _name,
        [APP_PRIVATE],
        _then(
            build_app,
            *_pinned,
            lambda w, s: w.start_write("app/private", "B"),
            _revert("app/private", "2"),
        ),
        _stop("app/private"),
        target="app/private",
        # qubesd's recovery stop carries the request out too
        before={"app/private": D("P1")},
        after={"app/private": D("P1")},
        # with revisions_to_keep 1 the run's data (B) is the revision
        # kept, not the committed P2 the run started from
        keeps={"app/private": D("B")},
    )


# defragmentation: tpl/root written whole, then twice started, written at
# every 8th block and stopped (rtk 2): committed C, revisions B and A-full
def _scatter(path, label, step_blocks=8):
    with open(path, "r+b") as image:
        for offset in range(0, SIZE, step_blocks * BLOCK):
            image.seek(offset)
            image.write(_block(label))


async def _build_fragmented(world, _state):
    vol = world.vols["tpl/root"]
    await vol.create()
    await world.wait_background()
    await vol.start()
    with open(vol.path, "r+b") as image:
        image.write(_block("F") * (SIZE // BLOCK))
    await vol.stop()
    for label in ("B", "C"):
        await world.wait_background()
        await vol.start()
        _scatter(vol.path, label)
        await vol.stop()
    await world.wait_background()


async def _defrag(world, _state):
    """qubes-reflink defrag of tpl/root, as the tool runs it."""
    root = world.pools["main"].root
    vid = world.vols["tpl/root"].vid
    the_plan = defrag.plan(root, vid)
    # ext4 writes in place: nothing fragmented, nothing to do
    assert the_plan.windows or the_plan.excess == 0, "nothing to defragment"
    defrag.Defragmenter(root, lambda v: defrag.volume_running(root, v)).run(
        the_plan
    )


async def _app_ready(world, _state):
    """An AppVM of the template, started and stopped: on btrfs a snapbase
    of the template and a ready snapshot share its image."""
    await world.vols["app/root"].create()
    await world.run("app/root", "S")


async def _auto_defrag_next(world, _state):
    """The next stop of tpl/root defragments it (threshold 8, no
    interval); the template runs, its scattered writes done."""
    root = world.pools["main"].root
    settings.store(root, settings.DEFRAG_THRESHOLD, "8")
    settings.store(root, settings.DEFRAG_INTERVAL, "0")
    await world.start_write("tpl/root", "A")


async def _stop_and_settle(world, _state):
    """A stop and the background work it asks for (the defragmentation)."""
    await world.vols["tpl/root"].stop()
    await world.wait_background()


_simple(
    "defrag",
    [TPL_ROOT],
    _build_fragmented,
    _defrag,
    target="tpl/root",
)
_simple(
    "defrag_with_snapshots",
    [TPL_ROOT, APP_ROOT],
    _then(_build_fragmented, _app_ready),
    _defrag,
    target="tpl/root",
)
_simple(
    "stop_auto_defrag",
    [TPL_ROOT],
    _then(_build_fragmented, _auto_defrag_next),
    _stop_and_settle,
    target="tpl/root",
)


# resize
def _resize(key, size):
    async def op(world, _state):
        await world.vols[key].resize(size)

    return op


_simple(
    "resize_running",
    [APP_PRIVATE],
    _then(build_app, lambda w, s: w.start_write("app/private", "B")),
    _resize("app/private", BIG),
    target="app/private",
    before={"app/private": D("B")},
    after={"app/private": D("B", SIZE, BIG)},
)
_simple(
    "resize_stopped",
    [APP_PRIVATE],
    build_app,
    _resize("app/private", BIG),
    target="app/private",
    before={"app/private": D("P2")},
    after={"app/private": D("P2", SIZE, BIG)},
    # growing keeps the old data in the grown image, not as a revision
    keeps={},
)


# import_data
async def _import_begin(world, state):
    await build_app(world, state)
    vol = world.vols["app/private"]
    state["import"] = await vol.import_data(SIZE)
    write_label(state["import"], "I")


def _import_end(success):
    async def op(world, _state):
        await world.vols["app/private"].import_data_end(success)

    return op


async def _import_data(world, _state):
    await world.vols["app/private"].import_data(SIZE)


_simple(
    "import_data",
    [APP_PRIVATE],
    build_app,
    _import_data,
    target="app/private",
    after={"app/private": D("P2")},
)
_simple(
    "import_data_end_true",
    [APP_PRIVATE],
    _import_begin,
    _import_end(True),
    target="app/private",
    before={"app/private": D("P2")},
    after={"app/private": D("I")},
)
_simple(
    "import_data_end_false",
    [APP_PRIVATE],
    _import_begin,
    _import_end(False),
    target="app/private",
    before={"app/private": D("P2")},
    after={"app/private": D("P2")},
)


# import_volume
async def _build_clone(world, state):
    await build_app(world, state)
    await world.vols["clone/private"].create()
    await world.run("clone/private", "C")


async def _build_foreign(world, _state):
    await world.vols["srcvm/private"].create()
    await world.run("srcvm/private", "S")
    await world.vols["clone/private"].create()
    await world.run("clone/private", "C")


def _import_volume(src):
    async def op(world, _state):
        await world.vols["clone/private"].import_volume(world.vols[src])

    return op


_simple(
    "import_volume_reflink",
    [APP_PRIVATE, CLONE],
    _build_clone,
    _import_volume("app/private"),
    target="clone/private",
    before={"clone/private": D("C"), "app/private": D("P2")},
    after={"clone/private": D("P2"), "app/private": D("P2")},
)
_simple(
    "import_volume_fallback",
    [SRC_FOREIGN, CLONE],
    _build_foreign,
    _import_volume("srcvm/private"),
    target="clone/private",
    before={"clone/private": D("C"), "srcvm/private": D("S")},
    after={"clone/private": D("S"), "srcvm/private": D("S")},
    pools=("main", "src"),
)


# export
async def _export(world, _state):
    await world.vols["app/private"].export()


async def _export_begin(world, state):
    await build_app(world, state)
    state["export"] = await world.vols["app/private"].export()


async def _export_end(world, state):
    await world.vols["app/private"].export_end(state["export"])


_simple(
    "export",
    [APP_PRIVATE],
    build_app,
    _export,
    target="app/private",
    after={"app/private": D("P2")},
)
_simple(
    "export_end",
    [APP_PRIVATE],
    _export_begin,
    _export_end,
    target="app/private",
    after={"app/private": D("P2")},
)


# remove
def _remove(key):
    async def op(world, _state):
        await world.vols[key].remove()

    return op


_simple(
    "remove_origin",
    [APP_PRIVATE],
    build_app,
    _remove("app/private"),
    target="app/private",
    before={"app/private": D("P2")},
    after={"app/private": NONE},
    cycle="remove",
)
_simple(
    "remove_snapshot",
    [TPL_ROOT, APP_ROOT],
    _then(build_app, lambda w, s: w.run("app/root", "S")),
    _remove("app/root"),
    target="app/root",
    after={"tpl/root": D("A")},
    cycle="remove",
)


# -- the child: build, then the operation ------------------------------------


class StepHook:
    """Counts the steps; kills the process at step `kill_at`."""

    def __init__(self, kill_at=None):
        self.kill_at = kill_at
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, step, phase, paths):
        with self.lock:
            self.calls.append(
                [step, phase, [os.path.basename(p) for p in paths]]
            )
            if len(self.calls) == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def sabotage(kind):
    """Break the driver on purpose, to show that the harness notices.

    "unlink_before_rename": replace files the non-atomic way (remove the
    target, then rename), leaving a moment with no committed image.
    """
    if kind == "unlink_before_rename":
        real_rename = fileops.rename

        def rename(src, dst):
            fileops.remove_files([dst])
            real_rename(src, dst)

        fileops.rename = rename
    elif kind:
        raise ValueError(kind)


async def child_main(sc, dirs, checks, mode, kill_at, record):
    """Build the world; unless `mode` is "before", run the operation."""
    world = World(dirs, checks, sc.vols)
    world.make_pools()
    if sc.setup_pools:
        for pool in world.pools.values():
            await pool.setup()
    world.make_volumes()
    state = {}
    await sc.build(world, state)
    await world.wait_background()
    with open(record + ".built", "w", encoding="utf-8") as out:
        json.dump(observe(world), out)
    if mode == "before":
        return
    sabotage(os.environ.get("CRASH_SABOTAGE"))
    hook = StepHook(kill_at)
    fileops.set_step_hook(hook)
    await sc.op(world, state)
    await world.wait_background()
    fileops.set_step_hook(None)
    with open(record, "w", encoding="utf-8") as out:
        json.dump(hook.calls, out)


def run_child(sc, dirs, checks, mode, kill_at=None, record=None):
    """Fork a child that runs `child_main`; return its wait status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            asyncio.run(child_main(sc, dirs, checks, mode, kill_at, record))
        except BaseException:  # pylint: disable=broad-exception-caught
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)  # pylint: disable=protected-access
    return os.waitpid(pid, 0)[1]


# -- recovery and checks -----------------------------------------------------


def observe(world):
    """The state of every volume, as the files and the objects tell it."""
    seen = {}
    for spec in world.specs:
        vol, files = world.vols[spec.key], world.files(spec.key)
        listing = files.scan()
        seen[spec.key] = {
            "committed": digest(files.committed),
            "size": vol.size,
            "revisions": {
                rev.id: digest(rev.path) for rev in listing.revisions
            },
            "pins": sorted(listing.pins),
        }
    return seen


def check_files(world, errors, where, extra_revisions=1):
    """Leftovers and disagreements between objects and files."""
    for pool in world.pools.values():
        for path in layout.trash_entries(pool.root):
            errors.append(f"{where}: trash not emptied: {path}")
        for root, dirs, names in os.walk(pool.root):
            for name in names + dirs:  # a subvolume left is a directory
                path = os.path.join(root, name)
                if any(mark in name for mark in LEFTOVER_MARKS):
                    errors.append(f"{where}: leftover {path}")
    for spec in world.specs:
        vol, files = world.vols[spec.key], world.files(spec.key)
        listing = files.scan()
        if listing.dirty or listing.running or vol.is_dirty():
            errors.append(f"{where}: {spec.key} still dirty")
        if listing.base:
            errors.append(f"{where}: {spec.key} has a stale ~base")
        source = fileops.stat_or_none(
            world.files(spec.source or spec.key).committed
        )
        fresh = layout.spare_key(source) if source else None
        for key, path in listing.spares.items():
            if key != fresh:
                errors.append(f"{where}: stale spare {path}")
        own = fileops.stat_or_none(files.committed)
        for key, path in listing.snapbases.items():
            if own is None or key != layout.spare_key(own):
                errors.append(f"{where}: stale snapbase {path}")
        for key, path in listing.readies.items():
            if key != fresh:
                errors.append(f"{where}: stale ready snapshot {path}")
        ids = [rev.id for rev in listing.revisions]
        if list(vol.revisions) != ids:
            errors.append(
                f"{where}: {spec.key} revisions {list(vol.revisions)} "
                f"but files {ids}"
            )
        if spec.save_on_stop:
            committed = fileops.stat_or_none(files.committed)
            if committed is not None and vol.size != committed.st_size:
                errors.append(
                    f"{where}: {spec.key} size {vol.size} but file "
                    f"{committed.st_size}"
                )
            rtk = vol.revisions_to_keep
            # pinned revisions do not count; a restore point is one more
            ordinary = [i for i in ids if i not in listing.pins]
            allowed = max(rtk, 0) + extra_revisions
            allowed += 1 if vol.pool.keep_revision_older_than else 0
            if len(ordinary) > allowed:
                errors.append(f"{where}: {spec.key} {ids} beyond {rtk}")
        elif listing.committed or listing.revisions:
            errors.append(f"{where}: {spec.key} has committed files")


async def restart(dirs, checks, sc):
    """qubesd restarts: fresh objects, stop() on every volume of every VM."""
    world = World(dirs, checks, sc.vols)
    world.make_pools()
    world.make_volumes()
    errors = []
    for keys in world.vms().values():
        results = await asyncio.gather(
            *(world.vols[key].stop() for key in keys), return_exceptions=True
        )
        for key, result in zip(keys, results):
            if isinstance(result, BaseException):
                errors.append(f"recovery stop of {key}: {result!r}")
    await world.wait_background()
    return world, errors


def _start_data(world, key):
    """Digest of the data volume `key` must start with."""
    vol, spec = world.vols[key], world.spec(key)
    if spec.kind == "volatile":
        return expected_digest("zero", vol.size)
    return digest(world.files(spec.source or key).committed)


async def start_stop_cycle(world, seen, sc, errors):
    """Start and stop every VM; check what the VM saw and what stays."""
    for keys in world.vms().values():
        wanted = {}
        for key in keys:
            vol, spec = world.vols[key], world.spec(key)
            if sc.cycle == "remove" and key == sc.target:
                continue
            try:
                await vol.verify()
            except StoragePoolException as err:
                if seen[key]["committed"] is None and key == sc.target:
                    continue
                errors.append(f"cycle: verify of {key}: {err}")
                continue
            if spec.source and not os.path.isdir(world.files(key).directory):
                errors.append(f"cycle: {key} has no directory")
                continue
            wanted[key] = _start_data(world, key)
        started = list(wanted)
        results = await asyncio.gather(
            *(world.vols[key].start() for key in started),
            return_exceptions=True,
        )
        for key, result in zip(started, results):
            if isinstance(result, BaseException):
                errors.append(f"cycle: start of {key}: {result!r}")
            running = digest(world.vols[key].path)
            if running != wanted[key]:
                errors.append(
                    f"cycle: {key} started with {show(running)}, not "
                    f"{show(wanted[key])}"
                )
        results = await asyncio.gather(
            *(world.vols[key].stop() for key in started),
            return_exceptions=True,
        )
        for key, result in zip(started, results):
            if isinstance(result, BaseException):
                errors.append(f"cycle: stop of {key}: {result!r}")
    await world.wait_background()


async def recover(dirs, checks, sc):
    """Restart, observe and check; then the cycle; return (seen, errors)."""
    if sc.cycle == "setup":
        return await _recover_setup(dirs, checks)
    world, errors = await restart(dirs, checks, sc)
    check_files(world, errors, "after restart")
    seen = observe(world)
    if sc.cycle == "recreate":
        try:
            await world.vols[sc.target].create()
        except StoragePoolException as err:
            errors.append(f"re-create of {sc.target}: {err}")
    if sc.cycle == "remove":
        await world.vols[sc.target].remove()
        files = world.files(sc.target)
        if os.path.isdir(files.directory):
            left = [
                n
                for n in os.listdir(files.directory)
                if layout.classify(n)
                and layout.classify(n).volume == files.volume
            ]
            if left:
                errors.append(f"remove again left {left}")
    await start_stop_cycle(world, seen, sc, errors)
    check_files(world, errors, "after start/stop cycle", extra_revisions=0)
    if sc.cycle == "start_stop":
        again = observe(world)
        for key, state in seen.items():
            spec = world.spec(key)
            if spec.kind == "origin_snapshot":  # committed what it started
                continue
            if again[key]["committed"] != state["committed"]:
                errors.append(
                    f"cycle changed {key}: {show(state['committed'])} -> "
                    f"{show(again[key]['committed'])}"
                )
    return seen, errors


async def _recover_setup(dirs, checks):
    world = World(dirs, checks, [])
    world.make_pools()
    errors = []
    pool = world.pools["main"]
    await pool.setup()
    check_files(world, errors, "after setup again")
    for prefix in layout.DIR_PREFIXES:
        if not os.path.isdir(os.path.join(pool.root, prefix)):
            errors.append(f"{prefix} missing")
    vol = pool.init_volume(
        FakeVM("new", "appvms"),
        {"name": "private", "size": SIZE, "save_on_stop": True, "rw": True},
    )
    await vol.create()
    await vol.start()
    write_label(vol.path, "B")
    await vol.stop()
    await pool.wait_background()
    if digest(os.path.join(pool.root, "appvms/new/private.img")) != D("B"):
        errors.append("a volume in the set-up pool does not work")
    return {"pool": os.path.isdir(pool.root)}, errors


# -- comparing states --------------------------------------------------------


def shared_images(world):
    """Errors for each image file that two volumes share (one inode under
    names of both): a VM would write into the other's data.  Reflink
    copies are inodes of their own; only a hard link can do this."""
    owners = {}
    for spec in world.specs:
        files = world.files(spec.key)
        listing = files.scan()
        paths = [files.committed, files.dirty]
        paths += [rev.path for rev in listing.revisions]
        paths += list(listing.spares.values())
        for path in paths:
            found = fileops.stat_or_none(path)
            if found is not None and stat.S_ISREG(found.st_mode):
                key = (found.st_dev, found.st_ino)
                owners.setdefault(key, set()).add(spec.key)
    return [
        f"volumes {sorted(keys)} share one image file (inode {inode})"
        for (_dev, inode), keys in owners.items()
        if len(keys) > 1
    ]


def must_survive(sc, built):
    """key -> the data committed before the operation that every crash
    state must still hold, as the committed image or a listed revision:
    the committed image an operation replaces (the scenario declares other
    data after it), on a volume whose revisions_to_keep keeps one.

    Derived from the scenario's declarations and the files as the child
    built them, never from what the driver did: a driver that drops the
    old image at a commit can't make the rule vacuous.
    """
    if sc.keeps is not None:
        return dict(sc.keeps)
    found = {}
    for spec in sc.vols:
        state = (built or {}).get(spec.key)
        old = state.get("committed") if isinstance(state, dict) else None
        new = sc.after.get(spec.key)
        rtk = 1 if spec.rtk is None else spec.rtk  # the pool's is 1
        if spec.save_on_stop and rtk >= 1 and None not in (old, new):
            if old != new:
                found[spec.key] = old
    return found


def survival_errors(seen, survive):
    """Errors for each volume of `seen` that lost data of `survive`."""
    errors = []
    for key, data in survive.items():
        state = seen.get(key)
        if not isinstance(state, dict):
            continue
        if data not in {state["committed"], *state["revisions"].values()}:
            errors.append(
                f"{key}: the data committed before the operation "
                f"({show(data)}) is gone: neither committed nor a revision"
            )
    return errors


def compare(seen, before, after, built=None):
    """Errors of a state after a crash that is neither before nor after.

    Revisions that existed before the operation (`built`: the state the
    child built, before any recovery) may remain beyond revisions_to_keep
    after a crash: nothing is lost, and the next commit prunes them.
    """
    errors = []
    if set(seen) != set(before):
        return [f"volumes {sorted(seen)} vs {sorted(before)}"]
    for key, state in seen.items():
        if not isinstance(state, dict):
            if state not in (before[key], after[key]):
                errors.append(f"{key}: {state}")
            continue
        old, new = before[key], after[key]
        if state["committed"] not in (old["committed"], new["committed"]):
            errors.append(
                f"{key}: committed {show(state['committed'])}, neither "
                f"{show(old['committed'])} nor {show(new['committed'])}"
            )
        if state["size"] not in (old["size"], new["size"]):
            errors.append(f"{key}: size {state['size']}")
        if state["pins"] not in (old["pins"], new["pins"]):
            errors.append(f"{key}: pins {state['pins']}")
        revs = set(state["revisions"].items())
        old_revs = set(old["revisions"].items())
        new_revs = set(new["revisions"].items())
        if not old_revs & new_revs <= revs:
            lost = sorted(old_revs & new_revs - revs)
            errors.append(f"{key}: revisions lost {lost}")
        had = set((built or {}).get(key, {}).get("revisions", {}).items())
        if not revs <= old_revs | new_revs | had:
            errors.append(
                f"{key}: unexpected revisions "
                f"{sorted(revs - old_revs - new_revs - had)}"
            )
    return errors


def check_expectations(sc, before, after):
    """The no-crash outcome is what the operation is meant to produce."""
    errors = []
    for name, states, wanted in (
        ("before", before, sc.before),
        ("after", after, sc.after),
    ):
        for key, value in wanted.items():
            if states[key]["committed"] != value:
                errors.append(
                    f"{name}: {key} holds {show(states[key]['committed'])}, "
                    f"expected {show(value)}"
                )
    return errors


# -- the driver process --------------------------------------------------------


def _load(path, default):
    try:
        with open(path, encoding="utf-8") as recorded:
            return json.load(recorded)
    except FileNotFoundError:
        return default


class Driver:
    """Runs one scenario at every crash point."""

    def __init__(self, config):
        self.op = config["op"]
        self.sc = SCENARIOS[self.op]
        self.bases = config["dirs"]
        self.checks = config["checks"]
        self.failures = []
        self.crashed = 0
        self.built = None

    def point(self, mode, kill_at=None):
        """Run a child in fresh directories, then recover; (seen, errors,
        steps recorded)."""
        dirs = {
            key: tempfile.mkdtemp(prefix=f"{self.op}-", dir=self.bases[key])
            for key in self.sc.pools
        }
        record = os.path.join(dirs["main"], "steps.json")
        try:
            status = run_child(
                self.sc, dirs, self.checks, mode, kill_at, record
            )
            errors = []
            if mode == "kill":
                if not (
                    os.WIFSIGNALED(status)
                    and os.WTERMSIG(status) == signal.SIGKILL
                ):
                    errors.append(f"not killed (status {status})")
            elif status != 0:
                errors.append(f"child failed (status {status})")
            self.built = _load(record + ".built", self.built)
            steps = None
            if mode == "count" and os.path.exists(record):
                with open(record, encoding="utf-8") as recorded:
                    steps = json.load(recorded)
            seen, more = asyncio.run(recover(dirs, self.checks, self.sc))
            return seen, errors + more, steps
        finally:
            for directory in dirs.values():
                shutil.rmtree(directory, ignore_errors=True)

    def run(self):
        """Every crash point; returns the result dict."""
        before, errors, _ = self.point("before")
        self.failures += [f"before: {e}" for e in errors]
        after, errors, steps = self.point("count")
        self.failures += [f"after: {e}" for e in errors]
        self.failures += check_expectations(self.sc, before, after)
        steps = steps or []
        for number, step in enumerate(steps, start=1):
            seen, errors = self.point("kill", number)[:2]
            errors += compare(seen, before, after, self.built)
            errors += survival_errors(seen, must_survive(self.sc, self.built))
            self.crashed += 1
            where = f"{step[1]} {step[0]} {' '.join(step[2])}"
            self.failures += [f"#{number} ({where}): {e}" for e in errors]
        return {
            "op": self.op,
            "points": self.crashed,
            "steps": sum(1 for step in steps if step[1] == "before"),
            "step_names": sorted({s[0] for s in steps}),
            "failures": self.failures,
        }


def main(argv):
    """Entry point: run the scenario of the config file argv[1]."""
    logging.getLogger("qubes.storage.reflink").setLevel(logging.ERROR)
    with open(argv[1], encoding="utf-8") as config_file:
        config = json.load(config_file)
    result = Driver(config).run()
    with open(config["out"], "w", encoding="utf-8") as out:
        json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
