"""Power-cut harness: every state a disk can be left in, rebuilt and checked.

Run as ``python3 tests/powercut.py CONFIG.json``.  CONFIG gives the
scenario (``op``, one of crashharness.SCENARIOS with a single pool), the
filesystem (``fstype``), a scratch directory (``work``, best in RAM), the
sampling (``every_flush``: all flush points, else at most ``states`` of
them; ``subsets``: how many seeded subsets of the writes after each flush
point; ``seed``), ``no_fsync`` (the proof that the method bites: the
driver's fsyncs do nothing) and where the JSON result goes (``out``).

1. **Record.** A fresh filesystem image is served by the write-logging
   FUSE device (tests/blocklog.py) and loop-mounted.  The scenario's world
   is built on it through the driver's API and synced; then the log starts
   (the image as it is becomes the *base*), the operation runs, the pool's
   background work (spares, trash) ends, and the filesystem is unmounted.
   Markers in the log say where the operation returned.
2. **Rebuild.** Crash state at flush k: the base plus every write logged
   before the k-th flush (a write completed before a flush is durable).
   For the writes between flush k and the next one, a seeded sample of
   subsets of them on top of that (each may have been lost on its own).
3. **Check.** Each state is mounted (the filesystem's own log recovery),
   then qubesd restarts on it (crashharness.recover: fresh objects, stop()
   on every volume, a start and stop of every VM) and we check: committed
   data is what it was before or after the operation, and after it in
   every state past the operation's return (it promised durability by
   returning); no revision committed before is lost and every listed one
   reads; nothing outside ``dir_path`` changed; export and revert of each
   volume work; ``qubes-reflink fsck`` finds nothing; no leftovers.
"""

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import blocklog
import crashharness
from crashharness import World
from loopfs import MKFS, unmount

from qubes_reflink import cli, fileops

HERE = os.path.dirname(os.path.abspath(__file__))
# mkfs.xfs refuses less than 300 MiB; the others are kept as small
IMAGE_SIZE = {"btrfs": 256 << 20, "xfs": 300 << 20, "ext4": 64 << 20}
OP_START, OP_DONE = "op-start", "op-done"


# -- the device ------------------------------------------------------------


def _run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def logging_device(work, fstype):
    """Yield the FUSE-served disk file of a fresh `fstype` filesystem.

    The daemon is unmounted and waited for whatever happens; the caller
    unmounts the loop mount (autoclear detaches the loop device)."""
    image = os.path.join(work, "image")
    with open(image, "wb") as image_file:
        image_file.truncate(IMAGE_SIZE[fstype])
    _run(*MKFS[fstype], image)
    served = os.path.join(work, "served")
    os.mkdir(served)
    # pylint: disable=consider-using-with
    daemon = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "blocklog.py"), work, served],
        stderr=subprocess.PIPE,
    )
    try:
        disk = os.path.join(served, "disk")
        deadline = time.monotonic() + 10
        while not os.path.exists(disk):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "blocklog daemon did not start: "
                    + daemon.stderr.read().decode(errors="replace")
                )
            time.sleep(0.02)
        yield disk
    finally:
        subprocess.run(["fusermount3", "-u", served], check=False)
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()


def control(disk, command):
    """Send a command to the daemon; it is in the log when this returns."""
    with open(os.path.join(os.path.dirname(disk), "control"), "w") as ctl:
        ctl.write(command)


@contextlib.contextmanager
def mounted(image, mountpoint):
    """Loop-mount `image` at `mountpoint`; always unmounted afterwards."""
    _run("mount", "-o", "loop", image, mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


# -- outside dir_path ------------------------------------------------------


def outside_listing(mountpoint, pool_dir):
    """Every file outside the pool on the filesystem, with its digest:
    what the driver must never touch."""
    found = {}
    for root, dirs, names in os.walk(mountpoint):
        dirs[:] = [d for d in dirs if os.path.join(root, d) != pool_dir]
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, mountpoint)] = crashharness.digest(path)
    return found


def write_bystander(mountpoint):
    """A file of the user's beside the pool, made durable."""
    os.makedirs(os.path.join(mountpoint, "home"), exist_ok=True)
    path = os.path.join(mountpoint, "home", "notes.txt")
    with open(path, "wb") as notes:
        notes.write(b"not the driver's\n" * 1000)
        os.fsync(notes.fileno())


# -- recording ---------------------------------------------------------------


def disable_fsync():
    """The proof's switch: every fsync of the driver does nothing."""
    fileops._fsync = lambda fd, path: None  # pylint: disable=protected-access


