"""Model-based test: random lifecycles of a template, two AppVMs based on
it and a standalone VM on a real btrfs, checked step by step against a
small in-memory model of what each volume must hold.

The state machine drives the driver the way qubesd does (all volumes of a
VM started, stopped, created and removed concurrently in one event loop)
and also runs operations of *different* VMs at once in one gather.  After
every step it compares committed images, revisions (ids, timestamps,
contents, pruning), running images, sizes, is_dirty and is_outdated with
the model.  Some steps wait for the background spare preparation before
the checks; others don't, so the next operation races it.

Run the long variant with ``make stress`` (marker ``slow``).
"""

import asyncio
import itertools
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from helpers import FakeVM, new_pool, origin, read_image, snapshot, volatile
from qubes_reflink import layout
from qubes_reflink.host import StoragePoolException, isodate

UNIT = 16 * 1024  # sizes are multiples of this; images stay small
MAX_UNITS = 32  # 512 KiB at most

#: The VMs: name -> (dir_path_prefix, [(volume, kind, size in units)])
VMS = {
    "tpl": ("vm-templates", [("root", "origin", 8)]),
    "app1": (
        "appvms",
        [
            ("root", "snapshot", 0),
            ("private", "origin", 4),
            ("volatile", "volatile", 4),
        ],
    ),
    "app2": (
        "appvms",
        [
            ("root", "snapshot", 0),
            ("private", "origin", 4),
            ("volatile", "volatile", 4),
        ],
    ),
    "sa": ("appvms", [("root", "origin", 8), ("private", "origin", 4)]),
}
OTHER_VMS = ("app1", "app2", "sa")
#: Operations of the template that change its committed data
CHANGES_TEMPLATE = {"stop", "revert", "import", "resize"}
#: Operations of an AppVM that read the template's committed data
READS_TEMPLATE = {"start", "export", "export_open", "clone"}
VM_OPS = (
    "create",
    "remove",
    "start",
    "stop",
    "write",
    "revert",
    "resize",
    "export",
    "export_open",
    "import",
    "clone",
)

#: Figures for the report, summed over every test of this module.
STATS = {"examples": 0, "steps": 0, "operations": 0, "concurrent_gathers": 0}


def _bytes(seed, length):
    return random.Random(seed).randbytes(length)


def _mtime(path):
    return int(os.stat(path).st_mtime)


_VERSIONS = itertools.count(1)


class Rev:
    """A revision as the model knows it."""

    def __init__(self, number, ts, data, version):
        self.number, self.ts, self.data = number, ts, data
        self.version = version

    def key(self):
        """The driver lists revisions in the order of their retirement:
        by number (names without a number, older, first)."""
        return (self.number > 0, self.number, self.ts)


class OriginModel:
    """What an origin volume (save_on_stop) must hold."""

    kind = "origin"

    def __init__(self, volume, committed_path, rtk):
        self.volume = volume
        self.path = committed_path
        self.rtk = rtk
        self.committed = b""
        self.ts = 0
        self.revisions = []  # of Rev, sorted by key()
        self.running = None
        self.gen = 0  # the committed version: new data, new number
        self.initial = 0  # size at create()
        self.pending = None  # the revision a revert while running asked for
        self.run_ts = 0  # the running image's mtime when the stop began

    def created(self, size):
        """After create(): an empty image, no revisions."""
        self.committed = bytes(size)
        self.ts = _mtime(self.path)
        self.revisions = []
        self.running = None
        self.gen = next(_VERSIONS)

    def _prune(self):
        self.revisions.sort(key=Rev.key)
        keep = max(self.rtk, 0)
        self.revisions = self.revisions[-keep:] if keep else []

    def commit(self, data, ts, numbering=None, version=None):
        """The driver's _commit: old committed data -> newest revision."""
        numbering = self.revisions if numbering is None else numbering
        if self.rtk > 0:
            number = max((r.number for r in numbering), default=0) + 1
            self.revisions.append(
                Rev(number, self.ts, self.committed, self.gen)
            )
        self.committed, self.ts = data, ts
        self.gen = next(_VERSIONS) if version is None else version
        self._prune()

    def shrink(self, size, ts):
        """A stopped origin's shrink: a commit of the data cut to `size`
        that keeps the old data as a revision even where none are kept."""
        rtk, self.rtk = self.rtk, max(self.rtk, 1)
        try:
            self.commit(self.committed[:size], ts)
        finally:
            self.rtk = rtk

    def revert(self, rev):
        """Make revision `rev` the committed data (that very version: a
        snapshot started from it is up to date again)."""
        numbering = list(self.revisions)
        self.revisions.remove(rev)
        self.commit(rev.data, rev.ts, numbering, rev.version)

    def start(self, _machine):
        """start(): the running image begins as the committed data."""
        self.running = self.committed

    def stop(self):
        """stop(): the running image becomes committed, or, with a revert
        asked for while it ran, the newest revision (after the committed
        data it started from), and the chosen revision the committed."""
        if self.pending is None:
            self.commit(self.running, _mtime(self.path))
        else:
            self._apply_revert()
        self.running = None

    def _apply_revert(self):
        rev, self.pending = self.pending, None
        number = max((r.number for r in self.revisions), default=0)
        if self.rtk > 0:
            self.revisions.append(
                Rev(number + 1, self.ts, self.committed, self.gen)
            )
            self.revisions.append(
                Rev(number + 2, self.run_ts, self.running, next(_VERSIONS))
            )
        self.revisions.remove(rev)
        self.committed, self.ts, self.gen = rev.data, rev.ts, rev.version
        self._prune()

    def size(self, _machine):
        """What volume.size must say."""
        return len(self.running if self.running is not None else self.committed)

    def exported(self, _machine):
        """What export() must show."""
        return self.committed

    def revision_path(self, rev):
        """Where the model expects revision `rev`'s file."""
        return f"{self.path}.{rev.number}@{isodate(rev.ts)}Z"


