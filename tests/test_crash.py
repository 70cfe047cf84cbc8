"""Crash at every point: SIGKILL every operation at every mutating step.

Each test runs tests/crashharness.py for one operation in a child python
(two at a time): it counts the operation's steps, then, for every step and
for both "before" and "after" it, builds the scenario afresh, kills the
operation there, simulates a qubesd restart (fresh objects, stop() on every
volume, then a start/stop cycle) and checks that committed data is what it
was or what the operation was meant to produce, that no revision was lost,
that nothing temporary is left and that the objects agree with the files.

The default run uses btrfs; XFS and ext4 (setup_check=no, copies instead of
reflinks) are marked slow.  The number of crash points per operation is
printed at the end and written to $QUBES_REFLINK_CRASH_SUMMARY (default
/tmp/qubes-reflink-crash-summary.json).
"""

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import pytest

import crashharness
from helpers import report_summary
from loopfs import on_demand

HARNESS = os.path.join(os.path.dirname(__file__), "crashharness.py")
SUMMARY = os.environ.get(
    "QUBES_REFLINK_CRASH_SUMMARY",
    os.path.join(tempfile.gettempdir(), "qubes-reflink-crash-summary.json"),
)
OPS = sorted(crashharness.SCENARIOS)
FILESYSTEMS = [
    "btrfs",
    pytest.param("xfs", marks=pytest.mark.slow),
    pytest.param("ext4", marks=pytest.mark.slow),
]


def _source_fs(fstype):
    """Filesystem of the other pool for imports across filesystems."""
    return "btrfs" if fstype == "ext4" else "ext4"


class CrashRuns:
    """Harness runs, two at a time, for the tests selected in this session."""

    def __init__(self, mounts, wanted):
        self.mounts = mounts
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.futures = {}
        self.results = {}
        for fstype, op in wanted:
            self.submit(fstype, op)

    def submit(self, fstype, op):
        """Start the harness for `op` with its main pool on `fstype`."""
        if (fstype, op) in self.futures:
            return
        scenario = crashharness.SCENARIOS[op]
        fs_of = {"main": fstype, "src": _source_fs(fstype)}
        dirs = {
            key: tempfile.mkdtemp(prefix="crash-", dir=self.mounts(fs_of[key]))
            for key in scenario.pools
        }
        checks = {key: fs_of[key] != "ext4" for key in scenario.pools}
        self.futures[fstype, op] = self.pool.submit(
            _run_harness, op, dirs, checks
        )

    def result(self, fstype, op):
        """The harness result of `op` on `fstype` (waits for it)."""
        self.submit(fstype, op)
        result = self.futures[fstype, op].result()
        self.results[f"{fstype}:{op}"] = {
            "crash_points": result.get("points", 0),
            "steps": result.get("steps", 0),
            "failures": len(result.get("failures", ["harness failed"])),
        }
        return result

    def close(self):
        """Stop running the rest; wait for those running."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _run_harness(op, dirs, checks, env=None, prefix=()):
    with tempfile.TemporaryDirectory() as work:
        config = os.path.join(work, "config.json")
        out = os.path.join(work, "result.json")
        with open(config, "w", encoding="utf-8") as config_file:
            json.dump(
                {"op": op, "dirs": dirs, "checks": checks, "out": out},
                config_file,
            )
        proc = subprocess.run(
            [*prefix, sys.executable, HARNESS, config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
            env=env,
        )
        if not os.path.exists(out):
            return {
                "op": op,
                "failures": [
                    f"harness exited {proc.returncode}: "
                    + proc.stdout.decode(errors="replace")[-3000:]
                ],
            }
        with open(out, encoding="utf-8") as result_file:
            result = json.load(result_file)
        if proc.returncode != 0:
            result["failures"].append(f"harness exited {proc.returncode}")
        result["output"] = proc.stdout.decode(errors="replace")[-3000:]
        return result


def _print_summary(request, results):
    if not results:
        return
    lines = ["", "crash points tried per operation (survived = 0 failures):"]
    total = 0
    for name in sorted(results):
        entry = results[name]
        total += entry["crash_points"]
        lines.append(
            f"  {name:40} {entry['crash_points']:4} crash points "
            f"({entry['steps']} steps), {entry['failures']} failures"
        )
    lines.append(f"  total: {total} crash points; summary in {SUMMARY}")
    report_summary(request, SUMMARY, results, lines)


@pytest.fixture(scope="module")
def crash_mounts():
    """Like the `mounts` fixture, but with the filesystem images in RAM
    (/dev/shm) when it exists: the filesystems are as real, and the
    hundreds of fsyncs of a crash run cost little."""
    with contextlib.ExitStack() as stack:
        yield on_demand(
            stack, "/dev/shm" if os.path.isdir("/dev/shm") else None
        )


@pytest.fixture(scope="module")
def crash_runs(crash_mounts, request):
    """Harness runs for every (filesystem, operation) selected."""
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "op" in params:
            wanted.append((params["fstype"], params["op"]))
    runs = CrashRuns(crash_mounts, wanted)
    try:
        yield runs
    finally:
        runs.close()
        _print_summary(request, runs.results)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fstype", FILESYSTEMS)
def test_crash_at_every_step(crash_runs, fstype, op):
    """Killed at any step, `op` leaves the data before or after, intact."""
    result = crash_runs.result(fstype, op)
    failures = result.get("failures", ["no result"])
    assert not failures, "\n".join(failures[:40]) + (
        f"\n... {len(failures)} failures in all" if len(failures) > 40 else ""
    )
    assert result["points"] >= result["steps"] > 0


@pytest.mark.parametrize("op", [name for name in OPS if "defrag" in name])
@pytest.mark.parametrize("fstype", ["xfs"])
def test_defrag_crash_at_every_step_on_xfs(crash_runs, fstype, op):
    """XFS frees what nothing refers to block by block, where btrfs keeps
    a whole extent: the defragmentation's other half, at every step."""
    test_crash_at_every_step(crash_runs, fstype, op)


