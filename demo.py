"""A scripted tour of the file-reflink driver on a throwaway pool.

It walks a template, an AppVM based on it and a disposable VM through
their lives (create, start, write, stop, template update, revert, export,
remove) the way qubesd drives the driver, printing the pool's files and the
time of each step.  As root it uses a loop-mounted btrfs; otherwise a
temporary directory without reflinks (setup_check=no).

Run it with ``make demo`` (or ``python3 demo.py -v`` to see every file
operation as ``journalctl -fu qubesd`` would).
"""

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))

# pylint: disable=wrong-import-position
from loopfs import loop_filesystem, unavailable_reason  # noqa: E402

from qubes_reflink import ReflinkPool, layout  # noqa: E402

MIB = 1024**2


class VM:
    """What the driver needs of a VM: its name and directory prefix."""

    def __init__(self, name, dir_path_prefix="appvms"):
        self.name = name
        self.dir_path_prefix = dir_path_prefix


def show_tree(root):
    """Print the pool's files with apparent size and allocated bytes; the
    trash, emptied in the background, as one line."""
    trash = layout.trash_entries(root)
    for top, dirs, files in os.walk(root):
        dirs.sort()
        if top == layout.trash_dir(root):
            continue
        for name in sorted(files):
            path = os.path.join(top, name)
            stat = os.stat(path, follow_symlinks=False)
            print(
                f"    {os.path.relpath(path, root):58} "
                f"{stat.st_size // MIB:5} MiB  "
                f"{stat.st_blocks * 512 // 1024:7} KiB used"
            )
    if trash:
        print(
            f"    {layout.TRASH_DIR}/: {len(trash)} discarded images, to be "
            "deleted in the background"
        )


class Tour:
    """Runs the steps, timing each and showing the pool afterwards."""

    def __init__(self, pool):
        self.pool = pool

    async def step(self, title, *coroutines):
        """Run `coroutines` concurrently, as qubesd does for a VM's volumes."""
        began = time.perf_counter()
        results = await asyncio.gather(*coroutines)
        took = (time.perf_counter() - began) * 1000
        print(f"\n== {title}  ({took:.1f} ms)")
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
        "start AppVM 'work' (root from the template)", *each(work, "start")
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
        "start disposable VM (borrows ready spares)", *each(disp, "start")
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


@contextlib.contextmanager
def throwaway_pool_dir():
    """A btrfs on a loop device as root, else a temporary directory."""
    reason = unavailable_reason("btrfs")
    if reason is None:
        with loop_filesystem("btrfs") as mountpoint:
            yield os.path.join(mountpoint, "demo-pool"), True
        return
    print(
        f"WARNING: {reason}: using a plain temporary directory with "
        "setup_check=no; every clone below is a full copy.",
        file=sys.stderr,
    )
    directory = tempfile.mkdtemp(prefix="qubes-reflink-demo-")
    try:
        yield os.path.join(directory, "demo-pool"), False
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def main_async(pool_dir, reflinks):
    """Set the pool up, run the tour, and show that nothing is left."""
    began = time.perf_counter()
    pool = ReflinkPool(
        name="demo",
        dir_path=pool_dir,
        revisions_to_keep="2",
        setup_check=str(reflinks),
    )
    await pool.setup()
    print(
        f"pool 'demo' at {pool_dir} set up in "
        f"{(time.perf_counter() - began) * 1000:.1f} ms; config: {pool.config}"
    )
    await tour(pool)
    began = time.perf_counter()
    await pool.destroy()  # waits for the background work
    took = (time.perf_counter() - began) * 1000
    print(f"\n== background work finished: trash emptied  ({took:.1f} ms)")
    show_tree(pool.root)


def main():
    """Entry point of ``make demo``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every file operation"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="    qubes.storage.reflink: %(message)s",
    )
    with throwaway_pool_dir() as (pool_dir, reflinks):
        asyncio.run(main_async(pool_dir, reflinks))
    print("\nthe throwaway pool was removed; demo done")


if __name__ == "__main__":
    main()