class SnapshotModel:
    """An AppVM root: the template's committed data at each start."""

    kind = "snapshot"

    def __init__(self, volume, source):
        self.volume = volume
        self.source = source
        self.running = None
        self.start_gen = None

    def start(self, _machine):
        """start(): copy of the source's committed (never running) data."""
        self.running = self.source.committed
        self.start_gen = self.source.gen

    def stop(self):
        """stop(): the running image is thrown away."""
        self.running = None

    def size(self, _machine):
        """What volume.size must say."""
        if self.running is not None:
            return len(self.running)
        return len(self.source.committed)

    def exported(self, _machine):
        """What export() must show: the source's committed data."""
        return self.source.committed


class VolatileModel:
    """A volatile volume: zeros at each start."""

    kind = "volatile"

    def __init__(self, volume, size):
        self.volume = volume
        self.running = None
        self.length = size

    def start(self, _machine):
        """start(): an empty image."""
        self.running = bytes(self.length)

    def stop(self):
        """stop(): thrown away (a resize is kept for the next start)."""
        self.running = None

    def size(self, _machine):
        """What volume.size must say."""
        return self.length


class Plan:
    """One operation: a coroutine function for the gather (called only
    when the gather runs) and a model update."""

    def __init__(self, coro, apply, expect_error=False):
        self.coro = coro
        self.apply = apply
        self.expect_error = expect_error


