"""Fuzzing of the option parsers and of the layout's id checks.

Whatever they are given, the parsers either return a value of the promised
kind or raise StoragePoolException (options) / LayoutError (layout); any
other exception is a bug.  Accepted volume ids only ever lead to paths
inside the pool directory, and every file name the layout builds for a
volume classifies back to that volume and kind.
"""

import collections
import datetime
import os
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from qubes_reflink import layout, options
from qubes_reflink.host import StoragePoolException

FUZZ = settings(max_examples=400, deadline=None, database=None)
ROOT = "/var/lib/qubes/pool"

#: Anything qubes.xml, qvm-pool or a confused caller might hand over.
ANYTHING = st.one_of(
    st.text(),
    st.text(alphabet="0123456789+- \t\n._xeE", max_size=12),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

VM_NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", fullmatch=True)
VOLUME_NAME = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}", fullmatch=True)
PREFIX = st.sampled_from(layout.DIR_PREFIXES)
#: Text made of the pieces of paths and of the driver's file names.
PATHISH = st.lists(
    st.sampled_from(
        ["/", ".", "..", "-", "~", "@", "\0", "\n", "appvms", "vm-templates"]
        + ["a", "Z", "0", "_", " ", "é", "img", "dirty", "tmp", "*"]
    ),
    max_size=12,
).map("".join)
VIDISH = st.one_of(
    st.text(),
    PATHISH,
    st.builds(
        lambda *parts: "/".join(parts),
        st.one_of(PREFIX, PATHISH),
        st.one_of(VM_NAME, PATHISH),
        st.one_of(VOLUME_NAME, PATHISH),
    ),
    st.builds(lambda p, v, n: f"{p}/{v}/{n}", PREFIX, VM_NAME, VOLUME_NAME),
)
TIMESTAMP = st.datetimes(
    min_value=datetime.datetime(1970, 1, 1),
    max_value=datetime.datetime(9999, 12, 31),
).map(lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%S"))
FakeStat = collections.namedtuple("FakeStat", "st_ino st_mtime_ns st_size")

COUNTS = collections.Counter()


def outcome(func, *args):
    """("ok", result) or ("refused", message); any other exception fails."""
    try:
        return "ok", func(*args)
    except (StoragePoolException, layout.LayoutError) as err:
        assert str(err), "an error must say what is wrong"
        return "refused", str(err)


# -- options ------------------------------------------------------------------


@FUZZ
@given(ANYTHING)
def test_parse_bool(value):
    """True/False, or a clear error; exactly the documented words."""
    kind, result = outcome(options.parse_bool, value, "some_option")
    COUNTS["parse_bool"] += 1
    if isinstance(value, bool):
        assert (kind, result) == ("ok", value)
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            assert (kind, result) == ("ok", True)
        elif word in ("false", "no", "off", "0"):
            assert (kind, result) == ("ok", False)
        else:
            assert kind == "refused" and "some_option" in result
    else:
        assert kind == "refused" and "some_option" in result


def _expected_int(value):
    """The whole number `value` stands for, by the documented rules."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(
        r"[+-]?[0-9]+", value.strip(), re.ASCII
    ):
        return int(value.strip())
    return None


@FUZZ
@given(ANYTHING)
def test_parse_revisions_to_keep(value):
    """A whole number >= -1, or a clear error naming the option."""
    kind, result = outcome(options.parse_revisions_to_keep, value)
    COUNTS["parse_revisions_to_keep"] += 1
    number = _expected_int(value)
    if number is not None and number >= -1:
        assert (kind, result) == ("ok", number)
        assert isinstance(result, int) and not isinstance(result, bool)
    else:
        assert kind == "refused" and "revisions_to_keep" in result


@FUZZ
@given(st.integers(min_value=-1, max_value=10**6))
def test_parse_revisions_to_keep_round_trip(number):
    """What qubes.xml stores (str) parses back to the same number."""
    assert options.parse_revisions_to_keep(str(number)) == number
    assert options.parse_revisions_to_keep(number) == number


@FUZZ
@given(ANYTHING)
def test_parse_size(value):
    """A whole number of bytes that a file can have, or a clear error."""
    kind, result = outcome(options.parse_size, value)
    COUNTS["parse_size"] += 1
    number = _expected_int(value)
    if number is not None and 0 <= number <= 2**63 - 1:
        assert (kind, result) == ("ok", number)
    else:
        assert kind == "refused" and "size" in result


@FUZZ
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_parse_size_round_trip(number):
    """Any size a file can have survives str() (qubes.xml) and back."""
    assert options.parse_size(str(number)) == number


@FUZZ
@given(st.one_of(ANYTHING, PATHISH, PATHISH.map(lambda p: "/" + p)))
def test_parse_dir_path(value):
    """An absolute, normalised path without NUL, or a clear error."""
    kind, result = outcome(options.parse_dir_path, value)
    COUNTS["parse_dir_path"] += 1
    if kind == "ok":
        assert isinstance(value, str) and value.strip()
        assert os.path.isabs(result) and "\0" not in result
        assert result == os.path.normpath(value)
    else:
        assert "dir_path" in result
        assert (
            not isinstance(value, str)
            or not value.strip()
            or "\0" in value
            or not os.path.isabs(value)
        )


# -- layout ------------------------------------------------------------------


def _inside(path, root=ROOT):
    """`path` lies strictly below `root`, with no '..' or '.' detours."""
    return (
        os.path.normpath(path) == path
        and os.path.commonpath([root, path]) == root
        and path != root
    )


def _all_paths(files):
    """Every path the layout builds for one volume."""
    return [
        files.committed,
        files.dirty,
        files.base,
        files.revision(1, "2024-01-01T00:00:00"),
        files.temp(),
        files.export(),
        files.import_target(),
        files.spare("1-2-3"),
    ]


@FUZZ
@given(VIDISH)
def test_check_vid(vid):
    """Accepted vids keep every file inside the pool, in a VM directory of
    an allowed prefix; everything else is a LayoutError."""
    kind, _ = outcome(layout.check_vid, vid)
    COUNTS["check_vid"] += 1
    if kind == "refused":
        return
    prefix, vm_name, volume = vid.split("/")
    assert prefix in layout.DIR_PREFIXES
    assert vm_name not in (".", "..") and volume not in (".", "..")
    files = layout.VolumeFiles(ROOT, vid)
    assert files.directory == os.path.join(ROOT, prefix, vm_name)
    for path in _all_paths(files):
        assert _inside(path), path
        assert os.path.dirname(path) == files.directory
        assert "\0" not in path and "\n" not in path
        assert len(os.path.basename(path)) <= 255
        # dom0's udev rules hide loop devices of */appvms/*/*.img* only
        assert ".img" in os.path.basename(path)
        assert files.owns(path)


@FUZZ
@given(st.one_of(PREFIX, PATHISH), st.one_of(VM_NAME, PATHISH), VIDISH)
def test_make_vid(prefix, vm_name, volume):
    """make_vid accepts exactly what check_vid accepts of the joined id."""
    made = outcome(layout.make_vid, prefix, vm_name, volume)
    checked = outcome(layout.check_vid, f"{prefix}/{vm_name}/{volume}")
    COUNTS["make_vid"] += 1
    assert made[0] == checked[0]
    if made[0] == "ok":
        assert made[1] == f"{prefix}/{vm_name}/{volume}"


@FUZZ
@given(st.one_of(st.text(), PATHISH))
def test_classify_anything(name):
    """classify never raises; what it recognises names a valid volume."""
    entry = layout.classify(name)
    COUNTS["classify"] += 1
    if entry is not None:
        assert entry.kind in (
            layout.COMMITTED,
            layout.DIRTY,
            layout.REVISION,
            layout.TEMP,
            layout.EXPORT,
            layout.IMPORT,
            layout.SPARE,
            layout.BASE,
            layout.COW,
            layout.CORE_LEFTOVER,
        )
        assert "/" not in name and "\0" not in name
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}", entry.volume)


@FUZZ
@given(
    PREFIX,
    VM_NAME,
    VOLUME_NAME,
    st.integers(min_value=0, max_value=10**18 - 1),
    TIMESTAMP,
    st.builds(
        FakeStat,
        st.integers(min_value=0, max_value=2**64 - 1),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.integers(min_value=0, max_value=2**63 - 1),
    ),
)
def test_classify_round_trip(prefix, vm_name, volume, number, stamp, stat):
    """Every name the layout builds for a valid volume classifies back to
    that volume and kind, with its detail (revision id, spare key)."""
    kind, _ = outcome(layout.make_vid, prefix, vm_name, volume)
    if kind == "refused":  # a reserved suffix such as -dirty
        assert volume.endswith(layout.RESERVED_SUFFIXES)
        return
    files = layout.VolumeFiles(ROOT, f"{prefix}/{vm_name}/{volume}")
    key = layout.spare_key(stat)
    cases = [
        (files.committed, layout.COMMITTED, ""),
        (files.dirty, layout.DIRTY, ""),
        (files.base, layout.BASE, ""),
        (files.revision(number, stamp), layout.REVISION, str(number)),
        (f"{files.committed}@{stamp}Z", layout.REVISION, stamp),
        (files.spare(key), layout.SPARE, key),
    ]
    for path in (files.temp(), files.export(), files.import_target()):
        token = path.rsplit(".", 1)[1]
        kind = path.rsplit("~", 1)[1].split(".", 1)[0]
        cases.append((path, kind, token))
    for path, kind, detail in cases:
        COUNTS["classify round trip"] += 1
        entry = layout.classify(os.path.basename(path))
        assert entry == layout.Entry(volume, kind, detail), path
        assert _inside(path)
    name = os.path.basename(files.revision(number, stamp))
    assert layout.revision_timestamp(name) == stamp


@FUZZ
@given(st.one_of(ANYTHING, PATHISH, st.from_regex(r"[A-Za-z0-9:_.-]{1,70}")))
def test_check_revision_id(revision):
    """Accepted revision ids are 1-64 letters, digits and ':-_.'."""
    kind, result = outcome(layout.check_revision_id, revision)
    COUNTS["check_revision_id"] += 1
    if kind == "ok":
        assert result == revision
        assert re.fullmatch(r"[A-Za-z0-9:_.-]{1,64}", revision, re.ASCII)
    else:
        assert "revision" in result
        assert not (
            isinstance(revision, str)
            and re.fullmatch(r"[A-Za-z0-9:_.-]{1,64}", revision, re.ASCII)
        )


def test_zz_report(capsys):
    """Print how many inputs the fuzzers tried (run after the others)."""
    with capsys.disabled():
        print(f"\nfuzzed inputs: {dict(COUNTS)}")
