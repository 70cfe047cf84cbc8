"""Revisions users can trust: pins, the restore point, revert while running.

Driven through the driver's API and the qubes-reflink tool on btrfs, XFS
and ext4, restarts simulated as qubesd does them (fresh pool and volume
objects, stop() of every volume).  Each test checks file contents and the
revisions qubesd lists.
"""

import json
import os
import threading
import time

import pytest

from helpers import (
    FakeVM,
    committed,
    data,
    dirty,
    new_pool,
    origin,
    read_image,
    write_image,
)
from qubes_reflink import cli, fileops, layout
from qubes_reflink.host import StoragePoolException

DAY = 86400


async def run(volume, payload):
    """One VM run: start, write `payload`, stop."""
    await volume.start()
    write_image(volume.block_device().path, payload)
    await volume.stop()


async def volume_after(pool, rtk, *labels):
    """A private volume (revisions_to_keep `rtk`) after a run writing
    each of `labels` in turn."""
    volume = origin(pool, FakeVM("work"), revisions_to_keep=rtk)
    await volume.create()
    for label in labels:
        await run(volume, data(label))
    return volume


def contents(volume, revision):
    """The first bytes of revision `revision` of `volume`."""
    directory = os.path.dirname(committed(volume))
    prefix = os.path.basename(committed(volume)) + f".{revision}@"
    (name,) = [n for n in os.listdir(directory) if n.startswith(prefix)]
    return read_image(os.path.join(directory, name), 64 * 1024)


def tool(capsys, *argv):
    """(exit code, stdout, stderr) of qubes-reflink with `argv`."""
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def restarted(pool, volume, **options):
    """The pool and volume as a restarted qubesd makes them, after its
    recovery stop() of the volume."""
    await pool.wait_background()
    await pool.close()
    options.setdefault("setup_check", "no")
    again = await new_pool(os.path.dirname(pool.dir_path), **options)
    config = {
        "name": volume.name,
        "save_on_stop": True,
        "rw": True,
        "revisions_to_keep": volume.revisions_to_keep,
    }
    vol = again.init_volume(FakeVM(volume.vid.split("/")[1]), config)
    await vol.stop()
    return again, vol


# -- pins ------------------------------------------------------------------


async def test_pinned_revision_outlives_restarts_and_reverts(pool, capsys):
    volume = await volume_after(pool, 1, "wanted", "next")
    (wanted,) = volume.revisions
    assert contents(volume, wanted) == data("wanted")
    code, out, _ = tool(capsys, "pin", pool.root, volume.vid, wanted)
    assert code == 0 and "pinned" in out
    for number in range(5):
        await run(volume, data(f"later{number}"))
    assert list(volume.revisions)[0] == wanted
    assert len(volume.revisions) == 2  # the pinned one does not count
    assert contents(volume, wanted) == data("wanted")
    code, report = tool(capsys, "--json", "status", pool.root)[:2]
    (status,) = json.loads(report)["volumes"]
    assert [r["id"] for r in status["revisions"] if r["pinned"]] == [wanted]
    await volume.revert(wanted)
    assert read_image(committed(volume), 64 * 1024) == data("wanted")
    assert wanted in volume.revisions  # a revert to a pinned one keeps it
    pool2, volume2 = await restarted(pool, volume)
    assert wanted in volume2.revisions
    assert contents(volume2, wanted) == data("wanted")
    await pool2.close()


async def test_unpinned_revision_is_pruned_at_the_next_commit(pool, capsys):
    volume = await volume_after(pool, 1, "a", "b")
    (first,) = volume.revisions
    assert tool(capsys, "pin", pool.root, volume.vid, first)[0] == 0
    await run(volume, data("c"))
    assert first in volume.revisions
    code, out, _ = tool(capsys, "unpin", pool.root, volume.vid, first)
    assert code == 0 and "unpinned" in out
    assert first in volume.revisions  # ordinary again, not gone yet
    await run(volume, data("d"))
    assert first not in volume.revisions and len(volume.revisions) == 1


