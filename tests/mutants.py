"""Mutants of the driver, each breaking one safety claim, and the proof
that the power-cut harness's data checks catch every one.

Run as ``python3 tests/mutants.py [--fast]`` (``make mutants``; CI runs
``--fast`` through tests/test_mutants.py).  Each mutant is applied to a
copy of the driver (never to the checkout), and power-cut campaigns
(tests/powercut.py) run against that copy: first the ones listed for it,
then, without --fast, every single-pool operation on btrfs, XFS and ext4
until one catches it.  Caught means a campaign that set itself up and ran
reported data lost by its data checks (committed data neither before nor
after, a revision or the data committed before the operation gone, the
result missing after the operation returned), not a scenario that failed
to build.  Prints a line per mutant, caught or missed; exit 1 if any was
missed.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# pylint: disable=wrong-import-position
import hosts  # noqa: E402

HARNESS = os.path.join(HERE, "powercut.py")
WORK = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
FILESYSTEMS = ("btrfs", "xfs", "ext4")
# every flush point; the filesystem checker is the sample's and
# make powercut's business, not the mutants'
SAMPLING = {"every_flush": True, "states": 0, "subsets": 16, "seed": 20261207}


class Mutant(NamedTuple):
    """A change to the driver's source that breaks one claim."""

    name: str
    claim: str
    patches: tuple  # (file below qubes_reflink/, old text, new text)
    first: tuple  # (fstype, op) campaigns tried first (the fast subset)
    #: a durability fault: the disk with every write replayed must be
    #: whole, so that the loss is the missing flush, not the replay
    durability: bool = True
    #: pytest node ids that must fail against the mutant instead (claims
    #: the power-cut harness does not see: sharing, what a concurrent
    #: start gets)
    tests: tuple = ()


MUTANTS = (
    Mutant(
        "commit-drops-old-image",
        "a commit keeps the image it replaces as a revision",
        (
            (
                "revisions.py",
                "        if policy.keep > 0:\n"
                "            self._keep_committed(listing)\n",
                "",
            ),
        ),
        (("xfs", "stop_origin"),),
        durability=False,
    ),
    Mutant(
        "no-fsync-of-the-directory-a-rename-goes-to",
        "a rename is durable once it returns",
        (
            (
                "fileops.py",
                "    _fsync_dirs(dst)\n    if os.path.dirname(src)",
                "    if os.path.dirname(src)",
            ),
        ),
        (("ext4", "create_origin"),),
    ),
    Mutant(
        "no-fsync-of-the-directory-a-rename-leaves-and-linked-spares-taken",
        "a spare a start took is no spare after a power cut (btrfs)",
        (
            (
                "fileops.py",
                "    if os.path.dirname(src) != os.path.dirname(dst):\n"
                "        _fsync_dirs(src)\n",
                "",
            ),
            (
                "spares.py",
                "    if guards.link_count(spare) > 1:\n"
                "        trash.discard([spare])\n"
                "        return False\n"
                "    guards.check_own_image(spare)\n",
                "",
            ),
            (
                "judgement.py",
                "if item.kind == layout.SPARE and item.links > 1:",
                "if False:  # mutant",
            ),
        ),
        (("btrfs", "start_origin_snapshot"),),
    ),
    Mutant(
        "no-fsync-at-all",
        "what the driver wrote is on the disk once it returns",
        (
            (
                "fileops.py",
                '    with step("fsync", path):\n        os.fsync(fd)\n',
                "    del fd, path\n",
            ),
        ),
        (("ext4", "import_data_end_true"),),
    ),
    Mutant(
        "defrag-shares-without-the-kernel-comparing",
        "a defragmentation never changes a byte: data that differs from "
        "what the extent maps suggested is left as it is",
        (
            (
                "fileops.py",
                "            fcntl.ioctl(src_fd, FIDEDUPERANGE, buf)\n",
                "            fcntl.ioctl(dst_fd, 0x4020940D, struct.pack("
                '"=qQQQ", src_fd, src_offset + done, length - done, '
                "offset + done))\n"
                "            _DEDUPE_INFO.pack_into(buf, _DEDUPE_RANGE.size, "
                "dst_fd, offset + done, length - done, 0, 0)\n",
            ),
            (
                "defrag.py",
                "    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)",
                "    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)",
            ),
        ),
        (),
        tests=(
            "tests/test_defrag.py::"
            "test_a_sharer_written_meanwhile_keeps_what_was_written",
        ),
    ),
    Mutant(
        "defrag-leaves-the-sharers-on-the-old-extents",
        "after a defragmentation the pool takes no more space: what shared "
        "the image shares its new extents",
        (
            (
                "defrag.py",
                "self.every_share = every_share\n",
                "self.maps[1:] = []\n        self.every_share = every_share\n",
            ),
        ),
        (),
        tests=(
            "tests/test_defrag.py::"
            "test_defrag_rewrites_and_keeps_everything_shared",
        ),
    ),
    Mutant(
        "defrag-goes-on-after-a-start",
        "a start that arrives during a defragmentation ends its work on "
        "the volume",
        (
            (
                "defrag.py",
                "        if self.should_stop(job.plan.vid):\n"
                '            return "the volume started"\n'
                "        current",
                "        current",
            ),
            (
                "defrag.py",
                "            if self.should_stop(job.plan.vid):\n"
                '                return "the volume started"\n',
                "",
            ),
        ),
        (),
        tests=(
            "tests/test_defrag.py::"
            "test_a_start_during_the_tool_is_served_and_ends_the_work",
            "tests/test_defrag.py::"
            "test_a_start_is_not_kept_waiting_by_a_background_defrag",
        ),
    ),
)


