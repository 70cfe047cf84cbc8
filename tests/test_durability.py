"""Durability order, checked from a syscall trace of a whole lifecycle.

A child python runs a full lifecycle (pool set-up, create, start, write,
stop with revisions and pruning, revert, import_data, import_volume from
the same pool and from an ext4 pool, resize stopped and running, export,
snapshots disabled, remove) under ``strace -f``.  From the trace we check:

- every rename that publishes data (its target is a committed image
  ``<vol>.img``, a running image ``-dirty.img`` or a spare) renames a file
  that was fsynced after it was last opened for writing (file descriptors
  matched to paths through the results of openat), and is followed by an
  fsync of its target's directory before the operation returns (which
  makes the whole rename durable, old name included: `fileops.rename`);
- every hard link and every removal of a file that held committed data (a
  committed image or a revision), by unlink or by a move to the trash, is
  followed by an fsync of its directory before the operation returns.

The lifecycle marks the boundaries of the operations in the trace by
opening a path that does not exist.
"""

import asyncio
import os
import re
import shutil
import subprocess
import sys

import pytest

from qubes_reflink import layout

MARK_DIR = "/nonexistent-qubes-reflink-mark"
TRACED = (
    "fsync,fdatasync,rename,renameat,renameat2,link,linkat,unlink,unlinkat,"
    "openat,ioctl"
)
PUBLISHED_KINDS = (layout.COMMITTED, layout.DIRTY, layout.SPARE)
COMMITTED_DATA_KINDS = (layout.COMMITTED, layout.REVISION)
MIB = 1024**2


# -- the lifecycle, run in the traced child ------------------------------------


def mark(label):
    """Leave `label` in the trace: an openat of a path that can't exist."""
    try:
        os.close(os.open(os.path.join(MARK_DIR, label), os.O_RDONLY))
    except FileNotFoundError:
        pass


async def lifecycle(main_dir, ext4_dir):
    """Every mutating operation at least once; marks around each."""
    # pylint: disable=import-outside-toplevel,too-many-statements
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from helpers import FakeVM, origin, snapshot, volatile, write_image

    from qubes_reflink import ReflinkPool

    pools = []

    async def op(label, coroutine):
        mark(f"{label} begin")
        result = await coroutine
        mark(f"{label} returned")
        for pool in pools:
            await pool.wait_background()
        mark(f"{label} settled")
        return result

    pool = ReflinkPool(
        name="main",
        dir_path=os.path.join(main_dir, "pool"),
        revisions_to_keep=2,
    )
    other = ReflinkPool(
        name="other",
        dir_path=os.path.join(ext4_dir, "pool"),
        setup_check="no",
    )
    pools += [pool, other]
    await op("setup", pool.setup())
    await op("setup other", other.setup())
    tpl, app = FakeVM("tpl", "vm-templates"), FakeVM("app")
    root = origin(pool, tpl, "root")
    private = origin(pool, app, revisions_to_keep=1)
    app_root = snapshot(pool, app, root)
    app_volatile = volatile(pool, app)
    nosnap = origin(pool, FakeVM("nosnap"), revisions_to_keep=-1)
    clone = origin(pool, FakeVM("clone"))
    foreign = origin(other, FakeVM("foreign"))
    volumes = [root, private, app_root, app_volatile, nosnap, clone, foreign]
    for number, volume in enumerate(volumes):
        await op(f"create {number}", volume.create())
    for round_number in range(3):  # commits with revisions, then pruning
        for number, volume in enumerate(volumes):
            await op(f"start {number}", volume.start())
            write_image(volume.path, bytes([65 + round_number]) * 4096)
        for number, volume in enumerate(volumes):
            await op(f"stop {number}", volume.stop())
    # the template stopped: the AppVM's root takes its spare
    await op("start snapshot", app_root.start())
    await op("stop snapshot", app_root.stop())
    await op("revert", root.revert())
    await op("revert older", root.revert(next(iter(root.revisions))))
    path = await op("import_data", private.import_data(MIB))
    write_image(path, b"imported" * 512)
    await op("import_data_end", private.import_data_end(True))
    path = await op("import_data again", private.import_data(MIB))
    await op("import_data_end false", private.import_data_end(False))
    await op("import_volume reflink", clone.import_volume(private))
    await op("import_volume fallback", clone.import_volume(foreign))
    await op("resize stopped", private.resize(2 * MIB))
    await op("start", private.start())
    await op("resize running", private.resize(3 * MIB))
    await op("stop", private.stop())
    path = await op("export", private.export())
    await op("export_end", private.export_end(path))
    for number, volume in enumerate(volumes):
        await op(f"remove {number}", volume.remove())


# -- reading the trace ---------------------------------------------------------