async def test_pin_refusals_say_what_to_do(pool, capsys, tmp_path):
    volume = await volume_after(pool, 1, "a", "b")
    (revision,) = volume.revisions
    before = sorted(os.listdir(os.path.dirname(committed(volume))))
    cases = [
        (("pin", pool.root, volume.vid, "99"), "no revision '99'"),
        (("pin", pool.root, "appvms/nobody/private", "1"), "no volume"),
        (("pin", pool.root, "../etc/passwd", "1"), "invalid volume id"),
        (("pin", pool.root, volume.vid, "a/b"), "invalid revision id"),
        (("unpin", pool.root, volume.vid, revision), "not pinned"),
    ]
    for argv, words in cases:
        code, _out, err = tool(capsys, *argv)
        assert code == 2 and words in err, (argv, err)
    xml = tmp_path / "qubes.xml"
    xml.write_text(
        f'<qubes><pools><pool name="p" driver="file-reflink" '
        f'dir_path="{pool.dir_path}" revisions_to_keep="1"/></pools>'
        f'<domains><domain><volume-config><volume name="private" pool="p" '
        f'vid="{volume.vid}" revisions_to_keep="-1"/></volume-config>'
        "</domain></domains></qubes>"
    )
    argv = ("pin", pool.root, volume.vid, revision, "--qubes-xml", xml)
    code, _out, err = tool(capsys, *argv)
    assert code == 2 and "revisions_to_keep 1" in err
    assert sorted(os.listdir(os.path.dirname(committed(volume)))) == before


async def test_a_pin_holds_or_fails_while_qubesd_prunes(pool):
    """qubesd prunes under the volume directory's lock: a pin waits for
    it, then sees the revision gone and fails, instead of reporting a pin
    of a revision that is about to go."""
    volume = await volume_after(pool, 1, "a", "b")
    (revision,) = volume.revisions
    files = layout.VolumeFiles(pool.root, volume.vid)
    outcome = {}

    def pin():
        try:
            outcome["pinned"] = cli.revisions.pin(files, revision)
        except LookupError as err:
            outcome["error"] = str(err)

    with fileops.directory_lock(files.directory):  # as a prune holds it
        pinner = threading.Thread(target=pin)
        pinner.start()
        time.sleep(0.3)
        assert pinner.is_alive()  # waits for the lock
        fileops.remove_files([r.path for r in files.scan().revisions])
    pinner.join(10)
    assert "no revision" in outcome["error"]
    assert files.scan().pins == {}


# -- the restore point -----------------------------------------------------


def age_committed(volume, seconds):
    """Make the committed image's data `seconds` old: the timestamp its
    revision gets when the next commit retires it."""
    then = time.time() - seconds
    os.utime(committed(volume), (then, then))


@pytest.mark.parametrize("how", ["qvm-pool add", "qubes-reflink set"])
async def test_restore_point_outlives_quick_restarts(any_dir, capsys, how):
    options = {"setup_check": "no", "revisions_to_keep": "1"}
    if how == "qvm-pool add":
        options["keep_revision_older_than"] = str(DAY)
    pool = await new_pool(any_dir, **options)
    if how == "qubes-reflink set":
        assert pool.keep_revision_older_than == 0
        argv = ("set", pool.root, f"keep_revision_older_than={DAY}")
        assert tool(capsys, *argv)[0] == 0
    assert pool.keep_revision_older_than == DAY
    assert pool.config["keep_revision_older_than"] == DAY
    volume = origin(pool, FakeVM("work"))
    await volume.create()
    await run(volume, data("yesterday"))
    age_committed(volume, 2 * DAY)
    for number in range(5):
        await run(volume, data(f"today{number}"))
    first, newest = volume.revisions
    assert contents(volume, first) == data("yesterday")
    assert contents(volume, newest) == data("today3")
    # one revision more at most: a second old one is not kept
    age_committed(volume, 3 * DAY)
    await run(volume, data("later"))
    assert len(volume.revisions) == 2
    assert contents(volume, list(volume.revisions)[0]) == data("yesterday")
    await pool.wait_background()
    await pool.close()