async def record_operation(sc, dirs, disk, no_fsync):
    """Build the world, sync, start the log, run the operation."""
    world = World(dirs, {"main": False}, sc.vols)
    world.make_pools()
    if sc.setup_pools:
        await world.pools["main"].setup()
    world.make_volumes()
    state = {}
    await sc.build(world, state)
    await world.wait_background()
    built = crashharness.observe(world)
    os.sync()
    control(disk, "start")
    control(disk, f"mark {OP_START}")
    if no_fsync:
        disable_fsync()
    await sc.op(world, state)
    control(disk, f"mark {OP_DONE}")
    await world.wait_background()
    for pool in world.pools.values():
        await pool.close()
    return built


def record(config, sc, mountpoint):
    """Run the operation on the logging device; (records, what the world
    was before it, what lies outside the pool)."""
    work = config["work"]
    dirs = {"main": os.path.join(mountpoint, "qubes")}
    with logging_device(work, config["fstype"]) as disk:
        with mounted(disk, mountpoint):
            os.mkdir(dirs["main"])
            write_bystander(mountpoint)
            built = asyncio.run(
                record_operation(sc, dirs, disk, config["no_fsync"])
            )
            outside = outside_listing(mountpoint, os.path.join(dirs["main"]))
    os.unlink(os.path.join(work, "image"))
    return blocklog.read_log(work), built, outside


# -- crash states ------------------------------------------------------------


class CrashState:
    """Writes (indices into the log) on top of the base, and what the
    state must show: ``must_be_after`` once the operation had returned."""

    def __init__(self, name, writes, must_be_after):
        self.name = name
        self.writes = writes
        self.must_be_after = must_be_after


def crash_states(records, config):
    """The states to check: every flush point (or a seeded sample of them)
    and seeded subsets of the writes after each; the end state last."""
    rng = random.Random(config["seed"])
    labels = {r.label: i for i, r in enumerate(records) if r.kind == b"M"}
    start, done = labels[OP_START], labels[OP_DONE]
    flushes = [i for i, r in enumerate(records) if r.kind == blocklog.FLUSH]
    # the durable state when the operation returned: up to the last flush
    # before it; every state from there on must hold the operation's result
    promised = max([start] + [f for f in flushes if f < done])
    points = [f for f in flushes if f > start]
    if not config["every_flush"] and len(points) > config["states"]:
        points = sorted(rng.sample(points, config["states"]))
    points = [start] + points
    states = []
    for point in points:
        durable = _writes(records, 0, point)
        after = point >= promised
        states.append(CrashState(f"flush@{point}", durable, after))
        following = _writes(records, point, _next(flushes, point, records))
        for number in range(_subset_count(len(following), config)):
            lost_some = [i for i in following if rng.random() < 0.5]
            states.append(
                CrashState(
                    f"flush@{point}+subset{number}", durable + lost_some, after
                )
            )
    states.append(CrashState("end", _writes(records, 0, len(records)), True))
    return states


def _writes(records, begin, end):
    return [i for i in range(begin, end) if records[i].kind == blocklog.WRITE]


def _next(flushes, point, records):
    return next((f for f in flushes if f > point), len(records))


def _subset_count(writes, config):
    """Subsets only where there are two writes or more to choose from."""
    return config["subsets"] if writes >= 2 else 0


def build_image(work, records, state, path):
    """The disk of `state`: the base plus its writes, in log order."""
    subprocess.run(
        ["cp", "--sparse=always", os.path.join(work, "base"), path],
        check=True,
    )
    with open(os.path.join(work, "data"), "rb") as data, open(
        path, "r+b"
    ) as image:
        for index in state.writes:
            write = records[index]
            data.seek(write.data_pos)
            image.seek(write.offset)
            image.write(data.read(write.length))


# -- checking one state --------------------------------------------------------


async def export_and_revert(world, errors):
    """Each volume exports its committed data; each with revisions reverts
    to its newest one and then holds that revision's data."""
    for spec in world.specs:
        vol, files = world.vols[spec.key], world.files(spec.key)
        if not spec.save_on_stop or not os.path.exists(files.committed):
            continue
        path = await vol.export()
        if crashharness.digest(path) != crashharness.digest(files.committed):
            errors.append(f"export of {spec.key} is not its committed data")
        await vol.export_end(path)
        revisions = files.scan().revisions
        if revisions:
            wanted = crashharness.digest(revisions[-1].path)
            await vol.revert()
            if crashharness.digest(files.committed) != wanted:
                errors.append(f"revert of {spec.key} did not restore it")
    await world.wait_background()