def operations():
    """The single-pool operations the power-cut harness runs."""
    import crashharness  # pylint: disable=import-outside-toplevel

    return sorted(
        name
        for name, scenario in crashharness.SCENARIOS.items()
        if scenario.pools == ("main",)
    )


def mutated_copy(mutant, directory):
    """The driver with `mutant` applied, in `directory`; its path."""
    package = os.path.join(directory, "qubes_reflink")
    shutil.copytree(
        os.path.join(ROOT, "qubes_reflink"),
        package,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name, old, new in mutant.patches:
        path = os.path.join(package, name)
        with open(path, encoding="utf-8") as source:
            text = source.read()
        if text.count(old) != 1:
            raise RuntimeError(
                f"mutant {mutant.name} no longer applies to {name}: "
                "update it to the driver's code"
            )
        with open(path, "w", encoding="utf-8") as source:
            source.write(text.replace(old, new))
    return directory


def run_campaign(driver_dir, fstype, op):
    """One power-cut campaign with the driver of `driver_dir`; its result.

    Python starts without site (an editable install of the checkout would
    come first), then adds site-packages without this project in them."""
    with tempfile.TemporaryDirectory() as scratch:
        view = hosts.site_view_without_project(
            sys.executable, os.path.join(scratch, "site")
        )
        out, config = (os.path.join(scratch, n) for n in ("out", "config"))
        with open(config, "w", encoding="utf-8") as config_file:
            json.dump(
                {"op": op, "fstype": fstype, "work": WORK, "out": out}
                | {"no_fsync": False}
                | SAMPLING,
                config_file,
            )
        boot = (
            "import runpy, site, sys\n"
            f"sys.path[:0] = [{driver_dir!r}, {HERE!r}]\n"
            f"site.addsitedir({view!r})\n"
            f"sys.argv = [{HARNESS!r}, {config!r}]\n"
            f"sys.exit(runpy.run_path({HARNESS!r}, run_name='__main__'))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-S", "-c", boot],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": proc.stdout[-2000:] + proc.stderr[-2000:]}
        with open(out, encoding="utf-8") as result_file:
            return json.load(result_file)


def caught(result, driver_dir, durability):
    """Whether a campaign ran the mutant and its data checks caught it;
    for a durability fault, with the fully replayed disk whole (the
    method saw every write, and the loss is a flush that was missing)."""
    ran_mutant = result.get("driver", "").startswith(driver_dir)
    set_up = "error" not in result and result.get("checked", 0) > 0
    replayed = not any(f.startswith("end:") for f in result["failures"])
    return (
        ran_mutant
        and set_up
        and result.get("lost", 0) > 0
        and (replayed or not durability)
    )


def run_tests(driver_dir, node_ids):
    """Whether every test of `node_ids` fails against the driver of
    `driver_dir`: pytest in a Python started without site (the editable
    install of the checkout would come first), that copy first on the
    path, checked to be the one imported."""
    with tempfile.TemporaryDirectory() as scratch:
        view = hosts.site_view_without_project(
            sys.executable, os.path.join(scratch, "site")
        )
        for node_id in node_ids:
            boot = (
                "import site, sys\n"
                f"sys.path[:0] = [{driver_dir!r}, {HERE!r}]\n"
                f"site.addsitedir({view!r})\n"
                "import pytest, qubes_reflink\n"
                f"assert qubes_reflink.__file__.startswith({driver_dir!r})\n"
                "sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', "
                f"{node_id!r}]))\n"
            )
            proc = subprocess.run(
                [sys.executable, "-S", "-c", boot],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if proc.returncode != 1:  # 1: tests ran and failed
                return False
    return True


def hunt(mutant, fast):
    """(caught by (fstype, op) or None, campaigns run)."""
    if mutant.tests:
        with tempfile.TemporaryDirectory(prefix="mutant-") as directory:
            driver_dir = mutated_copy(mutant, directory)
            if run_tests(driver_dir, mutant.tests):
                return ("tests", ", ".join(mutant.tests)), len(mutant.tests)
            return None, len(mutant.tests)
    campaigns = list(mutant.first)
    if not fast:
        campaigns += [
            (fstype, op)
            for op in operations()
            for fstype in FILESYSTEMS
            if (fstype, op) not in mutant.first
        ]
    with tempfile.TemporaryDirectory(prefix="mutant-") as directory:
        driver_dir = mutated_copy(mutant, directory)
        for number, (fstype, op) in enumerate(campaigns, 1):
            result = run_campaign(driver_dir, fstype, op)
            if "error" in result:
                raise RuntimeError(f"{fstype} {op}: {result['error']}")
            if caught(result, driver_dir, mutant.durability):
                return (fstype, op), number
    return None, len(campaigns)


def main(argv):
    """Every mutant; a line each; exit 1 if one was missed."""
    fast = "--fast" in argv
    missed = 0
    for mutant in MUTANTS:
        by, count = hunt(mutant, fast)
        if by is None:
            missed += 1
            print(f"MISSED {mutant.name} ({mutant.claim}): {count} campaigns")
        else:
            print(
                f"caught {mutant.name} ({mutant.claim}): by {by[1]} on "
                f"{by[0]}, campaign {count}"
            )
    print(f"{len(MUTANTS) - missed} caught, {missed} missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