_PID = re.compile(r"^(\d+) +(.*)$")
_RESUMED = re.compile(r"^<\.\.\. \w+ resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\) += (-?\d+)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_trace(lines):
    """(syscall, args, strings, result) of each finished call, in order;
    calls split by other threads (unfinished/resumed) are joined."""
    pending = {}
    calls = []
    for line in lines:
        match = _PID.match(line.rstrip("\n"))
        if not match:
            continue
        pid, rest = match.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = _RESUMED.match(rest)
        if resumed:
            rest = pending.pop(pid, "") + resumed.group(1).lstrip()
        call = _CALL.match(rest)
        if call:
            name, args, result = call.groups()
            calls.append(
                (name, args, _STRING.findall(args), int(result, base=0))
            )
    return calls


def _kind(path):
    entry = layout.classify(os.path.basename(path))
    return entry.kind if entry else None


class DurabilityChecker:
    """Replays a trace; collects violations of the durability order."""

    def __init__(self):
        self.fds = {}
        self.synced = set()  # paths whose data was fsynced since written
        self.needs = []  # (directory, why): a directory fsync owed
        self.violations = []
        self.checked = {
            "publish": 0,
            "link": 0,
            "removal": 0,
            "marks": 0,
            "snapshot": 0,
        }

    def run(self, calls):
        """Check every call; returns the violations."""
        for name, args, strings, result in calls:
            handler = getattr(self, "on_" + name, None)
            if handler is not None and result >= 0:
                handler(args, strings, result)
            elif name == "openat" and strings and _is_mark(strings[0]):
                self.on_mark(strings[0])
        return self.violations

    def _owe(self, path, why):
        self.needs.append((os.path.dirname(path), why))

    def on_openat(self, args, strings, result):
        """Remember the fd's path; opening for writing makes data unsynced."""
        path = strings[0]
        self.fds[result] = path
        if "O_WRONLY" in args or "O_RDWR" in args or "O_CREAT" in args:
            self.synced.discard(path)

    def on_fsync(self, args, _strings, _result):
        """Data of the fd's file, or entries of its directory, are durable."""
        path = self.fds.get(int(args.split(",")[0]))
        if path is None:
            return
        self.synced.add(path)
        self.needs = [need for need in self.needs if need[0] != path]

    on_fdatasync = on_fsync

    def on_ioctl(self, args, _strings, _result):
        """A clone into an fd changes that file's data; a btrfs snapshot
        is made in a transaction commit, which makes every change to the
        filesystem durable."""
        if "FICLONE" in args or "BTRFS_IOC_CLONE" in args:
            self.synced.discard(self.fds.get(int(args.split(",")[0])))
        if "BTRFS_IOC_SNAP_CREATE" in args:
            self.checked["snapshot"] += 1
            self.needs = []

    def on_rename(self, _args, strings, _result):
        """A publishing rename needs synced data and synced directories."""
        src, dst = strings[0], strings[1]
        if _kind(dst) in PUBLISHED_KINDS:
            self.checked["publish"] += 1
            if src not in self.synced:
                self.violations.append(
                    f"rename {src} -> {dst} without an fsync of {src}"
                )
            self._owe(dst, f"rename {src} -> {dst}")
        if _kind(src) in COMMITTED_DATA_KINDS:  # a revision to the trash
            self.checked["removal"] += 1
            self._owe(src, f"rename {src} -> {dst} (taken away)")
        if src in self.synced:
            self.synced.add(dst)
        else:
            self.synced.discard(dst)
        self.synced.discard(src)

    on_renameat = on_renameat2 = on_rename

    def on_link(self, _args, strings, _result):
        """A new name of committed data must be durable."""
        src, dst = strings[0], strings[1]
        if _kind(dst) in COMMITTED_DATA_KINDS + (layout.BASE,):
            self.checked["link"] += 1
            self._owe(dst, f"link {src} -> {dst}")
        if src in self.synced:
            self.synced.add(dst)

    on_linkat = on_link

    def on_unlink(self, _args, strings, _result):
        """Removing committed data must be durable."""
        path = strings[0]
        if _kind(path) in COMMITTED_DATA_KINDS:
            self.checked["removal"] += 1
            self._owe(path, f"unlink {path}")
        self.synced.discard(path)

    on_unlinkat = on_unlink

    def on_mark(self, path):
        """An operation returned (or its background work ended)."""
        label = path[len(MARK_DIR) + 1 :]
        if label.endswith(" begin"):
            return
        self.checked["marks"] += 1
        for directory, why in self.needs:
            self.violations.append(
                f"{label}: no fsync of {directory} after {why}"
            )
        self.needs = []


def _is_mark(path):
    return path.startswith(MARK_DIR + "/")


# -- tests -----------------------------------------------------------------


def _trace_lines(tmp_path, btrfs_dir, ext4_dir):
    trace = tmp_path / "trace"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-s",
            "4096",
            "-e",
            f"trace={TRACED}",
            "-o",
            str(trace),
            sys.executable,
            os.path.abspath(__file__),
            btrfs_dir,
            ext4_dir,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-3000:]
    return trace.read_text(encoding="utf-8", errors="replace").splitlines()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_publishing_and_removals_are_durable_in_order(
    tmp_path, btrfs_dir, ext4_dir
):
    """The whole lifecycle keeps the durability order at every step."""
    checker = DurabilityChecker()
    violations = checker.run(
        parse_trace(_trace_lines(tmp_path, btrfs_dir, ext4_dir))
    )
    assert not violations, "\n".join(violations[:30])
    # the check saw the lifecycle, not an empty trace
    assert checker.checked["publish"] >= 30, checker.checked
    assert checker.checked["link"] >= 5, checker.checked
    assert checker.checked["removal"] >= 10, checker.checked
    assert checker.checked["marks"] >= 80, checker.checked
    assert checker.checked["snapshot"] >= 1, checker.checked  # btrfs starts


