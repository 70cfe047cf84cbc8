"""import_volume across filesystems, this driver's beside the core's.

A VM cloned from a pool on another filesystem is a full copy (no reflink
crosses filesystems).  The core's own file-reflink driver does it with
``cp --sparse=always`` into a temporary file, an fsync and a rename; this
driver copies the data regions with copy_file_range (sendfile where the
kernel declines), fsyncs and commits.  Both import the same 1 GiB image
from the other filesystem, alternately, in the same run.

The core's driver runs in a child Python with the release's qubes-core-
admin tree on its path (tests/hosts.py finds the trees), so this process
keeps its driver bound to the stand-in; the tree is read, never copied.
"""

import json
import os
import subprocess
import textwrap

import hosts
from helpers import FakeVM, new_pool, origin

from .images import MIB
from .measure import median_ms, timed
from .scenarios import put_image, row

#: The host whose core driver is measured (R4.3, the newest release).
CORE_RELEASE = hosts.RELEASES[1]

_CORE_CHILD = textwrap.dedent("""
    import asyncio, json, os, sys, time
    tree, pool_dir, source, reps = sys.argv[1:5]
    sys.path[:0] = [tree, os.path.join(tree, "test-packages")]
    import qubes.storage.reflink as core
    import qubes.utils

    class VM:
        name, dir_path_prefix = "core-import", "appvms"

    class Source:  # what import_volume reads: an export of the source
        def export(self):
            return source
        def export_end(self, path):
            pass

    async def main():
        pool = core.ReflinkPool(name="core", dir_path=pool_dir,
                                setup_check=False)
        await qubes.utils.coro_maybe(pool.setup())
        volume = pool.init_volume(VM(), {"name": "private", "rw": True,
            "save_on_stop": True, "size": 1 << 20, "revisions_to_keep": 1})
        await qubes.utils.coro_maybe(volume.create())
        times = []
        for _ in range(int(reps)):
            start = time.perf_counter()
            await volume.import_volume(Source())
            times.append(time.perf_counter() - start)
        print(json.dumps(times))

    asyncio.run(main())
    """)


def drop_caches():
    """Write everything back, then empty the page cache: each import reads
    its source from the disk, as one from another disk in dom0 does."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as drop:
        drop.write("3\n")


def core_import_times(pool_dir, source, reps):
    """Seconds of each of `reps` core import_volume calls of `source`."""
    release = CORE_RELEASE
    env = hosts.host_environment(
        release,
        hosts.write_host_metadata(release.tree(), pool_dir + "-meta"),
    )
    result = subprocess.run(
        [
            release.interpreter(),
            "-c",
            _CORE_CHILD,
            release.tree(),
            pool_dir,
            source,
            str(reps),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


async def import_side_by_side(
    src_fstype, src_mount, dst_fstype, dst_mount, reps
):
    """Rows: this driver's import_volume of a 1 GiB image from `src_mount`
    into a pool on `dst_mount`, and the core driver's, in turns."""
    src_pool = await new_pool(src_mount, name=f"side-src-{dst_fstype}")
    dst_pool = await new_pool(dst_mount, name=f"side-dst-{dst_fstype}")
    image = os.path.join(src_mount, "images", "random")
    src = origin(src_pool, FakeVM("side-src"), size=os.stat(image).st_size)
    await src.create()
    await put_image(src_pool, src, image)
    dst = origin(dst_pool, FakeVM("side-dst"), size=MIB)
    await dst.create()
    ours, core = [], []
    core_dir = os.path.join(dst_mount, f"core-{src_fstype}")
    for _rep in range(reps):
        drop_caches()
        ours.append(await timed(dst.import_volume(src)))
        await dst_pool.wait_background()
        # the core driver reads what this driver reads: an export of the
        # source (a clone of its own), from a cold cache
        export = await src.export()
        drop_caches()
        core += core_import_times(core_dir, export, 1)
        await src.export_end(export)
    for pool in (src_pool, dst_pool):
        await pool.wait_background()
        await pool.close()
    where = f"{src_fstype}->{dst_fstype}"
    ratio = median_ms(ours) / median_ms(core)
    print(
        f"[{where}] import_volume of 1 GiB: this driver {median_ms(ours):.0f}"
        f" ms, the core driver {median_ms(core):.0f} ms ({ratio:.2f} x)",
        flush=True,
    )
    ours_row = row(where, "import_volume, this driver", ours)
    ours_row.update(
        image="random-1g",
        x_core=round(ratio, 2),
        target="median <= the core driver's",
        got=f"{ratio:.2f} x the core driver's (<= 1.0)",
        **{"pass": ratio <= 1.0},
    )
    core_row = row(
        where, f"import_volume, the core driver ({CORE_RELEASE.tag})", core
    )
    core_row["image"] = "random-1g"
    return [ours_row, core_row]
