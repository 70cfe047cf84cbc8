"""qubes-reflink check, status, du and fsck on real loop-mounted filesystems.

Pools are made by the driver itself (create, start, stop), then given the
leftovers a crash or an old driver would leave; the tool's answers are
checked against the files on disk and, for du, against btrfs-progs.
"""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import fstype_of
from helpers import MIB, FakeVM, new_pool, origin, snapshot, write_image, tree
from helpers import run_tool, run_tool_json
from qubes_reflink import cli, layout, output

TMP = "private.img~tmp.3f9c2a7be1d04c55"
EXPORT = "private.img~export.9d1e6b0c4a2f7e31"
OLD_SPARE = "private.img~spare.1234-1700000000000000000-33554432"


run = run_tool
run_json = run_tool_json


async def make_pool(top):
    """A pool with a template, a stopped AppVM with two revisions and a
    running AppVM (dirty images, a base link), as the driver leaves it."""
    pool = await new_pool(top, revisions_to_keep=2)
    template = origin(pool, FakeVM("fedora", "vm-templates"), "root", 16 * MIB)
    work, mail = FakeVM("work"), FakeVM("mail")
    private = origin(pool, work, size=8 * MIB)
    mail_private = origin(pool, mail, size=8 * MIB)
    mail_root = snapshot(pool, mail, template)
    for volume in (template, private, mail_private, mail_root):
        await volume.create()
    await template.start()
    write_image(template.path, b"T" * MIB)
    await template.stop()
    for number in range(3):
        await private.start()
        write_image(private.path, bytes([65 + number]) * MIB, number * MIB)
        await private.stop()
        await pool.wait_background()
    await mail_private.start()
    await mail_root.start()
    await pool.wait_background()
    return pool.root


def plant_leftovers(root):
    """What crashes and older drivers leave in appvms/work."""
    work = os.path.join(root, "appvms", "work")
    with open(os.path.join(work, TMP), "wb") as tmp:
        tmp.write(b"t" * 8192)
    shutil.copyfile(
        os.path.join(work, "private.img"), os.path.join(work, EXPORT)
    )
    for name in (OLD_SPARE, "private-cow.img", "root-precache.img"):
        with open(os.path.join(work, name), "wb") as leftover:
            leftover.write(b"x" * 4096)
    with open(os.path.join(work, "root.img~base"), "wb"):
        pass  # a base link of a volume that is not running
    with open(os.path.join(work, "firewall.xml"), "w", encoding="ascii") as f:
        f.write("<firewall/>")  # not a pool file: never reported
    os.chmod(os.path.join(work, "private.img"), 0o644)
    return work


def identities(root):
    """{relative path: (inode, content)} of every file below `root`."""
    found = {}
    for rel in tree(root):
        path = os.path.join(root, rel)
        with open(path, "rb") as image:
            found[rel] = (os.lstat(path).st_ino, image.read())
    return found


@pytest.fixture
def fake_qubesd(tmp_path):
    """A real process whose command name is qubesd, for the refusals."""
    program = tmp_path / "qubesd"
    shutil.copy("/bin/sleep", program)
    process = subprocess.Popen([str(program), "300"])
    yield process
    process.kill()
    process.wait()


# -- check ---------------------------------------------------------------


def test_check_answers_per_filesystem(any_dir, capsys):
    code, out = run(capsys, "check", any_dir)
    fstype = fstype_of(any_dir)
    assert f"{any_dir}: {fstype}" in out
    if fstype == "ext4":
        assert code == 1 and f"reflinks in {any_dir}: no" in out.splitlines()
    else:
        assert code == 0 and f"reflinks in {any_dir}: yes" in out.splitlines()
    assert os.listdir(any_dir) == []  # the probes are gone


def test_check_across_filesystems(btrfs_dir, xfs_dir, capsys):
    code, report = run_json(capsys, "check", btrfs_dir, "--from", xfs_dir)
    assert code == 1 and report["reflink"] is False
    assert (report["dir"]["fstype"], report["from"]["fstype"]) == (
        "btrfs",
        "xfs",
    )
    other = os.path.join(btrfs_dir, "sub")
    os.mkdir(other)
    assert run(capsys, "-q", "check", btrfs_dir, "--from", other) == (0, "")


