"""A scripted tour of the file-reflink driver on a throwaway pool.

It walks a template, an AppVM based on it and a disposable VM through
their lives (create, start, write, stop, template update, revert, export,
remove) the way qubesd drives the driver, printing the time of each step,
then the time of the background work the step started (spares, trash),
then the pool's files.  It runs on a loop-mounted btrfs when it can (root,
btrfs-progs), else on a loop-mounted XFS, else in a plain temporary
directory without reflinks (setup_check=no); ``--fs`` picks one.

Run it with ``make demo`` (or ``python3 demo.py -v`` to see every file
operation as ``journalctl -fu qubesd`` would).
"""

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))

# pylint: disable=wrong-import-position
from loopfs import loop_filesystem, unavailable_reason  # noqa: E402

from qubes_reflink import ReflinkPool, layout, trash  # noqa: E402

MIB = 1024**2

#: What the pool lives on, for the messages.
WHERE = {
    "btrfs": "a loop-mounted btrfs",
    "xfs": "a loop-mounted XFS (it reflinks too)",
    "dir": "a plain temporary directory without reflinks (setup_check=no): "
    "every clone below is a full copy",
}

#: The package that provides each filesystem's mkfs.
PACKAGES = {"btrfs": "btrfs-progs", "xfs": "xfsprogs"}


class VM:
    """What the driver needs of a VM: its name and directory prefix."""

    def __init__(self, name, dir_path_prefix="appvms"):
        self.name = name
        self.dir_path_prefix = dir_path_prefix


def show_tree(root):
    """Print the pool's files with apparent size and allocated bytes; the
    trash as one line.

    Background work (a spare being cloned, the trash being swept) may add
    or remove files while the listing runs: a file gone before it is
    measured is skipped (as `layout` does), and a vanished directory lists
    as empty.
    """
    discarded = layout.trash_entries(root)
    shown = 0
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != layout.TRASH_DIR)
        for name in sorted(files):
            path = os.path.join(top, name)
            try:
                stat = os.stat(path, follow_symlinks=False)
            except layout.VANISHED:
                continue
            print(
                f"    {os.path.relpath(path, root):58} "
                f"{stat.st_size // MIB:5} MiB  "
                f"{stat.st_blocks * 512 // 1024:7} KiB used"
            )
            shown += 1
    if not (shown or discarded):
        print("    (no files)")
    if discarded:
        print(
            f"    {layout.TRASH_DIR}/: {len(discarded)} discarded images, to "
            "be deleted in the background"
        )


def since(began):
    """Milliseconds since the perf_counter() value `began`."""
    return (time.perf_counter() - began) * 1000


class Tour:
    """Runs the steps, timing each and showing the pool afterwards."""

    def __init__(self, pool):
        self.pool = pool

    async def step(self, title, *coroutines):
        """Run `coroutines` concurrently, as qubesd does for a VM's volumes,
        then wait for the background work they started.

        The step's own time is what a user waits for; the background work
        (the next spares, the trash sweep) is timed apart from it, and
        waited for so that each listing shows where the pool settles.
        """
        began = time.perf_counter()
        results = await asyncio.gather(*coroutines)
        took = since(began)
        began = time.perf_counter()
        await self.pool.wait_spares()
        spares = since(began)
        await self.pool.trash.wait()
        print(f"\n== {title}  ({took:.1f} ms)")
        print(
            f"    then in the background: spares ready after {spares:.1f} ms, "
            f"trash emptied after {since(began):.1f} ms"
        )
        show_tree(self.pool.root)
        return results


def write(volume, text):
    """Write `text` at the start of the running image, as the VM would."""
    with open(volume.block_device().path, "r+b") as image:
        image.write(text.encode())


def read(path, length=16):
    """The first bytes of an image, without its zero padding."""
    with open(path, "rb") as image:
        return image.read(length).rstrip(b"\0").decode()


