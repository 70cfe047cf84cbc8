"""The benchmark of issue 3: `python3 -m benchmarks` (or `make bench`).

It makes loop-mounted btrfs and XFS filesystems for the run, measures the
driver through its public API against the floor (a bare rename + directory
fsync) and a plain clone measured in the same run, prints a table and
writes benchmarks/results/latest.json, benchmarks/results/latency.png and
benchmarks/results/latest.md (the README section).  Needs root.
"""