def fsck_errors(pool_dir):
    """What ``qubes-reflink fsck`` reports, as errors."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["fsck", pool_dir])
    return [] if code == 0 else [f"fsck: {out.getvalue().strip()}"]


async def check_state(sc, dirs):
    """qubesd restarts on the mounted state: (seen, errors)."""
    seen, errors = await crashharness.recover(dirs, {"main": False}, sc)
    if sc.cycle != "setup":
        world = World(dirs, {"main": False}, sc.vols)
        world.make_pools()
        world.make_volumes()
        await export_and_revert(world, errors)
        for pool in world.pools.values():
            await pool.close()
    if os.path.isdir(os.path.join(dirs["main"], "pool")):
        errors += fsck_errors(os.path.join(dirs["main"], "pool"))
    return seen, errors


def strict_compare(seen, after):
    """Committed data past the operation's return: the result, only."""
    errors = []
    for key, state in seen.items():
        if (
            isinstance(state, dict)
            and state["committed"] != after[key]["committed"]
        ):
            errors.append(
                f"{key}: committed {crashharness.show(state['committed'])} "
                "after the operation had returned, not "
                f"{crashharness.show(after[key]['committed'])}"
            )
    return errors


# -- the campaign -----------------------------------------------------------------


class Campaign:
    """Record one operation, then build, mount and check its crash states."""

    def __init__(self, config):
        self.config = config
        self.sc = crashharness.SCENARIOS[config["op"]]
        self.mountpoint = os.path.join(config["work"], "mnt")
        self.dirs = {"main": os.path.join(self.mountpoint, "qubes")}
        self.counts = {"built": 0, "mounted": 0, "checked": 0, "lost": 0}
        self.failures = []

    def check(self, records, state, outside):
        """Mount and check one state; (seen, errors, lost)."""
        image = os.path.join(self.config["work"], "state")
        build_image(self.config["work"], records, state, image)
        self.counts["built"] += 1
        try:
            with mounted(image, self.mountpoint):
                self.counts["mounted"] += 1
                errors = []
                now = outside_listing(self.mountpoint, self.dirs["main"])
                if now != outside:
                    errors.append(f"outside dir_path: {outside} -> {now}")
                seen, more = asyncio.run(check_state(self.sc, self.dirs))
                self.counts["checked"] += 1
                return seen, errors + more
        except subprocess.CalledProcessError as err:
            return None, [f"does not mount: {err.stderr.decode().strip()}"]
        finally:
            os.unlink(image)

    def run(self):
        """The whole campaign; the result dict."""
        os.mkdir(self.mountpoint)
        records, built, outside = record(self.config, self.sc, self.mountpoint)
        states = crash_states(records, self.config)
        checked = [self.check(records, state, outside) for state in states]
        before, after = checked[0][0], checked[-1][0]
        if before is None or after is None:
            self._fail("campaign", ["the state before or after is unusable"])
            return self.result(records)
        self._fail(
            "expected", crashharness.check_expectations(self.sc, before, after)
        )
        for state, (seen, errors) in zip(states, checked):
            if seen is not None:
                lost = crashharness.compare(seen, before, after, built)
                if state.must_be_after:
                    lost += strict_compare(seen, after)
                self.counts["lost"] += bool(lost)
                errors = lost + errors
            self._fail(state.name, errors)
        return self.result(records)

    def _fail(self, where, errors):
        self.failures += [f"{where}: {error}" for error in errors]

    def result(self, records):
        """Figures and failures."""
        kinds = [r.kind for r in records]
        return {
            "op": self.config["op"],
            "fstype": self.config["fstype"],
            "writes": kinds.count(blocklog.WRITE),
            "flushes": kinds.count(blocklog.FLUSH),
            **self.counts,
            "failures": self.failures,
        }


def main(argv):
    """Entry point: run the campaign of the config file argv[1]."""
    logging.getLogger("qubes.storage.reflink").setLevel(logging.ERROR)
    with open(argv[1], encoding="utf-8") as config_file:
        config = json.load(config_file)
    config["work"] = tempfile.mkdtemp(prefix="powercut-", dir=config["work"])
    try:
        result = Campaign(config).run()
    finally:
        shutil.rmtree(config["work"], ignore_errors=True)
    with open(config["out"], "w", encoding="utf-8") as out:
        json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