def volumes_of_template(pool, vm):
    """Template: root and private are origins (committed at stop)."""
    return {
        "root": pool.init_volume(
            vm,
            {
                "name": "root",
                "size": 64 * MIB,
                "save_on_stop": True,
                "rw": True,
            },
        ),
        "private": pool.init_volume(
            vm,
            {"name": "private", "size": 32 * MIB, "save_on_stop": True},
        ),
        "volatile": pool.init_volume(
            vm, {"name": "volatile", "size": 16 * MIB, "rw": True}
        ),
    }


def volumes_of_appvm(pool, vm, root_source, private_source=None):
    """AppVM: root is a snapshot of its template's; disposable VMs also
    start their private from the disposable template's."""
    private = {"name": "private", "size": 32 * MIB, "rw": True}
    if private_source is None:
        private["save_on_stop"] = True
    else:
        private.update(snap_on_start=True, source=private_source)
    return {
        "root": pool.init_volume(
            vm,
            {
                "name": "root",
                "size": root_source.size,
                "snap_on_start": True,
                "source": root_source,
                "rw": True,
            },
        ),
        "private": pool.init_volume(vm, private),
        "volatile": pool.init_volume(
            vm, {"name": "volatile", "size": 16 * MIB, "rw": True}
        ),
    }


def each(volumes, method):
    """The coroutines of calling `method` on every volume of a VM."""
    return [getattr(volume, method)() for volume in volumes.values()]


async def tour(pool):
    """The lifecycle walk-through."""
    t = Tour(pool)
    tpl = volumes_of_template(pool, VM("fedora", "vm-templates"))
    await t.step("create template 'fedora'", *each(tpl, "create"))
    await t.step("start template", *each(tpl, "start"))
    write(tpl["root"], "fedora v1")
    await t.step("stop template (commit root: 'fedora v1')", *each(tpl, "stop"))

    work = volumes_of_appvm(pool, VM("work"), tpl["root"])
    await t.step("create AppVM 'work'", *each(work, "create"))
    await t.step(
        "start AppVM 'work' (root: takes the template's ready spare)",
        *each(work, "start"),
    )
    print(f"    work sees root: {read(work['root'].path)!r}")
    write(work["private"], "my documents")

    await t.step("start template for an update", *each(tpl, "start"))
    write(tpl["root"], "fedora v2")
    await t.step("stop template (commit 'fedora v2')", *each(tpl, "stop"))
    print(f"    work is outdated: {work['root'].is_outdated()}")
    await t.step("stop AppVM 'work' (private committed)", *each(work, "stop"))

    disp = volumes_of_appvm(pool, VM("disp1234"), tpl["root"], work["private"])
    await t.step("create disposable VM 'disp1234'", *each(disp, "create"))
    await t.step(
        "start disposable VM (takes the ready spares of the template's root "
        "and of work's private)",
        *each(disp, "start"),
    )
    print(
        f"    disp1234 sees root {read(disp['root'].path)!r}, "
        f"private {read(disp['private'].path)!r}"
    )
    await t.step("stop disposable VM", *each(disp, "stop"))
    await t.step("remove disposable VM", *each(disp, "remove"))

    print(f"\n    template root revisions: {tpl['root'].revisions}")
    await t.step(
        "revert template root to its newest revision", tpl["root"].revert()
    )
    print(f"    template root now: {read(tpl['root'].committed_data_path())!r}")

    (path,) = await t.step(
        "export AppVM private (backup)", work["private"].export()
    )
    print(f"    export {os.path.basename(path)} holds {read(path)!r}")
    await t.step("end the export", work["private"].export_end(path))

    await t.step(
        "remove AppVM and template", *each(work, "remove"), *each(tpl, "remove")
    )


class Unavailable(Exception):
    """A loop-mounted filesystem can't be made here; the message says why."""


def mount_loop(stack, fstype):
    """The mount point of a fresh loop-mounted `fstype`, unmounted (and its
    loop device detached) when `stack` closes."""
    reason = unavailable_reason(fstype)
    if reason is not None:
        raise Unavailable(reason)
    try:
        return stack.enter_context(loop_filesystem(fstype))
    except subprocess.CalledProcessError as err:
        output = err.stderr.decode(errors="replace").strip()
        raise Unavailable(f"{err.cmd[0]} failed: {output}") from None
    except OSError as err:
        raise Unavailable(str(err)) from None


