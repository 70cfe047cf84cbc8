"""Spares at scale (issue 9): what reflinks of a template root cost.

An older design kept, for every stopped AppVM, a spare clone of its
template's root: with 40 AppVMs, 40 more reflinks of every extent of that
image.  On btrfs every reflink of an extent is a back reference that later
clones and deletions of it walk or update; on XFS a reference count.  The
driver now keeps one spare per template version: an AppVM's start takes
the template's spare by rename, and the template makes the next one.

On a template root of ~30,000 extents this measures, with 0, N/4 and N
*extra reflinks* of the committed image (plain FICLONEs the bench makes
into <mount>/legacy-spares/, the old design's per-AppVM spares, timed as
they are made: the old design's background work after N stops; and timed
as they are deleted: its work after a template update), and then with N/4
and N real AppVMs of the current driver, started and stopped:

- a template commit (start, the "VM" writes, stop): the stop, and the
  background work until the pool is quiet (the template's next spare, the
  pruned revision deleted from the trash);
- a plain clone of the committed template root;
- the deletion of a fresh clone of it (unlink + sync -f);

each against the same with no extra reflink (*x no spares*).
"""

import asyncio
import os
import random
import statistics
import time

from helpers import FakeVM, new_pool, origin, snapshot
from qubes_reflink import layout

from . import images
from .images import GIB, MIB
from .measure import clone_delete_sample, median_ms, ms, syncfs, timed
from .scenarios import VM_WRITES, committed_path, put_image, row, vm_writes

SCENARIO = "spares@scale"

#: The costs measured at each number of reflinks: key, operation.
COSTS = (
    ("commit_stop", "template commit: stop"),
    ("commit_background", "template commit: background until quiet"),
    ("clone", "clone template root"),
    ("delete", "delete a clone of template root"),
)