def test_every_host_operation_has_scenarios():
    """Each mutating host call of the issue is covered by a scenario."""
    prefixes = (
        "setup",
        "create_",
        "start_",
        "stop_",
        "revert_",
        "resize_running",
        "resize_stopped",
        "import_data_end_true",
        "import_data_end_false",
        "import_volume_reflink",
        "import_volume_fallback",
        "export",
        "export_end",
        "remove_",
    )
    for prefix in prefixes:
        assert any(op.startswith(prefix) for op in OPS), prefix
    kinds = ("origin", "snapshot", "origin_snapshot", "volatile")
    for verb in ("create", "start", "stop"):
        for kind in kinds:
            assert any(op.startswith(f"{verb}_{kind}") for op in OPS), (
                verb,
                kind,
            )


def test_harness_notices_a_non_atomic_replace(crash_mounts):
    """With the driver broken on purpose (target removed before the rename),
    the same harness finds crash points that lose committed data."""
    dirs = {"main": tempfile.mkdtemp(dir=crash_mounts("btrfs"))}
    env = dict(os.environ, CRASH_SABOTAGE="unlink_before_rename")
    result = _run_harness("resize_stopped", dirs, {"main": True}, env)
    lost = [f for f in result["failures"] if "committed None" in f]
    assert lost, result["failures"]


#: A user namespace whose root has no CAP_SYS_ADMIN over the filesystem:
#: btrfs makes and snapshots subvolumes there, and refuses to destroy them.
NO_DESTROY = ("unshare", "--user", "--map-root-user")


@pytest.mark.parametrize(
    "refused_op",
    ["stop_snapshot", "stop_template_with_ready_snapshots", "remove_snapshot"],
)
def test_crash_where_btrfs_refuses_to_destroy(crash_mounts, refused_op):
    """The harness, its driver and every crash point in such a namespace:
    the kernel refuses the destroy ioctl for real, and the driver's stops,
    template update and removal, killed at every step, still recover."""
    dirs = {"main": tempfile.mkdtemp(dir=crash_mounts("btrfs"))}
    result = _run_harness(refused_op, dirs, {"main": True}, prefix=NO_DESTROY)
    assert result.get("points", 0) > 0, result
    assert not result["failures"], "\n".join(result["failures"][:20])


def _state(committed, revisions, size=1, pins=()):
    return {
        "v": {
            "committed": committed,
            "size": size,
            "revisions": revisions,
            "pins": sorted(pins),
        }
    }


def test_compare_accepts_before_and_after_only():
    """The comparison itself: neither-nor data and lost revisions fail."""
    compare = crashharness.compare
    before = _state("a", {"1": "x", "2": "y"})
    after = _state("b", {"2": "y", "3": "a"})
    assert not compare(before, before, after)
    assert not compare(after, before, after)
    assert not compare(_state("a", {"2": "y", "3": "a"}), before, after)
    assert compare(_state("c", {"2": "y"}), before, after)
    assert compare(_state(None, {"2": "y"}), before, after)
    assert compare(_state("b", {"3": "a"}), before, after)  # lost 2
    assert compare(_state("b", {"2": "y", "4": "a"}), before, after)
    pinned = _state("b", {"2": "y", "3": "a"}, pins=["2"])
    assert not compare(pinned, before, pinned)
    assert compare(
        _state("b", {"2": "y", "3": "a"}, pins=["3"]), before, pinned
    )
    built = _state("a", {"0": "w", "1": "x", "2": "y"})
    assert not compare(
        _state("b", {"0": "w", "2": "y", "3": "a"}), before, after, built
    )