def temporary_dir(stack):
    """A fresh temporary directory, removed when `stack` closes."""
    directory = tempfile.mkdtemp(prefix="qubes-reflink-demo-")
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    return directory


def how_to_get(fstype):
    """What to do to run the demo on `fstype`."""
    package = PACKAGES[fstype]
    return (
        f"install {package} (apt install {package}, or dnf install "
        f"{package}) and run it as root (sudo make demo)"
    )


def note_not_btrfs(fstype, why):
    """Say that the demo is not showing the real thing, and how to get it."""
    print(
        f"NOTE: not on btrfs ({why}); the demo runs on {WHERE[fstype]}.\n"
        f"      For the real thing, {how_to_get('btrfs')}.\n"
    )


def explicit_filesystem(stack, wanted):
    """The directory for `--fs wanted`; exits with what to do when that
    filesystem can't be made here."""
    if wanted == "dir":
        note_not_btrfs("dir", "asked for with --fs dir")
        return temporary_dir(stack)
    try:
        mountpoint = mount_loop(stack, wanted)
    except Unavailable as err:
        sys.exit(
            f"demo.py: --fs {wanted} is not available here: {err}.\n"
            f"To use it, {how_to_get(wanted)}; or run with --fs auto."
        )
    if wanted != "btrfs":
        note_not_btrfs(wanted, f"asked for with --fs {wanted}")
    return mountpoint


def best_filesystem(stack):
    """(fstype, directory): btrfs if it can be made here, else XFS, else a
    plain directory, with a note whenever it is not btrfs."""
    reasons = []
    for fstype in ("btrfs", "xfs"):
        try:
            mountpoint = mount_loop(stack, fstype)
        except Unavailable as err:
            if str(err) not in reasons:
                reasons.append(str(err))
            continue
        if fstype != "btrfs":
            note_not_btrfs(fstype, reasons[0])
        return fstype, mountpoint
    note_not_btrfs("dir", "; ".join(reasons))
    return "dir", temporary_dir(stack)


@contextlib.contextmanager
def sweeping_at_once():
    """Let the trash be swept as soon as a step asks for it.

    qubesd's sweep waits a second so that one pass serves a burst of stops;
    the demo's steps come one at a time and each waits for its background
    work, which would then be mostly that idle second.
    """
    delay, trash.SWEEP_DELAY = trash.SWEEP_DELAY, 0.0
    try:
        yield
    finally:
        trash.SWEEP_DELAY = delay


async def main_async(pool_dir, fstype):
    """Set the pool up, run the tour, and show that nothing is left."""
    began = time.perf_counter()
    pool = ReflinkPool(
        name="demo",
        dir_path=pool_dir,
        revisions_to_keep="2",
        setup_check=str(fstype != "dir"),
    )
    await pool.setup()
    print(
        f"pool 'demo' on {fstype} at {pool_dir} set up in "
        f"{since(began):.1f} ms; config: {pool.config}"
    )
    with sweeping_at_once():
        await tour(pool)
        began = time.perf_counter()
        await pool.destroy()  # waits for any background work left
    print(f"\n== pool destroyed  ({since(began):.1f} ms); files left:")
    show_tree(pool.root)


def parse_args(argv):
    """The command line of ``make demo``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", maxsplit=1)[0]
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every file operation"
    )
    parser.add_argument(
        "--fs",
        choices=("auto", "btrfs", "xfs", "dir"),
        default="auto",
        help="where the throwaway pool lives: a loop-mounted btrfs or XFS "
        "(as root), or a plain temporary directory; auto (the default) "
        "takes the first of these that can be made here",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Entry point of ``make demo``."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="    qubes.storage.reflink: %(message)s",
    )
    with contextlib.ExitStack() as stack:
        if args.fs == "auto":
            fstype, directory = best_filesystem(stack)
        else:
            fstype, directory = args.fs, explicit_filesystem(stack, args.fs)
        asyncio.run(main_async(os.path.join(directory, "demo-pool"), fstype))
    print(f"\nthe throwaway pool ({fstype}) was removed; demo done")


if __name__ == "__main__":
    main()
