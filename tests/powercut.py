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
import stat
import subprocess
import sys
import tempfile
import time

import blocklog
import crashharness
from crashharness import World
from loopfs import MKFS, unmount

import qubes_reflink
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
    """Everything on the filesystem outside the pool directory: each
    file's digest, each directory, each symbolic link's target, each
    mode: what the driver must never touch."""
    found = {}
    for root, dirs, names in os.walk(mountpoint):
        dirs[:] = [d for d in dirs if os.path.join(root, d) != pool_dir]
        for name in dirs + names:
            path = os.path.join(root, name)
            status = os.lstat(path)
            if os.path.islink(path):
                what = ("link", os.readlink(path))
            elif os.path.isdir(path):
                what = ("dir",)
            else:
                what = ("file", crashharness.digest(path))
            found[os.path.relpath(path, mountpoint)] = what + (
                stat.S_IMODE(status.st_mode),
            )
    return found


def write_bystanders(mountpoint, beside_pool):
    """The user's files around the pool, made durable: a file, a link to
    it and an empty directory in their home, and a file beside the pool
    directory."""
    home = os.path.join(mountpoint, "home")
    os.makedirs(os.path.join(home, "empty"), exist_ok=True)
    for path in (
        os.path.join(home, "notes.txt"),
        os.path.join(beside_pool, "notes.txt"),
    ):
        with open(path, "wb") as notes:
            notes.write(b"not the driver's\n" * 1000)
            os.fsync(notes.fileno())
    os.symlink("notes.txt", os.path.join(home, "link"))
    os.sync()


#: Each filesystem's own checker, read-only (on the image of a state).
CHECKERS = {
    "btrfs": ("btrfs", "check", "--readonly"),
    "xfs": ("xfs_repair", "-n", "-f"),
    "ext4": ("e2fsck", "-f", "-n"),
}