def counts(vms):
    """The numbers of extra reflinks (and of AppVMs) measured: 0, a
    quarter of `vms`, `vms`."""
    return sorted({0, max(1, vms // 4), vms})


def build_image(directory, extents):
    """A 1 GiB image of about `extents` extents shared with no other file:
    fragmented from a random base and donor of its own, both deleted."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "base")
    donor = os.path.join(directory, "donor")
    path = os.path.join(directory, f"template-root-{extents}")
    images.write_random(base, GIB)
    images.write_random(donor, 64 * MIB)
    images.fragment(path, base, donor, extents)
    os.unlink(base)
    os.unlink(donor)
    syncfs(directory)
    return path


def _spare_files(root):
    """The spares in the pool below `root`."""
    return sum(
        1
        for _dir, _subdirs, names in os.walk(root)
        for name in names
        if getattr(layout.classify(name), "kind", None) == layout.SPARE
    )


class SparesAtScale:
    """The spares-at-scale scenario on one filesystem."""

    def __init__(self, fstype, mountpoint, extents, vms, reps):
        self.fstype = fstype
        self.mount = mountpoint
        self.wanted_extents = extents
        self.vms = vms
        self.reps = reps
        self.rows = []
        self.rng = random.Random(9)
        self.baseline = {}  # cost key -> median seconds, no extra reflink
        self.pool = self.template = self.committed = None
        self.extents = 0
        self.offsets = []

    def log(self, message):
        """Progress on stdout."""
        print(f"[{self.fstype}] {SCENARIO}: {message}", flush=True)

    def _row(self, operation, samples, **extra):
        result = row(
            self.fstype,
            f"{SCENARIO}: {operation}",
            samples,
            scenario=SCENARIO,
            extents=self.extents,
            **extra,
        )
        return result

    async def setup(self):
        """A pool holding the template root, started and stopped once."""
        start = time.perf_counter()
        image = build_image(
            os.path.join(self.mount, "images-spares"), self.wanted_extents
        )
        # a pool directory of its own: its trash, spares and background
        # work are those of this scenario only
        self.pool = await new_pool(
            os.path.join(self.mount, "spares-at-scale"),
            name=f"bench-spares-{self.fstype}",
        )
        self.template = origin(
            self.pool,
            FakeVM("tpl-spares", "vm-templates"),
            name="root",
            size=os.stat(image).st_size,
        )
        await self.template.create()
        await put_image(self.pool, self.template, image)
        os.unlink(image)
        await self.template.start()
        await self.template.stop()
        await self.pool.wait_background()
        self.committed = committed_path(self.template)
        self.extents = images.extent_count(self.committed)
        self.offsets = [
            self.rng.randrange(os.stat(self.committed).st_size // 4096) * 4096
            for _ in range(VM_WRITES)
        ]
        self.log(
            f"template root of {self.extents} extents ready in "
            f"{time.perf_counter() - start:.1f} s"
        )

    async def costs(self, label, extra=0, appvms=0):
        """Commit, clone and delete of the template root, `self.reps`
        times, as things stand; rows named after `label`."""
        samples = {key: [] for key, _operation in COSTS}
        for _ in range(self.reps):
            syncfs(self.mount)
            await self.template.start()
            vm_writes(self.template.path, self.rng, self.offsets)
            samples["commit_stop"].append(await timed(self.template.stop()))
            samples["commit_background"].append(
                await timed(self.pool.wait_background())
            )
            cloned, deleted = clone_delete_sample(self.committed)
            samples["clone"].append(cloned)
            samples["delete"].append(deleted)
        if not extra and not appvms:
            self.baseline = {
                key: statistics.median(values)
                for key, values in samples.items()
            }
        for key, operation in COSTS:
            result = self._row(
                f"{operation}, {label}",
                samples[key],
                extra_reflinks=extra,
                stopped_appvms=appvms,
            )
            result["x_no_spares"] = round(
                result["median_ms"] / ms(self.baseline[key]), 2
            )
            self.rows.append(result)
        self.log(
            f"{label}: "
            + ", ".join(
                f"{key} {median_ms(samples[key]):.1f} ms"
                for key, _operation in COSTS
            )
        )

    def _legacy_row(self, operation, seconds, count, key):
        result = self._row(operation, [seconds], extra_reflinks=count)
        result["per_item_ms"] = round(result["median_ms"] / count, 3)
        # each one against one clone (deletion) with no extra reflink
        result["x_no_spares"] = round(
            result["per_item_ms"] / ms(self.baseline[key]), 2
        )
        self.rows.append(result)

    async def legacy(self):
        """Legacy spares made up to each count, the costs measured with
        them; then all deleted."""
        directory = os.path.join(self.mount, "legacy-spares")
        os.makedirs(directory, exist_ok=True)
        paths, made = [], 0.0
        for count in counts(self.vms)[1:]:
            syncfs(self.mount)
            start = time.perf_counter()
            while len(paths) < count:
                paths.append(os.path.join(directory, f"spare-{len(paths):03d}"))
                images.clone(self.committed, paths[-1])
            syncfs(self.mount)
            made += time.perf_counter() - start
            self._legacy_row(
                f"make {count} legacy spares (old design: background "
                f"after {count} stops)",
                made,
                count,
                "clone",
            )
            self.log(f"{count} legacy spares made in {ms(made):.0f} ms")
            await self.costs(f"{count} legacy spares", extra=count)
        syncfs(self.mount)
        start = time.perf_counter()
        for path in paths:
            os.unlink(path)
        syncfs(self.mount)
        removed = time.perf_counter() - start
        os.rmdir(directory)
        self._legacy_row(
            f"delete {len(paths)} legacy spares (old design: after a "
            "template update)",
            removed,
            len(paths),
            "delete",
        )
        self.log(f"{len(paths)} legacy spares deleted in {ms(removed):.0f} ms")

    async def appvms(self, roots, count):
        """The first `count` AppVM roots started at once and stopped at
        once; then the costs measured with them stopped."""
        group = roots[:count]
        syncfs(self.mount)
        start = await timed(asyncio.gather(*(r.start() for r in group)))
        start_background = await timed(self.pool.wait_background())
        # the VMs write; untimed: that is the bench, not the driver
        await asyncio.to_thread(
            lambda: [vm_writes(root.path, self.rng) for root in group]
        )
        syncfs(self.mount)
        stop = await timed(asyncio.gather(*(r.stop() for r in group)))
        stop_background = await timed(self.pool.wait_background())
        spares = _spare_files(self.pool.root)
        for operation, seconds in (
            (f"start {count} AppVMs at once", start),
            (f"background until quiet after {count} starts", start_background),
            (f"stop {count} AppVMs at once", stop),
            (f"background until quiet after {count} stops", stop_background),
        ):
            result = self._row(
                operation, [seconds], stopped_appvms=count, spares=spares
            )
            result["per_item_ms"] = round(result["median_ms"] / count, 3)
            self.rows.append(result)
        self.log(
            f"{count} AppVMs: start {ms(start):.0f} ms (then "
            f"{ms(start_background):.0f} ms background), stop "
            f"{ms(stop):.0f} ms (then {ms(stop_background):.0f} ms "
            f"background); {spares} spare(s) in the pool when quiet"
        )
        await self.costs(
            f"{count} stopped AppVMs (current driver)", appvms=count
        )

    async def run(self):
        """Everything, in order; returns the rows."""
        await self.setup()
        await self.costs("no spares")
        await self.legacy()
        roots = []
        for index in range(self.vms):
            root = snapshot(self.pool, FakeVM(f"app{index:03d}"), self.template)
            await root.create()
            roots.append(root)
        await self.pool.wait_background()
        for count in counts(self.vms):
            if count:
                await self.appvms(roots, count)
        return self.rows


async def spares_at_scale(fstype, mountpoint, extents, vms, reps):
    """The rows of the spares-at-scale scenario on one filesystem."""
    return await SparesAtScale(fstype, mountpoint, extents, vms, reps).run()