class ReflinkMachine(RuleBasedStateMachine):
    """The state machine; `btrfs_root` and `other_root` are set by the test
    (a directory on btrfs, one on ext4 or XFS)."""

    btrfs_root = None
    other_root = None

    def __init__(self):
        super().__init__()
        STATS["examples"] += 1
        self.loop = asyncio.new_event_loop()
        self.dirs = [
            tempfile.mkdtemp(prefix="m-", dir=self.btrfs_root),
            tempfile.mkdtemp(prefix="m2-", dir=self.btrfs_root),
            tempfile.mkdtemp(prefix="m3-", dir=self.other_root),
        ]
        self.pools = []
        self.ready = False
        self.settled = True
        self.rtk = 1
        self.vms = {}  # name -> {volume name: model} or None (absent)
        self.running = {}
        self.clones = {}  # (pool index, vid) -> OriginModel
        self.exports = []  # (volume, path, expected bytes)

    # -- plumbing ------------------------------------------------------------

    def run(self, coro):
        """Run `coro` to completion on this machine's event loop."""
        return self.loop.run_until_complete(coro)

    def execute(self, plans, wait):
        """Run the plans' coroutines in one gather, then update the model."""

        async def gather():
            return await asyncio.gather(
                *(p.coro() for p in plans), return_exceptions=True
            )

        results = self.run(gather())
        STATS["operations"] += len(plans)
        if len(plans) > 1:
            STATS["concurrent_gathers"] += 1
        for plan, result in zip(plans, results):
            if plan.expect_error:
                assert isinstance(result, StoragePoolException), result
                continue
            if isinstance(result, BaseException):
                raise result
            plan.apply(result)
        if wait:
            self.run(self.wait_background())
        self.settled = wait

    async def wait_background(self):
        """Wait for every pool's background spare work."""
        for pool in self.pools:
            await pool.wait_background()

    def vm_object(self, name):
        """The FakeVM of `name`."""
        return FakeVM(name, VMS[name][0])

    def make_models(self, name):
        """Volume objects and fresh models of VM `name` (init_volume)."""
        vm = self.vm_object(name)
        models = {}
        pool = self.pools[0]
        for vol_name, kind, units in VMS[name][1]:
            if kind == "origin":
                vol = origin(pool, vm, name=vol_name, size=units * UNIT)
                path = os.path.join(pool.root, vol.vid + ".img")
                models[vol_name] = OriginModel(vol, path, self.rtk)
                models[vol_name].initial = units * UNIT
            elif kind == "snapshot":
                source = self.vms["tpl"]["root"]
                vol = snapshot(pool, vm, source.volume, name=vol_name)
                models[vol_name] = SnapshotModel(vol, source)
            else:
                vol = volatile(pool, vm, name=vol_name, size=units * UNIT)
                models[vol_name] = VolatileModel(vol, units * UNIT)
        return models

    # -- set-up and teardown ---------------------------------------------

    @initialize(rtk=st.sampled_from([0, 1, 2, 3]))
    def setup_pools(self, rtk):
        """Three pools (two on btrfs, one elsewhere) and all four VMs."""
        self.rtk = rtk

        async def make():
            return [
                (
                    await new_pool(
                        directory, name=f"p{i}", revisions_to_keep=str(rtk)
                    )
                    if i < 2
                    else await new_pool(
                        directory,
                        name=f"p{i}",
                        revisions_to_keep=str(rtk),
                        setup_check="False",
                    )
                )
                for i, directory in enumerate(self.dirs)
            ]

        self.pools = self.run(make())
        for name in VMS:
            self.vms[name] = None
            self.running[name] = False
        for name in VMS:
            self.execute([self.plan_create(name, None)], wait=True)
        self.ready = True

    def teardown(self):
        try:
            for volume, path, _expected in self.exports:
                self.run(volume.export_end(path))
            self.exports = []
            if self.pools:
                self.run(self.wait_background())
        finally:
            self.loop.close()
            for directory in self.dirs:
                shutil.rmtree(directory, ignore_errors=True)

    # -- eligibility ---------------------------------------------------------

    def exists(self, name):
        """VM `name` has been created and not removed."""
        return self.vms.get(name) is not None

    def eligible(self, name, op):
        """Whether `op` makes sense on VM `name` now."""
        # pylint: disable=too-many-return-statements
        if op == "create":
            return name != "tpl" and not self.exists(name)
        if not self.exists(name):
            return False
        if op == "remove":
            return name != "tpl" and not self.running[name]
        if op == "start":
            return not self.running[name]
        if op in ("stop", "write"):
            return self.running[name]
        if op == "export_open":
            return len(self.exports) < 4
        return True

    def vms_for(self, op):
        """VMs on which `op` is eligible."""
        return [name for name in VMS if self.eligible(name, op)]

    # -- plans -----------------------------------------------------------

    def plan(self, name, op, data):
        """The Plan of `op` on VM `name`, parameters drawn from `data`."""
        return getattr(self, "plan_" + op)(name, data)

    def plan_create(self, name, _data):
        """Create every volume of the VM at once."""
        models = self.make_models(name)

        async def coro():
            await asyncio.gather(*(m.volume.create() for m in models.values()))

        def apply(_result):
            for model in models.values():
                if model.kind == "origin":
                    model.created(model.initial)
            self.vms[name] = models
            self.running[name] = False

        return Plan(coro, apply)

    def plan_remove(self, name, _data):
        """Remove every volume of the VM at once."""
        models = self.vms[name]

        async def coro():
            await asyncio.gather(*(m.volume.remove() for m in models.values()))

        def apply(_result):
            self.vms[name] = None
            prefix = VMS[name][0]
            directory = os.path.join(self.pools[0].root, prefix, name)
            open_here = [e for e in self.exports if e[1].startswith(directory)]
            assert open_here or not os.path.lexists(directory)

        return Plan(coro, apply)

    def plan_start(self, name, _data):
        """verify() and start() every volume, as the host starts a VM."""
        models = self.vms[name]

        async def coro():
            for model in models.values():
                assert await model.volume.verify()
            await asyncio.gather(*(m.volume.start() for m in models.values()))

        def apply(_result):
            for model in models.values():
                model.start(self)
                device = model.volume.block_device()
                assert device.path == model.volume.path
                assert os.path.isfile(device.path)
            self.running[name] = True

        return Plan(coro, apply)

    def plan_stop(self, name, _data):
        """stop() every volume of the VM at once."""
        models = self.vms[name]

        async def coro():
            for model in models.values():
                if getattr(model, "pending", None) is not None:
                    model.run_ts = _mtime(model.volume.path)
            await asyncio.gather(*(m.volume.stop() for m in models.values()))

        def apply(_result):
            for model in models.values():
                model.stop()
            self.running[name] = False

        return Plan(coro, apply)

    def plan_write(self, name, data):
        """Random bytes at a random offset of one running image."""
        model = data.draw(st.sampled_from(list(self.vms[name].values())))
        size = len(model.running)
        length = data.draw(st.integers(1, min(size, 3 * UNIT)))
        offset = data.draw(st.integers(0, size - length))
        chunk = _bytes(data.draw(st.integers(0, 2**32)), length)
        path = model.volume.block_device().path

        def write():
            with open(path, "r+b") as image:
                image.seek(offset)
                image.write(chunk)

        async def coro():
            await asyncio.to_thread(write)

        def apply(_result):
            running = bytearray(model.running)
            running[offset : offset + length] = chunk
            model.running = bytes(running)

        return Plan(coro, apply)

    def origins(self, name):
        """The origin volume models of VM `name`."""
        return [m for m in self.vms[name].values() if m.kind == "origin"]

    def plan_revert(self, name, data):
        """revert() to the newest, a chosen, or an unknown revision."""
        model = data.draw(st.sampled_from(self.origins(name)))
        choices = [None, "unknown"] + model.revisions
        choice = data.draw(st.sampled_from(choices))
        if choice is None:
            rev, arg = (model.revisions[-1:] or [None])[0], None
        elif choice == "unknown":
            rev, arg = None, "99999"
        else:
            rev, arg = choice, str(choice.number)
        running = self.running[name]

        async def coro():
            await model.volume.revert(arg)

        def apply(_result):
            if running:  # carried out at the stop; a second replaces it
                model.pending = rev
                return
            model.revert(rev)
            assert _mtime(model.path) == rev.ts

        return Plan(coro, apply, expect_error=rev is None)

    def plan_resize(self, name, data):
        """Grow or shrink one volume, running or not."""
        running = self.running[name]
        models = [
            m
            for m in self.vms[name].values()
            if m.kind != "snapshot" or running
        ]
        model = data.draw(st.sampled_from(models))
        current = model.size(self)
        change = data.draw(st.integers(-2, 3))
        new = min(max(current + change * UNIT, UNIT), MAX_UNITS * UNIT)

        async def coro():
            await model.volume.resize(new)

        def apply(_result):
            if model.running is not None:
                model.running = model.running[:new]
                model.running += bytes(new - len(model.running))
            elif model.kind == "origin" and new > current:
                model.committed += bytes(new - current)
                model.ts = _mtime(model.path)
                model.gen = next(_VERSIONS)
            elif model.kind == "origin" and new < current:
                model.shrink(new, _mtime(model.path))
            if model.kind == "volatile":
                model.length = new

        return Plan(coro, apply)

    def plan_export(self, name, data):
        """export(), read everything, export_end()."""
        model = data.draw(st.sampled_from(list(self.vms[name].values())))
        volume = model.volume
        expected = None if model.kind == "volatile" else model.exported(self)

        async def coro():
            path = await volume.export()
            content = await asyncio.to_thread(read_image, path, 2**30)
            await volume.export_end(path)
            assert not os.path.lexists(path)
            return content

        def apply(content):
            assert content == expected

        return Plan(coro, apply, expect_error=expected is None)

    def plan_export_open(self, name, data):
        """export(), to be read by a later step (after other steps)."""
        models = [m for m in self.vms[name].values() if m.kind != "volatile"]
        model = data.draw(st.sampled_from(models))
        expected = model.exported(self)

        async def coro():
            return await model.volume.export()

        def apply(path):
            self.exports.append((model.volume, path, expected))

        return Plan(coro, apply)

    def plan_import(self, name, data):
        """import_data(size), write random data, import_data_end()."""
        model = data.draw(st.sampled_from(self.origins(name)))
        size = data.draw(st.integers(1, 12)) * UNIT
        content = _bytes(data.draw(st.integers(0, 2**32)), size)
        success = data.draw(st.booleans())
        volume = model.volume

        def fill(path):
            with open(path, "r+b") as image:
                image.write(content)

        async def coro():
            path = await volume.import_data(size)
            await asyncio.to_thread(fill, path)
            await volume.import_data_end(success)
            assert not os.path.lexists(path)

        def apply(_result):
            if success:
                model.commit(content, _mtime(model.path))

        return Plan(coro, apply, expect_error=self.running[name])

    def plan_clone(self, name, data):
        """import_volume() of one volume into a pool on the same btrfs or
        into one on another filesystem."""
        models = [m for m in self.vms[name].values() if m.kind != "volatile"]
        model = data.draw(st.sampled_from(models))
        index = data.draw(st.sampled_from([1, 2]))
        pool = self.pools[index]
        dest_name = f"{name}-{model.volume.name}"
        key = (index, dest_name)
        expected = model.exported(self)
        known = self.clones.get(key)
        if known is None:
            vol = origin(pool, FakeVM("clone"), name=dest_name, size=UNIT)
            dest = OriginModel(
                vol, os.path.join(pool.root, vol.vid + ".img"), self.rtk
            )
        else:
            dest = known

        async def coro():
            if known is None:
                await dest.volume.create()
                created = _mtime(dest.path)
            else:
                created = None
            await dest.volume.import_volume(model.volume)
            return created

        def apply(created):
            if known is None:
                dest.created(UNIT)
                dest.ts = created
                self.clones[key] = dest
            dest.commit(expected, _mtime(dest.path))

        return Plan(coro, apply)

    # -- rules -----------------------------------------------------------

    def single(self, op, data, wait):
        """Run `op` alone on an eligible VM."""
        STATS["steps"] += 1
        name = data.draw(st.sampled_from(self.vms_for(op)))
        self.execute([self.plan(name, op, data)], wait)

    @precondition(lambda self: self.ready and self.vms_for("create"))
    @rule(data=st.data(), wait=st.booleans())
    def create_vm(self, data, wait):
        """Create a removed VM again."""
        self.single("create", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("remove"))
    @rule(data=st.data(), wait=st.booleans())
    def remove_vm(self, data, wait):
        """Remove a stopped VM (never the template)."""
        self.single("remove", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("start"))
    @rule(data=st.data(), wait=st.booleans())
    def start_vm(self, data, wait):
        """Start a VM."""
        self.single("start", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("stop"))
    @rule(data=st.data(), wait=st.booleans())
    def stop_vm(self, data, wait):
        """Stop a running VM."""
        self.single("stop", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("write"))
    @rule(data=st.data())
    def write(self, data):
        """Write into a running image."""
        self.single("write", data, True)

    @precondition(lambda self: self.ready and self.vms_for("revert"))
    @rule(data=st.data(), wait=st.booleans())
    def revert(self, data, wait):
        """Revert an origin volume."""
        self.single("revert", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("resize"))
    @rule(data=st.data(), wait=st.booleans())
    def resize(self, data, wait):
        """Resize a volume."""
        self.single("resize", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("export"))
    @rule(data=st.data(), wait=st.booleans())
    def export(self, data, wait):
        """Export and read a volume."""
        self.single("export", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("export_open"))
    @rule(data=st.data(), wait=st.booleans())
    def export_open(self, data, wait):
        """Take an export to read later."""
        self.single("export_open", data, wait)

    @precondition(lambda self: self.ready and self.exports)
    @rule(data=st.data())
    def export_close(self, data):
        """Read an export taken earlier (maybe before a stop), end it."""
        STATS["steps"] += 1
        index = data.draw(st.integers(0, len(self.exports) - 1))
        volume, path, expected = self.exports.pop(index)
        assert read_image(path, 2**30) == expected
        self.run(volume.export_end(path))
        assert not os.path.lexists(path)

    @precondition(lambda self: self.ready and self.vms_for("import"))
    @rule(data=st.data(), wait=st.booleans())
    def import_data(self, data, wait):
        """Import new data into an origin volume."""
        self.single("import", data, wait)

    @precondition(lambda self: self.ready and self.vms_for("clone"))
    @rule(data=st.data(), wait=st.booleans())
    def clone(self, data, wait):
        """Clone a volume into another pool."""
        self.single("clone", data, wait)

    @precondition(lambda self: self.ready)
    @rule(data=st.data(), wait=st.booleans())
    def concurrently(self, data, wait):
        """Operations on two to four different VMs in one gather."""
        STATS["steps"] += 1
        names = data.draw(
            st.lists(st.sampled_from(list(VMS)), min_size=2, max_size=4)
            .map(lambda names: sorted(set(names), key=list(VMS).index))
            .filter(lambda names: len(names) >= 2)
        )
        chosen = []
        template_changes = False
        for name in names:  # "tpl" first
            ops = [op for op in VM_OPS if self.eligible(name, op)]
            if name != "tpl" and template_changes:
                ops = [op for op in ops if op not in READS_TEMPLATE]
            if not ops:
                continue
            op = data.draw(st.sampled_from(ops))
            if name == "tpl" and op in CHANGES_TEMPLATE:
                template_changes = True
            chosen.append((name, op))
        # plans are built (and their draws made) only for chosen ops
        plans = [self.plan(name, op, data) for name, op in chosen]
        self.execute(plans, wait)

    # -- checks ------------------------------------------------------------

    @invariant()
    def matches_model(self):
        """Every observable result agrees with the model."""
        if not self.ready:
            return
        for name, models in self.vms.items():
            if models is None:
                continue
            for model in models.values():
                self.check_volume(model)
            if self.settled:
                self.check_no_leftovers(name, models)
        for dest in self.clones.values():
            self.check_volume(dest)

    def check_volume(self, model):
        """Compare one volume with its model."""
        volume = model.volume
        assert volume.size == model.size(self)
        assert volume.is_dirty() == (
            model.kind == "origin" and model.running is not None
        )
        if model.running is not None:
            with open(volume.block_device().path, "rb") as image:
                assert image.read() == model.running
        else:
            assert not os.path.lexists(volume.path)
        if model.kind == "snapshot":
            outdated = (
                model.running is not None
                and model.start_gen != model.source.gen
            )
            assert volume.is_outdated() == outdated
        if model.kind != "origin":
            return
        with open(model.path, "rb") as image:
            assert image.read() == model.committed
        expected = {str(r.number): isodate(r.ts) for r in model.revisions}
        assert list(volume.revisions.items()) == list(expected.items())
        for rev in model.revisions:
            with open(model.revision_path(rev), "rb") as image:
                assert image.read() == rev.data

    def check_no_leftovers(self, name, models):
        """With background work done: no temporary or import files, exports
        only those still open, a ~base only beside a running snapshot."""
        directory = os.path.join(self.pools[0].root, VMS[name][0], name)
        open_exports = {path for _v, path, _e in self.exports}
        for entry in os.listdir(directory):
            path = os.path.join(directory, entry)
            assert "~tmp." not in entry and "~import." not in entry, path
            if "~export." in entry:
                assert path in open_exports, path
            if layout.classify(entry) and layout.classify(entry).kind == (
                layout.BASE
            ):
                vol_name = entry.split(".img~", 1)[0]
                assert models[vol_name].running is not None, path


