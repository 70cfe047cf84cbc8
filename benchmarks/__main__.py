"""Run the benchmark: ``python3 -m benchmarks [--reps N] [--quick]
[--only SCENARIO,...]``.

Scenarios: origin (start and stop of origin volumes at every image: the
picture), snapshot (AppVM root and disposable starts), export (export and
revert), import (btrfs->xfs import_volume; and both ways beside the core
driver's import_volume), many (--vms VMs started and
stopped at once), spares (spares at scale: reflinks of a template root of
--spares-extents extents, and --vms AppVMs of it), boot (boot storms: up
to --vms AppVMs of such a template started together, by subvolume
snapshots and by clones), aging (a 1 GiB image aged by --aging-rounds
rounds of random writes, then defragmented: extents, clones, reads, space,
starts during a defragmentation, a boot storm of --vms AppVMs).
"""

import argparse
import asyncio
import contextlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# the loop-mounted filesystems and volume helpers of the tests
sys.path.insert(0, os.path.join(REPO, "tests"))

# pylint: disable=wrong-import-position
from loopfs import loop_filesystem, unavailable_reason  # noqa: E402

from . import report  # noqa: E402
from .aging import draw as draw_aging  # noqa: E402
from .images import GIB  # noqa: E402

FS_SIZE = 24 * GIB
SCENARIOS = (
    "origin",
    "snapshot",
    "export",
    "import",
    "many",
    "spares",
    "boot",
    "aging",
)


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks", description=__doc__
    )
    parser.add_argument(
        "--reps", type=int, default=9, help="repetitions per measurement"
    )
    parser.add_argument("--vms", type=int, default=40, help="VMs at once")
    parser.add_argument(
        "--vm-reps", type=int, default=3, help="repetitions of the VM run"
    )
    parser.add_argument(
        "--levels",
        default="3000,10000,30000",
        help="extent counts of the fragmented images (comma-separated)",
    )
    parser.add_argument(
        "--fs", default="btrfs,xfs", help="filesystems (comma-separated)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help="run only these scenarios (comma-separated; default all: "
        + ",".join(SCENARIOS)
        + ")",
    )
    parser.add_argument(
        "--spares-reps",
        type=int,
        default=5,
        help="repetitions per line of the spares scenario",
    )
    parser.add_argument(
        "--spares-extents",
        type=int,
        default=30000,
        help="extents of the template root of the spares and boot scenarios",
    )
    parser.add_argument(
        "--aging-rounds",
        type=int,
        default=20,
        help="rounds of 2,500 random 4 KiB writes that age the image",
    )
    parser.add_argument(
        "--results",
        default=os.path.join(HERE, "results"),
        help="directory for latest.json, latency.png, latest.md",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 3 repetitions (spares: 2), 10 VMs, 5k extents",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when a target of the issue is missed",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.vms, args.vm_reps = 3, 10, 1
        args.levels = "1000,5000"
        args.spares_reps, args.spares_extents = 2, 5000
        args.aging_rounds = 4
    args.levels = [int(level) for level in args.levels.split(",") if level]
    args.fs = [name for name in args.fs.split(",") if name]
    args.only = {name for name in args.only.split(",") if name}
    unknown = args.only - set(SCENARIOS)
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(sorted(unknown))}; "
            f"choose among {', '.join(SCENARIOS)}"
        )
    if not args.levels:
        parser.error("--levels: give at least one extent count")
    return args


async def run(args, mounts):
    """Every measurement; returns (rows, curves, boot storm curves, aging
    stages)."""
    # pylint: disable=import-outside-toplevel
    from . import scenarios
    from .aging import aging
    from .bootstorm import boot_storms
    from .coreimport import import_side_by_side
    from .spares import spares_at_scale

    from .aging import aging

    rows, curves, benches, storms, aged = [], {}, {}, {}, {}
    single = args.only & {"origin", "snapshot", "export"}
    for fstype, mountpoint in mounts.items():
        bench = scenarios.FilesystemBench(
            fstype, mountpoint, args.reps, args.levels
        )
        benches[fstype] = bench
        if single:
            bench.build_images(curve="origin" in single)
            await bench.run(single)
            rows += bench.rows
            if bench.curve:
                curves[fstype] = bench.curve
    if "import" in args.only and "btrfs" in mounts and "xfs" in mounts:
        benches["btrfs"].base_images()
        rows += await scenarios.cross_filesystem_import(
            mounts["btrfs"], mounts["xfs"], max(3, args.reps - 2)
        )
        for src, dst in (("btrfs", "xfs"), ("xfs", "btrfs")):
            benches[src].base_images()
            rows += await import_side_by_side(
                src, mounts[src], dst, mounts[dst], max(3, args.reps - 2)
            )
    if "many" in args.only:
        for fstype, bench in benches.items():
            bench.base_images()
            rows += await scenarios.many_vms(
                fstype,
                mounts[fstype],
                bench.images["random-1g"],
                args.vms,
                args.vm_reps,
                args.reps,
            )
    if "spares" in args.only:
        for fstype, mountpoint in mounts.items():
            rows += await spares_at_scale(
                fstype,
                mountpoint,
                args.spares_extents,
                args.vms,
                args.spares_reps,
            )
    if "boot" in args.only:
        for fstype, mountpoint in mounts.items():
            more, storms[fstype] = await boot_storms(
                fstype,
                mountpoint,
                args.spares_extents,
                args.vms,
                args.vm_reps,
            )
            rows += more
    if "aging" in args.only:
        for fstype, mountpoint in mounts.items():
            more, stages = await aging(
                fstype, mountpoint, args.reps, args.aging_rounds, args.vms
            )
            rows += more
            aged[fstype] = stages
    return rows, curves, storms, aged


def main(argv=None):
    """Mount, measure, report; exit status 1 if a target was missed."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for fstype in args.fs:
        reason = unavailable_reason(fstype)
        if reason:
            sys.exit(f"benchmarks: cannot make {fstype}: {reason}")
    started = time.perf_counter()
    load_start = report.loadavg()
    with contextlib.ExitStack() as stack:
        mounts = {
            fstype: stack.enter_context(loop_filesystem(fstype, size=FS_SIZE))
            for fstype in args.fs
        }
        rows, curves, storms, aged = asyncio.run(run(args, mounts))
    document = {
        "date": report.now(),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": dict(report.machine(), loadavg_start=load_start),
        "reps": args.reps,
        "vms": args.vms,
        "vm_reps": args.vm_reps,
        "spares_reps": args.spares_reps,
        "scenarios": sorted(args.only),
        "results": rows,
        "curves": curves,
        "boot_storms": storms,
        "aging": aged,
    }
    print()
    print(report.text_tables(rows))
    report.write_json(os.path.join(args.results, "latest.json"), document)
    picture = None
    if curves:
        report.draw(os.path.join(args.results, "latency.png"), curves)
        picture = "benchmarks/results/latency.png"
    if storms:
        report.draw_boot_storms(
            os.path.join(args.results, "bootstorm.png"), storms
        )
    if aged:
        draw_aging(os.path.join(args.results, "aging.png"), aged)
    report.write_markdown(
        os.path.join(args.results, "latest.md"),
        report.markdown(document, picture),
    )
    failed = [r for r in rows if r.get("pass") is False]
    print(
        f"\n{len(rows)} results, {len(failed)} targets missed; "
        f"written to {args.results}"
    )
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
