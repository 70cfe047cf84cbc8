#!/bin/sh
# Rename qubes-reflink's own `qubes.storage` entry point from file-reflink to
# qubes-reflink in its installed metadata (egg-info or dist-info
# entry_points.txt) under SITELIB.
#
# Why: Qubes R4.1 and later cores (distribution `qubes`, RPM qubes-core-dom0)
# register their own `file-reflink = qubes.storage.reflink:ReflinkPool`.
# qubesd refuses a driver name that two installed distributions register
# ("more than 1 implementation of 'file-reflink' found"), so installing our
# metadata unchanged on such a dom0 would break every file-reflink pool,
# including the default varlibqubes pool. The dom0 RPM therefore ships our
# driver as `qubes-reflink`. Only our own metadata is edited, never the core's.
#
# Usage: rename-entry-point.sh SITELIB
# Used by rpm_spec/qubes-reflink.spec.in (%install) and tests/test_packaging.py.
# Fails unless exactly one metadata directory of ours exists under SITELIB and
# its [qubes.storage] section registers file-reflink exactly once.
set -eu

FROM=file-reflink
TO=qubes-reflink
VALUE=qubes_reflink.pool:ReflinkPool

if [ "$#" -ne 1 ]; then
    echo "usage: $0 SITELIB" >&2
    exit 2
fi
sitelib=$1

found=
for meta in "$sitelib"/qubes_reflink-*.egg-info \
    "$sitelib"/qubes_reflink-*.dist-info; do
    [ -e "$meta/entry_points.txt" ] || continue
    if [ -n "$found" ]; then
        echo "$0: more than one qubes_reflink metadata under $sitelib" >&2
        exit 1
    fi
    found=$meta/entry_points.txt
done
if [ -z "$found" ]; then
    echo "$0: no qubes_reflink-*.egg-info/entry_points.txt under $sitelib" >&2
    exit 1
fi

# Rename the key of the one `file-reflink = ...` line of [qubes.storage];
# other sections and lines are copied unchanged.
tmp=$found.tmp
awk -v from="$FROM" -v to="$TO" -v value="$VALUE" '
    /^[ \t]*\[/ {
        section = $0
        gsub(/[ \t]/, "", section)
    }
    section == "[qubes.storage]" && index($0, "=") {
        key = substr($0, 1, index($0, "=") - 1)
        val = substr($0, index($0, "=") + 1)
        gsub(/^[ \t]+|[ \t]+$/, "", key)
        gsub(/^[ \t]+|[ \t]+$/, "", val)
        if (key == to) {
            clash++
        }
        if (key == from) {
            renamed++
            if (val != value) {
                bad = val
            }
            print to " = " val
            next
        }
    }
    { print }
    END {
        if (renamed != 1 || clash || bad != "") {
            printf "%s: expected one \"%s = %s\" and no \"%s\" in " \
                "[qubes.storage], found %d (%s) and %d\n", \
                "rename-entry-point", from, value, to, renamed, bad, clash \
                > "/dev/stderr"
            exit 1
        }
    }
' "$found" >"$tmp" || {
    rm -f "$tmp"
    exit 1
}
# Keep the original file mode; the file is rewritten in place.
cat "$tmp" >"$found"
rm -f "$tmp"
echo "$found: [qubes.storage] $FROM renamed to $TO"
