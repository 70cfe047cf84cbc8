"""Power cuts: every state the disk can be left in, for every operation.

Each campaign runs tests/powercut.py for one operation on one filesystem in
a child python (two at a time): the operation runs on a filesystem whose
disk logs every block write and flush (tests/blocklog.py, FUSE under a
loop device); then the disk states of a power cut at each flush, and at
seeded subsets of the writes after it, are rebuilt, mounted and checked
through the driver (see tests/powercut.py for what is checked).

`make test` checks a seeded sample of the flush points of every operation
on btrfs, XFS and ext4; `make powercut` checks every flush point with more
subsets.  Both print a table of the figures and write it, as JSON, to
$QUBES_REFLINK_POWERCUT_SUMMARY (default in the temporary directory).
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile

import pytest

import blocklog
import helpers
import crashharness
import powercut

from qubes_reflink import ReflinkPool

HARNESS = os.path.join(os.path.dirname(__file__), "powercut.py")
SUMMARY = os.environ.get(
    "QUBES_REFLINK_POWERCUT_SUMMARY",
    os.path.join(tempfile.gettempdir(), "qubes-reflink-powercut.json"),
)
# the crash images are built and mounted in RAM where there is some
WORK = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
FILESYSTEMS = ("btrfs", "xfs", "ext4")
# Two-pool scenarios (a source pool on another filesystem) are left to the
# SIGKILL harness: a power cut of one disk leaves the other as it was.
OPS = sorted(
    name
    for name, scenario in crashharness.SCENARIOS.items()
    if scenario.pools == ("main",)
)
SAMPLE = {
    "every_flush": False,
    "states": 3,
    "subsets": 1,
    "seed": 20261207,
    "fs_check": True,
}
# `make test` runs the suite under R4.2's Python and R4.3's: each checks
# the sample of every other (filesystem, operation) pair, so that the two
# runs together cover them all within the budget
PAIRS = [(fstype, op) for fstype in FILESYSTEMS for op in OPS]
SAMPLED = PAIRS[0 if sys.version_info < (3, 12) else 1 :: 2]
FULL = {
    "every_flush": True,
    "states": 0,
    "subsets": 16,
    "seed": 20261207,
    "fs_check": True,
}


def run_campaign(fstype, op, sampling, no_fsync=False):
    """Run one campaign in a child python; its result dict."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "result.json")
        config = os.path.join(scratch, "config.json")
        with open(config, "w", encoding="utf-8") as config_file:
            json.dump(
                {
                    "op": op,
                    "fstype": fstype,
                    "work": WORK,
                    "no_fsync": no_fsync,
                    "out": out,
                    **sampling,
                },
                config_file,
            )
        proc = subprocess.run(
            [sys.executable, HARNESS, config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
        )
        output = proc.stdout.decode(errors="replace")[-3000:]
        if proc.returncode != 0 or not os.path.exists(out):
            return {"failures": [f"harness exited {proc.returncode}: {output}"]}
        with open(out, encoding="utf-8") as result_file:
            return json.load(result_file)


class Campaigns:
    """The campaigns of this session's selected tests, two at a time."""

    def __init__(self, wanted):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.futures = {}
        self.results = {}
        for fstype, op, sampling in wanted:
            self._submit(fstype, op, sampling)

    def _submit(self, fstype, op, sampling):
        key = (fstype, op, tuple(sorted(sampling.items())))
        if key not in self.futures:
            self.futures[key] = self.pool.submit(
                run_campaign, fstype, op, sampling
            )
        return self.futures[key]

    def result(self, fstype, op, sampling):
        """The result of one campaign (waits for it)."""
        result = self._submit(fstype, op, sampling).result()
        self.results[f"{fstype}:{op}"] = result
        return result

    def close(self):
        """Wait for those running; drop the rest."""
        self.pool.shutdown(wait=True, cancel_futures=True)


#: built: distinct states (one set of applied writes, one state);
#: fs_checked: those the filesystem's own checker passed over first
FIGURES = (
    "writes",
    "flushes",
    "built",
    "fs_checked",
    "mounted",
    "checked",
    "lost",
)


def summary_lines(results):
    """The figures as a Markdown table, with the totals."""
    lines = [
        "| filesystem | operation | " + " | ".join(FIGURES) + " |",
        "|---|---|" + "---:|" * len(FIGURES),
    ]
    totals = dict.fromkeys(FIGURES, 0)
    for name in sorted(results):
        fstype, op = name.split(":")
        figures = [results[name].get(f, 0) for f in FIGURES]
        for figure, value in zip(FIGURES, figures):
            totals[figure] += value
        lines.append(
            f"| {fstype} | {op} | " + " | ".join(map(str, figures)) + " |"
        )
    lines.append(
        "| all | all | " + " | ".join(str(totals[f]) for f in FIGURES) + " |"
    )
    return lines


def _print_summary(request, results):
    if not results:
        return
    lines = ["", "power-cut states per operation (lost must be 0):"]
    lines += summary_lines(results) + [f"summary in {SUMMARY}"]
    helpers.report_summary(request, SUMMARY, results, lines)


def _sampling_of(item):
    return FULL if item.get_closest_marker("slow") else SAMPLE


@pytest.fixture(scope="module")
def campaigns(request):
    """Campaigns for every (filesystem, operation) selected, started at
    once; the figures are printed at the end."""
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "op" in params:
            wanted.append((params["fstype"], params["op"], _sampling_of(item)))
    runs = Campaigns(wanted)
    try:
        yield runs
    finally:
        runs.close()
        _print_summary(request, runs.results)


def _assert_survived(result):
    failures = result.get("failures", ["no result"])
    assert not failures, "\n".join(failures[:40]) + (
        f"\n... {len(failures)} failures in all" if len(failures) > 40 else ""
    )
    assert result["lost"] == 0
    assert result["checked"] == result["built"] == result["fs_checked"] > 0
    assert result["flushes"] > 0


@pytest.mark.parametrize("fstype,op", SAMPLED)
def test_power_cut_sample(campaigns, fstype, op):
    """At a seeded sample of the flush points of `op`, and of the writes
    after them, a power cut loses no committed data."""
    _assert_survived(campaigns.result(fstype, op, SAMPLE))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fstype", FILESYSTEMS)
def test_power_cut_every_flush(campaigns, fstype, op):
    """At every flush point of `op`, and at seeded subsets of the writes
    after each, a power cut loses no committed data."""
    _assert_survived(campaigns.result(fstype, op, FULL))


REFUSED_OPS = [
    "stop_snapshot",
    "stop_template_with_ready_snapshots",
    "remove_snapshot",
]


@pytest.mark.parametrize(
    "refused_op,sampling",
    [("stop_template_with_ready_snapshots", SAMPLE)]
    + [pytest.param(op, FULL, marks=pytest.mark.slow) for op in REFUSED_OPS],
    ids=["sample"] + REFUSED_OPS,
)
def test_power_cut_where_btrfs_refuses_to_destroy(refused_op, sampling):
    """The driver (and qubesd's restart after the cut) in a user namespace,
    where btrfs refuses to destroy subvolumes for real: at every flush
    point (make powercut; make test: a sample) of a snapshot volume's
    stop, a template update with ready snapshots and a removal, no
    committed data is lost."""
    result = run_campaign(
        "btrfs", refused_op, {**sampling, "user_namespace": True}
    )
    _assert_survived(result)


@pytest.mark.parametrize("fstype", FILESYSTEMS)
def test_without_fsync_the_campaign_reports_losses(fstype):
    """The method bites: with the driver's fsyncs disabled, an import that
    had returned is found undone after a power cut."""
    result = run_campaign(fstype, "import_data_end_true", FULL, no_fsync=True)
    assert result.get("lost", 0) > 0, result
    assert any(
        "after the operation had returned" in f for f in result["failures"]
    ), result["failures"][:5]
    # and for the right reason: the disk with every write replayed holds
    # the result, so the replay works and what was lost is the flushes
    assert not [f for f in result["failures"] if f.startswith("end:")]


def test_every_operation_of_the_issue_has_a_campaign():
    """Each kind of operation the power-cut issue lists is in OPS."""
    for prefix in (
        "setup",
        "create_",
        "start_origin",
        "start_snapshot",
        "start_dispvm",
        "start_volatile",
        "stop_origin",
        "stop_snapshot",
        "stop_dispvm",
        "stop_volatile",
        "revert_",
        "import_data_end_true",
        "import_data_end_false",
        "import_volume_",
        "export",
        "export_end",
        "resize_",
        "remove_",
    ):
        assert any(op.startswith(prefix) for op in OPS), prefix


# -- the pieces of the harness -----------------------------------------------


def _records(kinds):
    """Synthetic log records from a string: W write, F flush, S/D the
    op-start and op-done markers."""
    labels = {"S": powercut.OP_START, "D": powercut.OP_DONE}
    records = []
    for number, kind in enumerate(kinds):
        if kind in labels:
            records.append(blocklog.Record(blocklog.MARK, label=labels[kind]))
        else:
            records.append(blocklog.Record(kind.encode(), number * 4096, 4096))
    return records


def test_crash_states_at_every_flush_with_durable_prefixes():
    """State k holds exactly the writes before flush k; the states from
    the last flush before the operation returned on must hold its result;
    within an interval, its last write missing, a prefix and subsets add
    only writes after their flush; no two states apply the same writes,
    and the end state (every write) is last."""
    records = _records("SWWFWWWFWDWF")
    config = {"every_flush": True, "states": 0, "subsets": 3, "seed": 1}
    states = powercut.crash_states(records, config)
    plain = {s.name: s for s in states if "+" not in s.name}
    assert [s.writes for s in plain.values()] == [
        [],
        [1, 2],
        [1, 2, 4, 5, 6],
        [1, 2, 4, 5, 6, 8, 10],  # flush@11 is the end state: one state
    ]
    assert [s.must_be_after for s in plain.values()] == [
        False,
        False,
        True,
        True,
    ]
    assert states[-1].name == "end"
    assert len({frozenset(s.writes) for s in states}) == len(states)
    kinds = {
        s.name.split("+")[1].rstrip("0123456789")
        for s in states
        if "+" in s.name
    }
    assert {"last-missing", "subset"} <= kinds
    inner = {s.name: s.writes for s in states if "+" in s.name}
    assert inner["flush@3+last-missing"] == [1, 2, 4, 5]
    for state in states:
        if "+" in state.name:
            base = plain[state.name.split("+")[0]]
            assert state.writes[: len(base.writes)] == base.writes
            extra = state.writes[len(base.writes) :]
            assert extra == sorted(extra)
            assert all(i > max(base.writes, default=0) for i in extra)


def test_crash_states_are_seeded_and_bounded():
    """The same seed gives the same states; the sample is bounded."""
    records = _records("S" + "WWWF" * 20 + "D")
    config = {"every_flush": False, "states": 4, "subsets": 2, "seed": 7}
    first = powercut.crash_states(records, config)
    again = powercut.crash_states(records, config)
    assert [s.writes for s in first] == [s.writes for s in again]
    # the operation's start, 4 flush points, the end
    assert 1 + 4 <= sum("+" not in s.name for s in first) <= 1 + 4 + 1
    # each with its last write missing, a prefix and 2 subsets at most
    assert len(first) <= (1 + 4) * (1 + 4) + 1


def test_blocklog_records_writes_and_flushes_in_order(tmp_path):
    """Writes to a loop device over the FUSE file reach the log with their
    offsets and data, the flush after them, and the markers between."""
    work = str(tmp_path)
    with powercut.logging_device(work, "ext4") as disk:
        loop = subprocess.run(
            ["losetup", "--find", "--show", disk],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        try:
            powercut.control(disk, "start")
            powercut.control(disk, "mark one")
            fd = os.open(loop, os.O_WRONLY)
            try:
                os.pwrite(fd, b"A" * 4096, 1 << 20)
                os.pwrite(fd, b"B" * 4096, 2 << 20)
                os.fsync(fd)
            finally:
                os.close(fd)
            powercut.control(disk, "mark two")
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)
    records = blocklog.read_log(work)
    kinds = b"".join(r.kind for r in records)
    assert kinds.startswith(b"M") and kinds.endswith(b"FM"), kinds
    writes = {r.offset: r for r in records if r.kind == blocklog.WRITE}
    with open(os.path.join(work, "data"), "rb") as data:
        for offset, byte in ((1 << 20, b"A"), (2 << 20, b"B")):
            data.seek(writes[offset].data_pos)
            assert data.read(4096) == byte * 4096
    with open(os.path.join(work, "base"), "rb") as base:
        base.seek(1 << 20)
        assert base.read(4096) != b"A" * 4096


# -- what the campaigns found ------------------------------------------------


def _spares(volume):
    directory = helpers.vm_dir(volume)
    name = os.path.basename(helpers.committed(volume)) + "~spare."
    return [
        os.path.join(directory, n) for n in os.listdir(directory) if name in n
    ]


async def test_spare_left_under_two_names_is_not_taken(btrfs_dir):
    """A power cut during a start that took the template's spare can leave
    it on btrfs under both names, the spare's and the running image's
    (docs/DESIGN.md).  After qubesd's restart, that file is the started
    volume's; the template's next start does not write into it."""
    pool = await helpers.new_pool(btrfs_dir)
    tpl = helpers.origin(pool, helpers.FakeVM("tpl", "vm-templates"), "root")
    await tpl.create()
    await tpl.start()
    helpers.write_image(tpl.path, helpers.data("A"))
    await tpl.stop()
    await pool.wait_background()
    solo = helpers.snapshot(
        pool, helpers.FakeVM("solo"), tpl, save_on_stop=True
    )
    await solo.create()
    (spare,) = _spares(tpl)
    # what the power cut leaves: the rename's new name, and the old one
    os.link(spare, helpers.dirty(solo))
    await pool.close()

    pool = ReflinkPool(name="test-pool", dir_path=pool.dir_path)
    tpl = helpers.origin(pool, helpers.FakeVM("tpl", "vm-templates"), "root")
    solo = helpers.snapshot(
        pool, helpers.FakeVM("solo"), tpl, save_on_stop=True
    )
    for volume in (solo, tpl):
        await volume.stop()
    await pool.wait_background()
    assert helpers.read_image(helpers.committed(solo), 3) == b"<A>"
    await tpl.start()
    assert not os.path.samefile(tpl.path, helpers.committed(solo))
    helpers.write_image(tpl.path, helpers.data("B"))
    await tpl.stop()
    await solo.start()
    assert helpers.read_image(solo.path, 3) == b"<B>"
    await solo.stop()
    await pool.wait_background()
    assert all(os.stat(path).st_nlink == 1 for path in _spares(tpl))
    await pool.close()
