"""Listing and measuring a pool while its files come and go (issue 9).

qubesd renames spares into place and empties the trash in the background,
so a name listed a moment ago may be gone when it is looked at.  The
deterministic tests make that happen at one chosen moment: a wrapper
around the real os.lstat / os.listdir / os.open removes (or renames away)
the file or directory it is about to be given, then calls the real
function, which meets ENOENT (or ENOTDIR) on the real filesystem.  The
loop test runs the tool's du and status against a thread that keeps
making and removing such files.
"""

import errno
import fcntl
import json
import os
import secrets
import shutil
import threading

import pytest

from helpers import MIB, FakeVM, new_pool, origin, write_image
from qubes_reflink import cli, extents, inspect, layout

FICLONE = 0x40049409
FEDORA = "vm-templates/fedora/root"
WORK = "appvms/work/private"


# -- helpers --------------------------------------------------------------


def clone(src, dst):
    """Make `dst` a reflink copy of `src`."""
    with open(src, "rb") as source, open(dst, "xb") as target:
        fcntl.ioctl(target.fileno(), FICLONE, source.fileno())


def write_file(path, data):
    """Create `path` holding `data`, synced (so FIEMAP maps it for good)."""
    with open(path, "xb") as file:
        file.write(data)
        os.fsync(file.fileno())
    os.chmod(path, 0o600)