def test_check_error(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: " in captured.err and "not a directory" in captured.err


# -- status --------------------------------------------------------------


async def test_status_lists_volumes_and_leftovers(reflink_dir, capsys):
    root = await make_pool(reflink_dir)
    plant_leftovers(root)
    code, report = run_json(capsys, "status", root)
    assert code == 0
    volumes = {volume["vid"]: volume for volume in report["volumes"]}
    assert set(volumes) == {
        "appvms/mail/private",
        "appvms/mail/root",
        "appvms/work/private",
        "appvms/work/root",
        "vm-templates/fedora/root",
    }
    work = volumes["appvms/work/private"]
    assert not work["running"] and work["committed"]["size"] == 8 * MIB
    assert [rev["id"] for rev in work["revisions"]] == ["2", "3"]
    for rev in work["revisions"]:
        assert os.path.basename(rev["path"]).endswith(f"@{rev['timestamp']}Z")
    states = {os.path.basename(o["path"]): o["state"] for o in work["other"]}
    assert states[TMP] == states[EXPORT] == "stale if qubesd is stopped"
    assert states[OLD_SPARE] == "stale"
    assert states["private-cow.img"] == "stale"
    live_spares = [
        n for n, s in states.items() if "~spare." in n and s == "live"
    ]
    assert len(live_spares) == 1
    mail_root = volumes["appvms/mail/root"]
    assert mail_root["running"] and mail_root["committed"] is None
    # its base marker, and on btrfs the ready snapshot of its next start
    others = {o["kind"]: o["state"] for o in mail_root["other"]}
    assert others.pop("base") == "live"
    assert others in ({}, {"ready": "live"})
    other = volumes["appvms/work/root"]["other"]
    assert {(o["kind"], o["state"]) for o in other} == {
        ("base", "stale"),
        ("core-leftover", "stale if qubesd is stopped"),
    }
    assert report["unknown"] == [os.path.join(root, "appvms/work/firewall.xml")]


async def test_status_human_output(btrfs_dir, capsys):
    root = await make_pool(btrfs_dir)
    code, out = run(capsys, "status", root)
    assert code == 0
    assert "appvms/work/private: stopped" in out
    assert "appvms/mail/private: running image present" in out
    assert "committed    8.0 MiB" in out
    code, raw = run(capsys, "--raw", "status", root)
    assert f"committed    {8 * MIB}, " in raw


# -- du ------------------------------------------------------------------


def btrfs_du(*paths):
    """{path: (Total, Exclusive, Set shared)} from `btrfs filesystem du`."""
    result = subprocess.run(
        ["btrfs", "filesystem", "du", "--raw", *paths],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        total, exclusive, shared, path = line.split(None, 3)
        rows[path] = (int(total), int(exclusive), shared)
    return rows


async def test_du_agrees_with_btrfs_filesystem_du(btrfs_dir, capsys):
    root = await make_pool(btrfs_dir)
    plant_leftovers(root)
    code, report = run_json(capsys, "du", root)
    assert code == 0
    rows = [row for volume in report["volumes"] for row in volume["files"]]
    theirs = btrfs_du(*(row["path"] for row in rows))
    for row in rows:
        total, exclusive, _ = theirs[row["path"]]
        assert (row["allocated"], row["exclusive"]) == (total, exclusive), row
        assert row["apparent"] == os.stat(row["path"]).st_size
    # the figures of the volumes beside the pool's own files (not in a
    # subvolume, which a hard link can't leave) against btrfs-progs' on a
    # directory of just them
    pool_dev = os.stat(root).st_dev
    vids = [
        volume["vid"]
        for volume in report["volumes"]
        if all(os.stat(f["path"]).st_dev == pool_dev for f in volume["files"])
    ]
    assert len(vids) < len(report["volumes"])  # the running root is apart
    code, report = run_json(capsys, "du", root, *vids)
    rows = [row for volume in report["volumes"] for row in volume["files"]]
    linked = os.path.join(root, "all")  # the pool is a subvolume
    os.mkdir(linked)
    seen = set()
    for number, row in enumerate(rows):
        ino = os.stat(row["path"]).st_ino
        if ino not in seen:  # btrfs du counts each inode once
            seen.add(ino)
            os.link(row["path"], os.path.join(linked, str(number)))
    _total, exclusive, set_shared = btrfs_du(linked)[linked]
    assert report["total"]["shared"] == int(set_shared)
    assert report["total"]["exclusive"] == exclusive
    assert report["total"]["allocated"] == int(set_shared) + exclusive


async def test_du_per_volume_and_revision(reflink_dir, capsys):
    root = await make_pool(reflink_dir)
    vid = "appvms/work/private"
    code, report = run_json(capsys, "du", root, vid)
    assert code == 0 and [v["vid"] for v in report["volumes"]] == [vid]
    files = {
        row["kind"] + row["detail"]: row
        for row in report["volumes"][0]["files"]
    }
    committed = files["committed"]
    # three MiB written in turn; the newest one is the committed image's own
    assert committed["allocated"] == 3 * MIB
    assert files["revision3"]["allocated"] == 2 * MIB
    assert committed["exclusive"] == 0  # its spare shares all of it
    total = report["volumes"][0]["total"]
    assert total == report["total"]
    assert total["allocated"] == 3 * MIB
    assert total["shared"] + total["exclusive"] == total["allocated"]
    code, text = run(capsys, "du", root, vid)
    assert "revision 2 (" in text and "total (1 volumes)" in text
    assert run(capsys, "du", root, "appvms/nobody/private")[0] == 2


# -- fsck ----------------------------------------------------------------


async def test_fsck_reports_without_changing_anything(reflink_dir, capsys):
    root = await make_pool(reflink_dir)
    assert run(capsys, "fsck", root) == (0, "0 problems\n")
    work = plant_leftovers(root)
    before = identities(root)
    code, report = run_json(capsys, "fsck", root)
    assert code == 1 and report["repaired"] == []
    found = {
        (os.path.basename(p["path"]), p["code"], p["repair"])
        for p in report["problems"]
    }
    assert found == {
        (TMP, "tmp", "remove"),
        (EXPORT, "export", "remove"),
        (OLD_SPARE, "stale-spare", "remove"),
        ("root.img~base", "stale-base", "remove"),
        ("root-precache.img", "core-leftover", "remove"),
        ("private-cow.img", "cow", "remove-cow"),
        ("private.img", "mode", "chmod"),
    }
    assert identities(root) == before
    assert os.stat(os.path.join(work, "private.img")).st_mode & 0o777 == 0o644


async def test_fsck_repair_removes_only_garbage(reflink_dir, capsys):
    root = await make_pool(reflink_dir)
    work = plant_leftovers(root)
    garbage = {TMP, EXPORT, OLD_SPARE, "root.img~base", "root-precache.img"}
    before = identities(root)
    code, report = run_json(capsys, "fsck", "--repair", root)
    assert code == 1  # the cow file remains
    assert [p["code"] for p in report["problems"]] == ["cow"]
    after = identities(root)
    removed = {os.path.basename(rel) for rel in set(before) - set(after)}
    assert removed == garbage
    assert all(after[rel] == before[rel] for rel in after)  # same inode, data
    assert os.stat(os.path.join(work, "private.img")).st_mode & 0o7777 == 0o600
    assert sorted(d["action"] for d in report["repaired"]).count("removed") == 5
    code, out = run(capsys, "fsck", "--repair", "--remove-cow", root)
    assert code == 0 and f"removed: {work}/private-cow.img" in out
    assert run(capsys, "fsck", root) == (0, "0 problems\n")
    assert set(identities(root)) == set(after) - {"appvms/work/private-cow.img"}


async def test_spare_in_a_snapshot_volume_dir_is_stale(reflink_dir, capsys):
    """A spare of the template's current root that an older version left
    in an AppVM's directory is stale (snapshot volumes keep none), and
    --repair removes it; the template's own spare stays live."""
    root = await make_pool(reflink_dir)
    template_dir = os.path.join(root, "vm-templates", "fedora")
    (spare,) = [n for n in os.listdir(template_dir) if "~spare." in n]
    legacy = os.path.join(root, "appvms", "work", spare)
    shutil.copyfile(os.path.join(template_dir, spare), legacy)
    code, report = run_json(capsys, "status", root)
    assert code == 0
    states = {
        o["path"]: o["state"] for v in report["volumes"] for o in v["other"]
    }
    assert states[legacy] == "stale"
    assert states[os.path.join(template_dir, spare)] == "live"
    code, report = run_json(capsys, "fsck", "--repair", root)
    assert [d["path"] for d in report["repaired"]] == [legacy]
    assert not os.path.exists(legacy)
    assert os.path.exists(os.path.join(template_dir, spare))


async def test_fsck_removes_the_name_of_a_spare_a_power_cut_left_linked(
    reflink_dir, capsys
):
    """The state docs/DESIGN.md describes: a start took the template's
    spare as an AppVM's running image, and a power cut left the spare's
    name too.  fsck names the spare (exit 1); --repair removes that name
    only, and the AppVM's image keeps its inode and data."""
    root = await make_pool(reflink_dir)
    template_dir = os.path.join(root, "vm-templates", "fedora")
    (name,) = [n for n in os.listdir(template_dir) if "~spare." in n]
    spare = os.path.join(template_dir, name)
    running = os.path.join(root, "appvms", "work", "root-dirty.img")
    os.link(spare, running)
    before = identities(root)
    code, report = run_json(capsys, "fsck", root)
    assert code == 1
    assert [
        (p["path"], p["code"], p["repair"]) for p in report["problems"]
    ] == [(spare, "linked-spare", "remove")]
    assert identities(root) == before
    code, report = run_json(capsys, "status", root)
    (template,) = [
        v for v in report["volumes"] if v["vid"] == "vm-templates/fedora/root"
    ]
    states = {o["path"]: o["state"] for o in template["other"]}
    assert states[spare] == "stale"
    code, out = run(capsys, "fsck", "--repair", root)
    assert code == 0 and f"removed: {spare}" in out
    after = identities(root)
    assert set(before) - set(after) == {f"vm-templates/fedora/{name}"}
    assert (
        after["appvms/work/root-dirty.img"]
        == before["appvms/work/root-dirty.img"]
    )
    assert os.stat(running).st_nlink == 1
    assert run(capsys, "fsck", root) == (0, "0 problems\n")


async def test_fsck_never_touches_revisions_without_committed(
    btrfs_dir, capsys
):
    root = await make_pool(btrfs_dir)
    work = os.path.join(root, "appvms", "work")
    os.unlink(os.path.join(work, "private.img"))
    before = identities(root)
    code, report = run_json(capsys, "fsck", "--repair", root)
    assert code == 1
    codes = {p["code"] for p in report["problems"]}
    assert "orphan-revision" in codes
    # the spare of the deleted committed image is stale now: removed
    assert [os.path.basename(d["path"]) for d in report["repaired"]] == [
        os.path.basename(p)
        for p in before
        if "appvms/work/private.img~spare." in p
    ]
    revisions = [p for p in before if ".img." in p and "@" in p]
    assert len(revisions) == 3  # work's two, the template's one
    after = identities(root)
    assert all(after[rel] == before[rel] for rel in revisions)


async def test_fsck_repair_refused_while_qubesd_runs(
    btrfs_dir, capsys, fake_qubesd
):
    root = await make_pool(btrfs_dir)
    plant_leftovers(root)
    before = identities(root)
    code, out = run(capsys, "fsck", "--repair", root)
    assert code == 3 and "refusing" in out
    assert identities(root) == before
    code, out = run(capsys, "fsck", root)
    assert code == 1 and "qubesd is running" in out
    assert run(capsys, "-q", "fsck", "--repair", "--force", root)[0] == 1
    assert TMP not in os.listdir(os.path.join(root, "appvms", "work"))


async def test_fsck_leaves_files_attached_to_loop_devices(btrfs_dir, capsys):
    root = await make_pool(btrfs_dir)
    work = plant_leftovers(root)
    cow = os.path.join(work, "private-cow.img")
    with open(cow, "r+b") as image:
        image.truncate(MIB)
    loop = subprocess.run(
        ["losetup", "-f", "--show", cow],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        code, report = run_json(capsys, "status", root)
        states = {
            o["path"]: o["state"] for v in report["volumes"] for o in v["other"]
        }
        assert states[cow] == "in use by a loop device"
        code, report = run_json(
            capsys, "fsck", "--repair", "--remove-cow", root
        )
        assert code == 0 and os.path.exists(cow)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


# -- the tool itself -----------------------------------------------------


@pytest.mark.parametrize(
    "command", ["check", "status", "du", "fsck", "migrate"]
)
def test_help_has_examples_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert "examples:" in out and "exit codes:" in out
    assert f"qubes-reflink {command}" in out.split("examples:")[1]


def test_console_script_installed():
    # the script pip installed beside the Python under test, not whichever
    # qubes-reflink comes first on PATH
    script = os.path.join(os.path.dirname(sys.executable), "qubes-reflink")
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert (
        "{check,status,du,defrag,fsck,pin,unpin,cancel-revert,set,migrate}"
        in result.stdout
    )


def test_options_after_subcommand(tmp_path, capsys):
    assert run(capsys, "check", "-q", tmp_path / "missing") == (2, "")
    with pytest.raises(SystemExit) as exited:
        cli.main(["frobnicate"])
    assert exited.value.code == 2


def test_human_size():
    assert [output.human_size(n) for n in (0, 1023, 1536, 3 * MIB)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.0 MiB",
    ]


async def test_no_progress_meter_without_terminal(btrfs_dir, capsys):
    root = await make_pool(btrfs_dir)
    cli.main(["du", root])
    assert capsys.readouterr().err == ""
    assert layout.classify(TMP).kind == layout.TEMP  # names used above


async def test_progress_meter_on_terminal(btrfs_dir, capsys, monkeypatch):
    root = await make_pool(btrfs_dir)
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(output.Progress, "DELAY", 0.0)
        monkeypatch.setattr("sys.stdout", terminal)
        assert cli.main(["du", root]) == 0
    os.close(leader)
    err = capsys.readouterr().err
    assert "] 4/4 volumes measured" in err and err.endswith("\r\033[K")