def fs_check_errors(image, fstype, mountpoint):
    """What the filesystem's checker finds wrong with the state `image`.

    btrfs check reads the committed trees as they are; XFS and ext4 first
    get their journal replayed by a mount, as xfstests does before it
    checks (their checkers refuse, or report damage, on an unreplayed
    journal)."""
    if fstype != "btrfs":
        with mounted(image, mountpoint):
            pass
    command = [*CHECKERS[fstype], image]
    result = subprocess.run(
        command, capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return []
    output = (result.stdout + result.stderr).strip().splitlines()[-5:]
    return [f"{' '.join(command[:-1])}: exit {result.returncode}: {output}"]


# -- recording ---------------------------------------------------------------


def disable_fsync():
    """The proof's switch: every fsync of the driver does nothing."""
    fileops._fsync = lambda fd, path: None  # pylint: disable=protected-access


async def record_operation(sc, dirs, mark, no_fsync):
    """Build the world, sync, start the log (`mark`), run the operation."""
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
    mark(OP_START)
    if no_fsync:
        disable_fsync()
    await sc.op(world, state)
    mark(OP_DONE)
    await world.wait_background()
    for pool in world.pools.values():
        await pool.close()
    return built


def marker(disk):
    """What marks a point in the log: the daemon's control file (the log
    starts with the operation)."""

    def mark(name):
        if name == OP_START:
            control(disk, "start")
        control(disk, f"mark {name}")

    return mark


#: The driver without CAP_SYS_ADMIN: btrfs refuses to destroy subvolumes.
USER_NAMESPACE = ("unshare", "--user", "--map-root-user")


def driver_child(mode, *args):
    """A child Python running this file's driver side (`child_main`) in a
    user namespace; the FUSE device stays the parent's, which writes the
    log's marks when the child says so."""
    # pylint: disable-next=consider-using-with
    return subprocess.Popen(
        [*USER_NAMESPACE, sys.executable, __file__, "--driver", mode, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def record_in_user_namespace(config, dirs, disk):
    """record_operation in a user namespace; what the world was before."""
    child = driver_child("record", config["op"], json.dumps(dirs))
    mark = marker(disk)
    with child:
        for line in child.stdout:
            name = line.strip()
            if name in (OP_START, OP_DONE):
                mark(name)
                child.stdin.write("go\n")
                child.stdin.flush()
            elif name.startswith("{"):
                built = json.loads(name)
    if child.returncode != 0:
        raise RuntimeError(f"the driver's child exited {child.returncode}")
    return built


def record(config, sc, mountpoint):
    """Run the operation on the logging device; (records, what the world
    was before it, what lies outside the pool)."""
    work = config["work"]
    dirs = {"main": os.path.join(mountpoint, "qubes")}
    with logging_device(work, config["fstype"]) as disk:
        with mounted(disk, mountpoint):
            os.mkdir(dirs["main"])
            write_bystanders(mountpoint, dirs["main"])
            if config.get("user_namespace"):
                built = record_in_user_namespace(config, dirs, disk)
            else:
                built = asyncio.run(
                    record_operation(sc, dirs, marker(disk), config["no_fsync"])
                )
            outside = outside_listing(mountpoint, pool_dir(dirs))
    os.unlink(os.path.join(work, "image"))
    return blocklog.read_log(work), built, outside


def pool_dir(dirs):
    """The pool's dir_path in the world of `dirs` (crashharness.World)."""
    return os.path.join(dirs["main"], "pool")


# -- crash states ------------------------------------------------------------


class CrashState:
    """Writes (indices into the log) on top of the base, and what the
    state must show: ``must_be_after`` once the operation had returned."""

    def __init__(self, name, writes, must_be_after):
        self.name = name
        self.writes = writes
        self.must_be_after = must_be_after


def crash_states(records, config):
    """The distinct states to check (the same set of applied writes is one
    state, however it was reached): every flush point (or a seeded sample
    of them) and, after each, the interval's writes with its last one
    missing, a seeded prefix of them, and seeded subsets; the end state
    last."""
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
    states, seen = [], set()

    def add(name, writes, must_be_after):
        key = frozenset(writes)
        if key not in seen:
            seen.add(key)
            states.append(CrashState(name, writes, must_be_after))

    end = _writes(records, 0, len(records))
    seen.add(frozenset(end))  # the end state comes last, whatever equals it
    points = [start] + points
    for point in points:  # the flush points first: they keep their names
        add(f"flush@{point}", _writes(records, 0, point), point >= promised)
    for point in points:
        durable = _writes(records, 0, point)
        following = _writes(records, point, _next(flushes, point, records))
        for name, writes in _interval_states(following, config, rng):
            add(f"flush@{point}+{name}", durable + writes, point >= promised)
    states.append(CrashState("end", end, True))
    return states


def _interval_states(following, config, rng):
    """(name, writes) of the states within one interval between flushes:
    its last write missing, a prefix of it (writes reach the disk in
    order), and seeded subsets (each may have been lost on its own)."""
    if len(following) < 2:
        return []
    found = [("last-missing", following[:-1])]
    found.append(("prefix", following[: rng.randrange(1, len(following))]))
    for number in range(_subset_count(len(following), config)):
        lost_some = [i for i in following if rng.random() < 0.5]
        found.append((f"subset{number}", lost_some))
    return found


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
    """qubesd restarts on the mounted state: (seen, errors, data errors:
    volumes that share an image file)."""
    seen, errors = await crashharness.recover(dirs, {"main": False}, sc)
    shared = []
    if sc.cycle != "setup":
        world = World(dirs, {"main": False}, sc.vols)
        world.make_pools()
        world.make_volumes()
        shared = crashharness.shared_images(world)
        await export_and_revert(world, errors)
        for pool in world.pools.values():
            await pool.close()
    if os.path.isdir(os.path.join(dirs["main"], "pool")):
        errors += fsck_errors(os.path.join(dirs["main"], "pool"))
    return seen, errors, shared


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
        self.counts = {
            "built": 0,
            "fs_checked": 0,
            "mounted": 0,
            "checked": 0,
            "lost": 0,
        }
        self.failures = []

    def check(self, records, state, outside):
        """Mount and check one state; (seen, errors, data errors)."""
        image = os.path.join(self.config["work"], "state")
        build_image(self.config["work"], records, state, image)
        self.counts["built"] += 1
        try:
            errors = []
            if self.config.get("fs_check"):
                errors += fs_check_errors(
                    image, self.config["fstype"], self.mountpoint
                )
                self.counts["fs_checked"] += 1
            with mounted(image, self.mountpoint):
                self.counts["mounted"] += 1
                errors += self.outside_errors(outside, "before recovery")
                if self.config.get("user_namespace"):
                    checked = check_in_user_namespace(
                        self.config["op"], self.dirs
                    )
                else:
                    checked = asyncio.run(check_state(self.sc, self.dirs))
                seen, more, shared = checked
                errors += self.outside_errors(outside, "after recovery")
                self.counts["checked"] += 1
                return seen, errors + more, shared
        except subprocess.CalledProcessError as err:
            return None, [f"does not mount: {err.stderr.decode().strip()}"], []
        finally:
            os.unlink(image)

    def outside_errors(self, outside, when):
        """What changed outside dir_path since the recording."""
        now = outside_listing(self.mountpoint, pool_dir(self.dirs))
        if now == outside:
            return []
        changed = sorted(
            path
            for path in set(now) | set(outside)
            if now.get(path) != outside.get(path)
        )
        return [f"outside dir_path, {when}: changed {changed}"]

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
        survive = crashharness.must_survive(self.sc, built)
        self.counts["guarded"] = len(survive)
        for state, (seen, errors, shared) in zip(states, checked):
            if seen is not None:
                lost = crashharness.compare(seen, before, after, built)
                lost += crashharness.survival_errors(seen, survive)
                lost += shared
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
            # which driver ran: tests/mutants.py runs copies of it
            "driver": os.path.dirname(qubes_reflink.__file__),
            "writes": kinds.count(blocklog.WRITE),
            "flushes": kinds.count(blocklog.FLUSH),
            **self.counts,
            "failures": self.failures,
        }


def child_main(mode, op, dirs):
    """The driver side of a campaign, in a child (`driver_child`): record
    (the marks through the parent) or check one state; JSON out."""
    sc = crashharness.SCENARIOS[op]
    if mode == "record":

        def mark(name):
            print(name, flush=True)
            sys.stdin.readline()

        built = asyncio.run(record_operation(sc, dirs, mark, False))
        print(json.dumps(built), flush=True)
    else:
        print(json.dumps(asyncio.run(check_state(sc, dirs))), flush=True)
    return 0


def check_in_user_namespace(op, dirs):
    """check_state in a user namespace: qubesd's restart refused too."""
    child = driver_child("check", op, json.dumps(dirs))
    with child:
        child.stdin.close()
        output = child.stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"the driver's child exited {child.returncode}")
    return tuple(json.loads(output.strip().splitlines()[-1]))


def main(argv):
    """Entry point: run the campaign of the config file argv[1]."""
    if argv[1:2] == ["--driver"]:
        return child_main(argv[2], argv[3], json.loads(argv[4]))
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