def remove(path):
    """Remove the file or directory tree `path`."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def replace_by_file(path):
    """Remove `path` and put a regular file in its place (ENOTDIR below)."""
    remove(path)
    write_file(path, b"not a directory")


class Vanish:
    """os.`name` made to remove (or otherwise change) `target` just before
    it is looked at, once; then the real function runs."""

    def __init__(self, monkeypatch, name, target, how=remove):
        self.real = getattr(os, name)
        self.target = os.fspath(target)
        self.how = how
        self.fired = False
        monkeypatch.setattr(os, name, self)

    def __call__(self, path, *args, **kwargs):
        if not self.fired and _same(path, self.target):
            self.fired = True  # first: `how` may call this function too
            self.how(self.target)
        return self.real(path, *args, **kwargs)


def fail_on(monkeypatch, name, target):
    """os.`name` made to raise EACCES for `target`, as a real error."""
    real = getattr(os, name)

    def wrapper(path, *args, **kwargs):
        if _same(path, target):
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, name, wrapper)


def _same(path, target):
    """Whether a path argument (not a file descriptor) names `target`."""
    if isinstance(path, int):
        return False
    return os.fspath(path) == os.fspath(target)


def hand_made_pool(top):
    """A pool as the driver leaves it, made by hand: a template root with
    its spare, an AppVM's private with a revision, a temporary file, an
    image in the trash.  Returns {name: path}."""
    root = os.path.join(top, "pool")
    fedora = os.path.join(root, "vm-templates", "fedora")
    work = os.path.join(root, "appvms", "work")
    for directory in (fedora, work, layout.trash_dir(root)):
        os.makedirs(directory)
    paths = {
        "root": os.path.join(fedora, "root.img"),
        "private": os.path.join(work, "private.img"),
        "revision": os.path.join(work, "private.img.1@2026-01-01T00:00:00Z"),
        "tmp": os.path.join(work, f"private.img~tmp.{secrets.token_hex(8)}"),
        "trash": layout.trash_path(root),
    }
    write_file(paths["root"], secrets.token_bytes(MIB))
    key = layout.spare_key(os.stat(paths["root"]))
    paths["spare"] = os.path.join(fedora, f"root.img~spare.{key}")
    clone(paths["root"], paths["spare"])
    write_file(paths["revision"], secrets.token_bytes(MIB))
    clone(paths["revision"], paths["private"])
    write_image(paths["private"], secrets.token_bytes(256 * 1024))
    with open(paths["private"], "rb+") as private:
        os.fsync(private.fileno())
    write_file(paths["tmp"], secrets.token_bytes(128 * 1024))  # all its own
    clone(paths["root"], paths["trash"])
    paths["pool"] = root
    return paths


@pytest.fixture
def hand_pool(reflink_dir):
    """`hand_made_pool` on btrfs, then on XFS."""
    return hand_made_pool(reflink_dir)


def scanned(root):
    """(path, kind, state) of every file a scan finds, and the trash."""
    scan = inspect.scan_pool(root, attached=set())
    found = [
        (info.path, info.kind, info.state)
        for files in scan.volumes.values()
        for info in files
    ]
    return found, scan.trash


def run_json(capsys, *argv):
    """(exit code, parsed --json output) of qubes-reflink, in-process."""
    code = cli.main(["--json", *map(str, argv)])
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else out


def check_du(report):
    """The figures of a du report agree with each other: every file is in
    its volume's total and the pool's, or in neither (no cross-volume or
    in-volume hard links in the pools of these tests)."""
    for volume in report["volumes"]:
        rows, total = volume["files"], volume["total"]
        for usage in rows + [total]:
            assert usage["allocated"] == usage["shared"] + usage["exclusive"]
            assert usage["exclusive"] >= 0
        assert total["apparent"] == sum(row["apparent"] for row in rows)
        allocated = [row["allocated"] for row in rows]
        assert max(allocated, default=0) <= total["allocated"]
        assert total["allocated"] <= sum(allocated)
    totals = [volume["total"] for volume in report["volumes"]]
    pool = report["total"]
    assert pool["apparent"] == sum(total["apparent"] for total in totals)
    assert pool["allocated"] == pool["shared"] + pool["exclusive"]
    assert max((t["allocated"] for t in totals), default=0) <= pool["allocated"]
    assert pool["allocated"] <= sum(total["allocated"] for total in totals)


# -- layout ---------------------------------------------------------------


@pytest.mark.parametrize("how", [remove, replace_by_file])
def test_listdir_of_a_vanishing_directory(btrfs_dir, monkeypatch, how):
    directory = os.path.join(btrfs_dir, "dir")
    os.mkdir(directory)
    write_file(os.path.join(directory, "root.img~tmp.0123"), b"x")
    vanish = Vanish(monkeypatch, "listdir", directory, how)
    assert layout.listdir(directory) == []
    assert vanish.fired


def test_listdir_other_errors_propagate(btrfs_dir, monkeypatch):
    fail_on(monkeypatch, "listdir", btrfs_dir)
    with pytest.raises(PermissionError):
        layout.listdir(btrfs_dir)
    with pytest.raises(PermissionError):
        layout.probe_leftovers(btrfs_dir)


@pytest.mark.parametrize("how", [remove, replace_by_file])
def test_volume_dirs_skip_a_vanishing_vm_dir(hand_pool, monkeypatch, how):
    root = hand_pool["pool"]
    os.mkdir(os.path.join(root, "appvms", "gone"))
    gone = os.path.join(root, "appvms", "gone")
    vanish = Vanish(monkeypatch, "lstat", gone, how)
    assert [vm for _prefix, vm, _path in layout.volume_dirs(root)] == [
        "work",
        "fedora",
    ]
    assert vanish.fired


def test_volume_dirs_of_a_vanishing_prefix_dir(hand_pool, monkeypatch):
    root = hand_pool["pool"]
    vanish = Vanish(monkeypatch, "listdir", os.path.join(root, "appvms"))
    assert [vm for _prefix, vm, _path in layout.volume_dirs(root)] == ["fedora"]
    assert vanish.fired


def test_volume_dirs_other_errors_propagate(hand_pool, monkeypatch):
    root = hand_pool["pool"]
    fail_on(monkeypatch, "lstat", os.path.join(root, "appvms", "work"))
    with pytest.raises(PermissionError):
        list(layout.volume_dirs(root))


@pytest.mark.parametrize("when", ["lstat", "listdir"])
def test_trash_entries_while_the_sweep_removes_the_trash(
    hand_pool, monkeypatch, when
):
    root = hand_pool["pool"]
    assert layout.trash_entries(root) == [hand_pool["trash"]]
    vanish = Vanish(monkeypatch, when, layout.trash_dir(root))
    assert layout.trash_entries(root) == []
    assert vanish.fired


@pytest.mark.parametrize("when", ["lstat", "listdir"])
def test_trash_entries_other_errors_propagate(hand_pool, monkeypatch, when):
    fail_on(monkeypatch, when, layout.trash_dir(hand_pool["pool"]))
    with pytest.raises(PermissionError):
        layout.trash_entries(hand_pool["pool"])


@pytest.mark.parametrize("how", [remove, replace_by_file])
def test_volume_scan_of_a_vanishing_directory(hand_pool, monkeypatch, how):
    files = layout.VolumeFiles(hand_pool["pool"], WORK)
    assert files.scan().committed
    vanish = Vanish(monkeypatch, "listdir", files.directory, how)
    listing = files.scan()
    assert vanish.fired
    assert listing == layout.Listing(
        False, False, {}, [], {}, {}, {}, [], {}, {}, False, [], [], []
    )


# -- inspect: scan_pool ---------------------------------------------------


def spare_name(path):
    """The name a temporary file gets when it becomes a spare."""
    return path.split("~tmp.")[0] + "~spare.1-2-3"


def rename_to_spare(path):
    """What the making of a spare does to its temporary file: the name
    moves on while a scan is under way."""
    os.rename(path, spare_name(path))


@pytest.mark.parametrize(
    "name, how",
    [
        ("tmp", remove),
        ("tmp", rename_to_spare),
        ("revision", remove),
        ("spare", remove),
    ],
)
def test_scan_skips_a_file_gone_before_its_lstat(
    hand_pool, monkeypatch, name, how
):
    root, path = hand_pool["pool"], hand_pool[name]
    vanish = Vanish(monkeypatch, "lstat", path, how)
    found, trash = scanned(root)
    assert vanish.fired
    monkeypatch.undo()
    # as a scan of the pool as it is now, but for a name made since
    now, trash_now = scanned(root)
    new = spare_name(path) if how is rename_to_spare else None
    assert found == [entry for entry in now if entry[0] != new]
    assert path not in [entry[0] for entry in found] and len(found) == 4
    assert trash == trash_now == [hand_pool["trash"]]


def test_scan_when_a_vm_dir_becomes_a_file(hand_pool, monkeypatch):
    """Names listed, then their directory replaced: ENOTDIR, all skipped."""
    work = os.path.dirname(hand_pool["private"])
    vanish = Vanish(
        monkeypatch,
        "lstat",
        hand_pool["private"],
        lambda _: replace_by_file(work),
    )
    found, _trash = scanned(hand_pool["pool"])
    assert vanish.fired
    assert {kind for _path, kind, _state in found} == {"committed", "spare"}
    assert all(
        path.startswith(os.path.dirname(hand_pool["root"]))
        for path, _kind, _state in found
    )


def test_scan_of_a_vm_dir_gone_before_its_listing(hand_pool, monkeypatch):
    work = os.path.dirname(hand_pool["private"])
    vanish = Vanish(monkeypatch, "listdir", work)
    scan = inspect.scan_pool(hand_pool["pool"], attached=set())
    assert vanish.fired
    assert list(scan.volumes) == [FEDORA]


def test_scan_other_errors_propagate(hand_pool, monkeypatch):
    fail_on(monkeypatch, "lstat", hand_pool["tmp"])
    with pytest.raises(PermissionError):
        inspect.scan_pool(hand_pool["pool"], attached=set())


# -- extents --------------------------------------------------------------


def three_files(directory):
    """a, its clone b, and c with data of its own."""
    a, b, c = (os.path.join(directory, name) for name in "abc")
    write_file(a, secrets.token_bytes(MIB))
    clone(a, b)
    write_file(c, secrets.token_bytes(MIB))
    return a, b, c


def renamed_away(path):
    os.rename(path, path + ".moved")


@pytest.mark.parametrize("how", [remove, renamed_away])
def test_usage_skips_a_file_gone_before_its_open(reflink_dir, monkeypatch, how):
    a, b, c = three_files(reflink_dir)
    vanish = Vanish(monkeypatch, "open", c, how)
    per_file = extents.space_usage([a, c, b])
    assert vanish.fired
    total = extents.total_usage([a, c, b])
    monkeypatch.undo()
    # as if it had never been listed: c's own data is nobody else's
    assert per_file == extents.space_usage([a, b])
    assert total == extents.total_usage([a, b])
    assert total.allocated == total.shared == MIB


def test_usage_of_a_file_whose_directory_became_a_file(
    reflink_dir, monkeypatch
):
    sub = os.path.join(reflink_dir, "sub")
    os.mkdir(sub)
    a, b, c = three_files(sub)
    outside = os.path.join(reflink_dir, "outside")
    write_file(outside, secrets.token_bytes(MIB))
    vanish = Vanish(monkeypatch, "open", a, lambda _: replace_by_file(sub))
    maps = extents.ExtentMaps([outside, a, b, c])
    assert vanish.fired
    per_file, total = maps.measure()
    assert list(per_file) == [outside]
    assert total == per_file[outside] == extents.Usage(MIB, MIB, 0, MIB)


def test_subsets_are_measured_from_one_reading(reflink_dir):
    """A file removed after its map was read counts, in every figure."""
    a, b, c = three_files(reflink_dir)
    maps = extents.ExtentMaps([a, b])
    maps.add([c, os.path.join(reflink_dir, "missing")])
    before = maps.measure()
    for path in (a, b, c):
        os.remove(path)
    assert maps.measure() == before
    assert list(before[0]) == [a, b, c]
    assert before[1].apparent == 3 * MIB
    assert maps.measure([b, c, "missing"])[0] == {
        b: extents.Usage(MIB, MIB, MIB, 0),
        c: extents.Usage(MIB, MIB, 0, MIB),
    }


def test_usage_other_errors_propagate(reflink_dir, monkeypatch):
    a, b, c = three_files(reflink_dir)
    fail_on(monkeypatch, "open", b)
    with pytest.raises(PermissionError):
        extents.space_usage([a, b, c])
    with pytest.raises(PermissionError):
        extents.total_usage([a, b, c])


# -- the tool: du and status ----------------------------------------------


@pytest.mark.parametrize("name", ["tmp", "spare", "revision"])
def test_du_leaves_out_a_file_gone_before_its_open(
    hand_pool, monkeypatch, capsys, name
):
    root, path = hand_pool["pool"], hand_pool[name]
    vanish = Vanish(monkeypatch, "open", path)
    code, report = run_json(capsys, "du", root)
    assert vanish.fired and code == 0
    monkeypatch.undo()
    check_du(report)
    rows = [row["path"] for v in report["volumes"] for row in v["files"]]
    assert path not in rows and len(rows) == 4
    if name == "tmp":  # nothing shares its data: du now gives the same
        assert run_json(capsys, "du", root) == (0, report)


def test_status_leaves_out_a_file_gone_before_its_lstat(
    hand_pool, monkeypatch, capsys
):
    root = hand_pool["pool"]
    vanish = Vanish(monkeypatch, "lstat", hand_pool["tmp"])
    code, report = run_json(capsys, "status", root)
    assert vanish.fired and code == 0
    monkeypatch.undo()
    assert run_json(capsys, "status", root) == (0, report)


def test_du_and_status_report_other_errors(hand_pool, monkeypatch, capsys):
    root = hand_pool["pool"]
    fail_on(monkeypatch, "open", hand_pool["spare"])
    scan = inspect.scan_pool(root, attached=set())
    with pytest.raises(PermissionError):
        inspect.disk_usage(scan)
    assert cli.main(["du", root]) == cli.EXIT_ERROR
    assert "Permission denied" in capsys.readouterr().err
    fail_on(monkeypatch, "lstat", hand_pool["spare"])
    assert cli.main(["status", root]) == cli.EXIT_ERROR


# -- the loop -------------------------------------------------------------


class Churn(threading.Thread):
    """Keeps making and removing what qubesd's background work makes:
    spares (cloned under a temporary name, renamed), temporary files,
    images in the trash and the trash itself, a whole VM directory."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.cycled = threading.Event()  # at least one cycle done
        self.cycles = 0
        self.error = None

    def run(self):
        try:
            while not self.stop.is_set():
                self._cycle()
                self.cycles += 1
                self.cycled.set()
        except BaseException as err:  # reported by the test
            self.error = err
            self.cycled.set()

    def _cycle(self):
        fedora = os.path.join(self.root, FEDORA + ".img")
        private = os.path.join(self.root, WORK + ".img")
        token = secrets.token_hex(8)
        tmp = f"{fedora}~tmp.{token}"
        clone(fedora, tmp)
        spare = f"{fedora}~spare.{token}-1-{16 * MIB}"
        os.rename(tmp, spare)
        own = f"{private}~tmp.{token}"
        write_file(own, secrets.token_bytes(64 * 1024))
        trash = layout.trash_dir(self.root)
        os.makedirs(trash, exist_ok=True)
        discarded = layout.trash_path(self.root)
        clone(private, discarded)
        churn = os.path.join(self.root, "appvms", "churn")
        os.mkdir(churn)
        clone(private, os.path.join(churn, "private.img"))
        for path in (spare, own, discarded):
            os.remove(path)
        os.rmdir(trash)
        shutil.rmtree(churn)


