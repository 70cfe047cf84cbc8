"""Run the benchmark: ``python3 -m benchmarks [--reps N] [--quick]``."""

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# the loop-mounted filesystems and volume helpers of the tests
sys.path.insert(0, os.path.join(REPO, "tests"))

# pylint: disable=wrong-import-position
from loopfs import loop_filesystem, unavailable_reason  # noqa: E402

from . import report  # noqa: E402
from .images import GIB  # noqa: E402

FS_SIZE = 24 * GIB


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
        "--results",
        default=os.path.join(HERE, "results"),
        help="directory for latest.json, latency.png, latest.md",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 3 repetitions, 10 VMs, fewer extents",
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
    args.levels = [int(level) for level in args.levels.split(",") if level]
    args.fs = [name for name in args.fs.split(",") if name]
    return args


async def run(args, mounts):
    """Every measurement; returns (rows, curves)."""
    # pylint: disable=import-outside-toplevel
    from . import scenarios

    rows, curves, benches = [], {}, {}
    for fstype, mountpoint in mounts.items():
        bench = scenarios.FilesystemBench(
            fstype, mountpoint, args.reps, args.levels
        )
        bench.build_images()
        await bench.run()
        rows += bench.rows
        curves[fstype] = bench.curve
        benches[fstype] = bench
    if "btrfs" in mounts and "xfs" in mounts:
        rows += await scenarios.cross_filesystem_import(
            mounts["btrfs"], mounts["xfs"], max(3, args.reps - 2)
        )
    for fstype, bench in benches.items():
        floor = statistics.median(point["floor_ms"] for point in bench.curve)
        rows += await scenarios.many_vms(
            fstype,
            mounts[fstype],
            bench.images["random-1g"],
            args.vms,
            args.vm_reps,
            floor,
        )
    return rows, curves


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
        rows, curves = asyncio.run(run(args, mounts))
    document = {
        "date": report.now(),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": dict(report.machine(), loadavg_start=load_start),
        "reps": args.reps,
        "vms": args.vms,
        "vm_reps": args.vm_reps,
        "results": rows,
        "curves": curves,
    }
    print()
    print(report.text_table(rows))
    report.write_json(os.path.join(args.results, "latest.json"), document)
    picture = os.path.join(args.results, "latency.png")
    report.draw(picture, curves)
    report.write_markdown(
        os.path.join(args.results, "latest.md"),
        report.markdown(document, "benchmarks/results/latency.png"),
    )
    failed = [r for r in rows if r.get("pass") is False]
    print(
        f"\n{len(rows)} results, {len(failed)} targets missed; "
        f"written to {args.results}"
    )
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