def machine_for(btrfs_root, other_root):
    """A ReflinkMachine class bound to the test's filesystems."""
    return type(
        "ReflinkMachine",
        (ReflinkMachine,),
        {"btrfs_root": btrfs_root, "other_root": other_root},
    )


def run_machine(mounts, capsys, other, **settings_kwargs):
    """Run the state machine and print the figures of the run."""
    base = tempfile.mkdtemp(prefix="model-", dir=mounts("btrfs"))
    elsewhere = tempfile.mkdtemp(prefix="model-", dir=mounts(other))
    before = dict(STATS)
    try:
        run_state_machine_as_test(
            machine_for(base, elsewhere),
            settings=settings(
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                **settings_kwargs,
            ),
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)
        figures = {key: STATS[key] - before[key] for key in STATS}
        with capsys.disabled():
            print(f"\nmodel test (clones to {other}): {figures}")


def test_model_bounded(mounts, capsys):
    """The bounded run of `make test`."""
    run_machine(mounts, capsys, "ext4", max_examples=25, stateful_step_count=20)


@pytest.mark.slow
@pytest.mark.parametrize("other", ["ext4", "xfs"])
def test_model_long(mounts, capsys, other):
    """The long run of `make stress`."""
    run_machine(mounts, capsys, other, max_examples=300, stateful_step_count=50)