def _fake_trace(*calls):
    return [f"100 {call}" for call in calls]


GOOD = (
    'openat(AT_FDCWD, "/p/a/v.img~tmp.1", O_RDWR|O_CREAT|O_EXCL, 0600) = 3',
    "fsync(3) = 0",
    'rename("/p/a/v.img~tmp.1", "/p/a/v.img") = 0',
    'openat(AT_FDCWD, "/p/a", O_RDONLY|O_DIRECTORY) = 4',
    "fsync(4) = 0",
    f'openat(AT_FDCWD, "{MARK_DIR}/op returned", O_RDONLY) = -1 ENOENT',
)


def test_checker_accepts_the_right_order():
    """fsync file, rename, fsync directory: no violation."""
    assert not DurabilityChecker().run(parse_trace(_fake_trace(*GOOD)))


@pytest.mark.parametrize(
    "missing, problem",
    [(1, "without an fsync"), (4, "no fsync of /p/a")],
)
def test_checker_finds_a_missing_fsync(missing, problem):
    """Without the file's or the directory's fsync, the checker complains."""
    calls = [call for number, call in enumerate(GOOD) if number != missing]
    violations = DurabilityChecker().run(parse_trace(_fake_trace(*calls)))
    assert any(problem in violation for violation in violations), violations


ACROSS = (
    'openat(AT_FDCWD, "/p/t/r.img~spare.1-2-3", O_RDWR|O_CREAT, 0600) = 3',
    "fsync(3) = 0",
    'rename("/p/t/r.img~spare.1-2-3", "/p/a/r-dirty.img") = 0',
    'openat(AT_FDCWD, "/p/a", O_RDONLY|O_DIRECTORY) = 4',
    "fsync(4) = 0",
    f'openat(AT_FDCWD, "{MARK_DIR}/start returned", O_RDONLY) = -1 ENOENT',
)


def test_checker_owes_the_target_dir_of_a_rename_across_directories():
    """A spare taken from another directory: the fsync of the directory it
    goes to is enough; without that fsync it is a violation."""
    assert not DurabilityChecker().run(parse_trace(_fake_trace(*ACROSS)))
    without = parse_trace(_fake_trace(*ACROSS[:3], ACROSS[5]))
    violations = DurabilityChecker().run(without)
    assert violations and "no fsync of /p/a" in violations[0]


def test_checker_joins_calls_split_by_threads():
    """strace -f splits calls of concurrent threads; they are joined."""
    lines = [
        '100 openat(AT_FDCWD, "/p/a/v.img~tmp.1", O_RDWR|O_CREAT, 0600) = 3',
        "100 fsync(3 <unfinished ...>",
        '101 openat(AT_FDCWD, "/x", O_RDONLY) = 5',
        "100 <... fsync resumed>) = 0",
    ]
    calls = parse_trace(lines)
    assert [call[0] for call in calls] == ["openat", "openat", "fsync"]
    assert calls[2][1] == "3"


def test_checker_sees_unlinked_committed_data():
    """Removing a revision without a directory fsync is a violation."""
    lines = _fake_trace(
        'unlink("/p/a/v.img.3@2024-01-01T00:00:00Z") = 0',
        f'openat(AT_FDCWD, "{MARK_DIR}/stop returned", O_RDONLY) = -1 ENOENT',
    )
    violations = DurabilityChecker().run(parse_trace(lines))
    assert violations and "unlink" in violations[0]


if __name__ == "__main__":
    asyncio.run(lifecycle(sys.argv[1], sys.argv[2]))
