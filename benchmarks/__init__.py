"""The benchmark of issues 3 and 9: `python3 -m benchmarks` (or `make bench`).

It makes loop-mounted btrfs and XFS filesystems for the run, measures the
driver through its public API against the thread floor (a rename +
directory fsync run through asyncio.to_thread, beside the bare one) and a
plain clone measured in the same run, measures what reflinks of a template
root cost at scale (spares at scale), prints a table and writes
benchmarks/results/latest.json, benchmarks/results/latency.png and
benchmarks/results/latest.md (the README section).  Needs root.
"""