async def made_by_the_driver(top):
    """A pool with a template (with its spare) and an AppVM with two
    revisions, made by the driver; background work awaited."""
    pool = await new_pool(top, revisions_to_keep=2)
    template = origin(pool, FakeVM("fedora", "vm-templates"), "root", 16 * MIB)
    private = origin(pool, FakeVM("work"), size=8 * MIB)
    for volume in (template, private):
        await volume.create()
    await template.start()
    write_image(template.path, secrets.token_bytes(MIB))
    await template.stop()
    for number in range(3):
        await private.start()
        write_image(private.path, secrets.token_bytes(MIB), number * MIB)
        await private.stop()
    await pool.wait_background()
    return pool.root


def check_status(report):
    volumes = {volume["vid"]: volume for volume in report["volumes"]}
    assert volumes[FEDORA]["committed"]["size"] == 16 * MIB
    assert volumes[WORK]["committed"]["size"] == 8 * MIB
    assert len(volumes[WORK]["revisions"]) == 2
    assert all(path.endswith(".discarded") for path in report["trash"])


async def test_du_and_status_while_files_come_and_go(btrfs_dir, capsys):
    root = await made_by_the_driver(btrfs_dir)
    churn = Churn(root)
    churn.start()
    try:
        churn.cycled.wait(60)
        for turn in range(40):
            code, report = run_json(capsys, "du", root)
            assert code == 0, report
            check_du(report)
            vids = [volume["vid"] for volume in report["volumes"]]
            assert FEDORA in vids and WORK in vids
            code, report = run_json(capsys, "status", root)
            assert code == 0, report
            check_status(report)
            if turn % 10 == 0:  # the text output too
                assert cli.main(["du", root]) == 0
                assert cli.main(["status", root]) == 0
                assert "total (" in capsys.readouterr().out
    finally:
        churn.stop.set()
        churn.join()
    assert churn.error is None, churn.error
    assert churn.cycles > 0