async def test_restore_point_setting_refused_when_bad(any_dir, capsys):
    pool = await new_pool(any_dir, setup_check="no")
    for value in ("-1", "soon", "1.5", ""):
        code, _out, err = tool(
            capsys, "set", pool.root, f"keep_revision_older_than={value}"
        )
        assert code == 2 and "seconds" in err
        with pytest.raises(StoragePoolException, match="seconds"):
            await new_pool(any_dir, keep_revision_older_than=value)
    code, _out, err = tool(capsys, "set", pool.root, "colour=blue")
    assert code == 2 and "unknown setting" in err
    assert not os.path.exists(layout.settings_path(pool.root))
    await pool.close()


# -- revert while running ----------------------------------------------------


async def test_revert_while_running_applies_at_stop(pool, capsys):
    volume = await volume_after(pool, 2, "good", "broken")
    good = list(volume.revisions)[-1]
    assert contents(volume, good) == data("good")
    await volume.start()
    write_image(dirty(volume), data("this run"))
    await volume.revert(good)
    # nothing changes while the VM runs
    assert read_image(committed(volume), 64 * 1024) == data("broken")
    assert read_image(dirty(volume), 64 * 1024) == data("this run")
    status = json.loads(tool(capsys, "--json", "status", pool.root)[1])
    assert status["volumes"][0]["pending_revert"] == good
    await volume.stop()
    assert read_image(committed(volume), 64 * 1024) == data("good")
    newest = list(volume.revisions)[-1]
    assert contents(volume, newest) == data("this run")
    status = json.loads(tool(capsys, "--json", "status", pool.root)[1])
    assert status["volumes"][0]["pending_revert"] is None
    await volume.revert(newest)  # the revert itself can be undone
    assert read_image(committed(volume), 64 * 1024) == data("this run")


async def test_pending_revert_survives_a_restart(pool):
    volume = await volume_after(pool, 1, "good", "bad")
    (good,) = volume.revisions
    await volume.start()
    write_image(dirty(volume), data("run"))
    await volume.revert(good)
    # qubesd dies with the VM; its restart stops the volume: the revert
    pool2, volume2 = await restarted(pool, volume)
    assert read_image(committed(volume2), 64 * 1024) == data("good")
    (newest,) = volume2.revisions
    assert contents(volume2, newest) == data("run")
    await pool2.close()


async def test_second_request_replaces_and_cancel_drops(pool, capsys):
    volume = origin(pool, FakeVM("work"), revisions_to_keep=3)
    await volume.create()
    for label in ("one", "two", "three"):
        await run(volume, data(label))
    one, two = list(volume.revisions)[-2:]
    await volume.start()
    write_image(dirty(volume), data("run"))
    await volume.revert(one)
    await volume.revert(two)
    await volume.stop()
    assert read_image(committed(volume), 64 * 1024) == data("two")
    await volume.start()
    write_image(dirty(volume), data("kept"))
    await volume.revert(one)
    code, out, _ = tool(capsys, "cancel-revert", pool.root, volume.vid)
    assert code == 0 and "cancelled" in out
    await volume.stop()
    assert read_image(committed(volume), 64 * 1024) == data("kept")


async def test_revert_while_running_without_revisions_kept(pool, capsys):
    """revisions_to_keep 0: the run's data is not kept; a pinned revision
    is the one to go back to, and stays."""
    volume = await volume_after(pool, 1, "pinned", "later")
    (pinned,) = volume.revisions
    assert tool(capsys, "pin", pool.root, volume.vid, pinned)[0] == 0
    volume.revisions_to_keep = 0
    await volume.start()
    write_image(dirty(volume), data("run"))
    await volume.revert(pinned)
    await volume.stop()
    assert read_image(committed(volume), 64 * 1024) == data("pinned")
    assert list(volume.revisions) == [pinned]


async def test_revert_to_a_revision_removed_by_hand_commits_the_run(pool):
    volume = await volume_after(pool, 1, "good", "bad")
    (good,) = volume.revisions
    await volume.start()
    write_image(dirty(volume), data("run"))
    await volume.revert(good)
    directory = os.path.dirname(committed(volume))
    for name in os.listdir(directory):
        if name.startswith(f"private.img.{good}@"):
            os.unlink(os.path.join(directory, name))
    await volume.stop()
    assert read_image(committed(volume), 64 * 1024) == data("run")
    assert not [n for n in os.listdir(directory) if "~revert." in n]
