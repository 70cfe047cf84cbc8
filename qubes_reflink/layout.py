"""On-disk naming of a pool's files: the one place that knows file names.

The layout is drop-in compatible with the ``file`` driver and with pools
of the file-reflink driver that ships with Qubes::

    <dir_path>/<vid>.img                    committed image
    <dir_path>/<vid>-dirty.img              image attached to the running VM
    <dir_path>/<vid>.img.<N>@<timestamp>Z   revision N
    <dir_path>/<vid>.img@<timestamp>Z       revision named the older way

where vid is ``appvms/<vm>/<volume>`` or ``vm-templates/<vm>/<volume>``.
Every other file the driver makes is ``<vid>.img~<kind>.<token>`` (or
``<vid>.img~running``; ``<vid>.img~base`` of older versions;
``<vid>.img~pin.<revision id>`` and ``<vid>.img~revert.<revision id>``,
empty markers): the ``~`` can appear in no
volume or VM name, so these names can never be taken for an image or a
revision, and they still match the ``*.img*`` patterns that keep loop
devices private to dom0.  On btrfs, three of them are subvolumes (see
`subvolumes`): ``~snapbase.<key>`` (read-only, the committed image of one
version, to snapshot from), ``~snaptmp.<token>`` (one being filled),
``~ready.<key>`` (a snapshot volume's next running image, a snapshot of
its source's snapbase made in the background) and ``~running`` (a
snapshot volume's running image, ``image.img`` in it).  Beside the
VM directories the pool holds only throwaway probe files (`probe_path`) and
the trash of discarded images (`trash_path`).
"""

import os
import re
import secrets
import stat
from typing import NamedTuple

#: The only VM directory prefixes dom0's udev rules hide loop devices for.
DIR_PREFIXES = ("appvms", "vm-templates")

_VM_NAME = r"[A-Za-z][A-Za-z0-9_.-]{0,30}"
_VOLUME_NAME = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}"
_TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"
_TOKEN = r"[A-Za-z0-9_-]+"

#: Volume names that would collide with names of other volumes' files.
RESERVED_SUFFIXES = ("-dirty", "-cow", "-import", "-precache")

#: What a revision id may contain (the host's own restriction).
REVISION_ID = re.compile(r"[A-Za-z0-9:_.-]{1,64}\Z")

# Kinds of files, as `classify` names them.
COMMITTED = "committed"
DIRTY = "dirty"
REVISION = "revision"
TEMP = "tmp"
EXPORT = "export"
IMPORT = "import"
SPARE = "spare"
BASE = "base"
COW = "cow"
CORE_LEFTOVER = "core-leftover"
SNAPBASE = "snapbase"
SNAPTEMP = "snaptmp"
READY = "ready"
RUNNING = "running"
PIN = "pin"
REVERT = "revert"
#: Kinds that are btrfs subvolumes (directories), not files.
SUBVOLUME_KINDS = (SNAPBASE, SNAPTEMP, READY, RUNNING)
#: The image file inside a subvolume of the layout.
SUBVOLUME_IMAGE = "image.img"

_PATTERNS = (
    (DIRTY, re.compile(rf"(?P<vol>{_VOLUME_NAME})-dirty\.img\Z")),
    (COW, re.compile(rf"(?P<vol>{_VOLUME_NAME})-cow\.img.*\Z")),
    (
        CORE_LEFTOVER,
        re.compile(
            rf"(?P<vol>{_VOLUME_NAME})-(?P<detail>precache|import)\.img\Z"
        ),
    ),
    (COMMITTED, re.compile(rf"(?P<vol>{_VOLUME_NAME})\.img\Z")),
    (
        REVISION,
        re.compile(
            rf"(?P<vol>{_VOLUME_NAME})\.img"
            rf"(?:\.(?P<number>[0-9]{{1,18}}))?@(?P<ts>{_TIMESTAMP})Z\Z"
        ),
    ),
    (
        "internal",
        re.compile(
            rf"(?P<vol>{_VOLUME_NAME})\.img~"
            rf"(?P<kind>tmp|export|import|spare|snapbase|snaptmp|ready)"
            rf"\.(?P<detail>{_TOKEN})\Z"
        ),
    ),
    (
        BASE,
        re.compile(
            rf"(?P<vol>{_VOLUME_NAME})\.img~base(?:\.(?P<detail>{_TOKEN}))?\Z"
        ),
    ),
    (RUNNING, re.compile(rf"(?P<vol>{_VOLUME_NAME})\.img~running\Z")),
    (
        "marker",
        re.compile(
            rf"(?P<vol>{_VOLUME_NAME})\.img~(?P<kind>pin|revert)"
            r"\.(?P<detail>[A-Za-z0-9:_.-]{1,64})\Z"
        ),
    ),
)


class LayoutError(ValueError):
    """A name that can't be part of the pool layout; says why."""


class Entry(NamedTuple):
    """A file name of the layout, taken apart."""

    volume: str
    kind: str
    detail: str = ""  # revision id, spare key, core leftover kind or token


class Revision(NamedTuple):
    """One revision of a volume, as found on disk."""

    id: str
    timestamp: str
    path: str
    number: int  # 0 for revisions named the older way


def classify(filename):
    """The `Entry` for `filename`, or None if the layout has no such name."""
    for kind, pattern in _PATTERNS:
        match = pattern.match(filename)
        if match is None:
            continue
        fields = match.groupdict()
        if kind in ("internal", "marker"):
            return Entry(fields["vol"], fields["kind"], fields["detail"])
        if kind == REVISION:
            rev_id = fields["number"] or fields["ts"]
            return Entry(fields["vol"], REVISION, rev_id)
        return Entry(fields["vol"], kind, fields.get("detail") or "")
    return None


def revision_timestamp(filename):
    """The timestamp part of a revision's file name."""
    return filename.rsplit("@", 1)[1][:-1]


def check_vid(vid):
    """Return `vid` if it names a volume this layout can hold, else raise.

    Only ``<prefix>/<vm>/<volume>`` with a known prefix is accepted: that
    keeps every file under dir_path (no ``..``, no absolute path) and under
    the patterns that hide loop devices from other qubes.
    """
    if not isinstance(vid, str):
        raise LayoutError(f"volume id {vid!r} is not a string")
    parts = vid.split("/")
    hint = (
        "a volume id is 'appvms/<vm>/<volume>' or "
        "'vm-templates/<vm>/<volume>', with a Qubes VM name and a volume "
        "name of letters, digits, '_' and '-'"
    )
    shown = vid if len(vid) <= 80 else vid[:77] + "..."
    if len(parts) != 3:
        raise LayoutError(f"invalid volume id {shown!r}: {hint}")
    prefix, vm_name, volume_name = parts
    if prefix not in DIR_PREFIXES:
        raise LayoutError(
            f"invalid volume id {shown!r}: unknown directory {prefix!r} "
            f"(only {', '.join(DIR_PREFIXES)} keep its loop devices private "
            "to dom0)"
        )
    if not re.fullmatch(_VM_NAME, vm_name):
        raise LayoutError(f"invalid VM name in volume id {shown!r}: {hint}")
    if not re.fullmatch(_VOLUME_NAME, volume_name):
        raise LayoutError(f"invalid volume name in volume id {shown!r}: {hint}")
    if volume_name.endswith(RESERVED_SUFFIXES):
        raise LayoutError(
            f"invalid volume name in volume id {shown!r}: names ending in "
            f"{', '.join(RESERVED_SUFFIXES)} would collide with the files of "
            "another volume"
        )
    return vid


def make_vid(dir_prefix, vm_name, volume_name):
    """The conventional vid of a VM's volume, checked."""
    return check_vid(f"{dir_prefix}/{vm_name}/{volume_name}")


def check_revision_id(revision):
    """Return `revision` if it has the form of a revision id, else raise."""
    if not isinstance(revision, str) or not REVISION_ID.match(revision):
        raise LayoutError(
            f"invalid revision id {revision!r}: revision ids consist of "
            "letters, digits and ':-_.'; list them with "
            "'qvm-volume info VM:VOLUME revisions'"
        )
    return revision


def spare_key(stat_result):
    """Identity of a committed image, as a spare's name records it.

    Committed images are never modified in place, so inode, mtime and size
    together identify one committed version of the data.
    """
    return (
        f"{stat_result.st_ino}-{stat_result.st_mtime_ns}-"
        f"{stat_result.st_size}"
    )


_PROBE_PREFIX = f".qubes-reflink-probe.img~{TEMP}."


def probe_path(directory):
    """A fresh name for a throwaway file that tests what `directory` can do."""
    return os.path.join(directory, _PROBE_PREFIX + secrets.token_hex(8))


def probe_leftovers(directory):
    """Probe files that a process killed while probing left in `directory`."""
    return _entries(
        directory,
        lambda name: name.startswith(_PROBE_PREFIX)
        and re.fullmatch(_TOKEN, name[len(_PROBE_PREFIX) :]),
    )


#: What a look at a listed name raises when the name is gone: qubesd
#: renames spares into place and empties the trash in the background, so
#: a file or directory listed a moment ago may have been renamed or
#: removed, or its directory replaced.  Any other error is a real one.
VANISHED = (FileNotFoundError, NotADirectoryError)


def listdir(directory):
    """The names in `directory` (unsorted, as `os.listdir`), or none if it
    is gone: a directory removed while it is looked at lists as empty."""
    try:
        return os.listdir(directory)
    except VANISHED:
        return []


def _is_real_dir(path):
    """Whether `path` is a directory and not a symbolic link to one.

    One lstat, so that the answer is about one file even if the name is
    replaced meanwhile; a name that is gone is no directory.
    """
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except VANISHED:
        return False


def _entries(directory, wanted):
    """Paths of the entries of `directory` whose names `wanted` accepts,
    sorted; none if `directory` is missing."""
    names = sorted(listdir(directory))
    return [os.path.join(directory, name) for name in names if wanted(name)]


#: Directory of the pool where discarded images wait to be deleted.
TRASH_DIR = ".qubes-reflink-trash"
_TRASH_NAME = re.compile(r"[0-9a-f]{16}\.discarded\Z")


def trash_dir(pool_dir):
    """The pool's trash directory."""
    return os.path.join(pool_dir, TRASH_DIR)


def trash_path(pool_dir):
    """A fresh name in the pool's trash for a discarded image.

    The trash lies beside the VM directories, not in them: a VM directory
    shows its final state as soon as an operation returns, and a VM
    directory can be removed while its discarded images are deleted.  The
    name matches none of the image patterns (``*.img*``).
    """
    return os.path.join(
        trash_dir(pool_dir), f"{secrets.token_hex(8)}.discarded"
    )


def trash_entries(pool_dir):
    """The discarded images waiting in the pool's trash.

    Only names the driver gives (`trash_path`) count, and only in a real
    directory: a symbolic link planted there is never followed.
    """
    directory = trash_dir(pool_dir)
    # The sweep removes the directory once it is empty, maybe between the
    # lstat and the listing: both then see no directory, hence no entries.
    if not _is_real_dir(directory):
        return []
    return _entries(directory, _TRASH_NAME.fullmatch)


#: The pool's settings changed by ``qubes-reflink set`` (see `settings`).
SETTINGS_FILE = ".qubes-reflink-settings.json"


def settings_path(pool_dir):
    """The pool's settings file."""
    return os.path.join(pool_dir, SETTINGS_FILE)


def settings_temp(pool_dir):
    """A fresh temporary name for a rewrite of the settings file."""
    return os.path.join(
        pool_dir, f"{SETTINGS_FILE}~{TEMP}.{secrets.token_hex(8)}"
    )


def prefix_dirs(pool_dir):
    """The directories holding the VM directories of a pool."""
    return [os.path.join(pool_dir, prefix) for prefix in DIR_PREFIXES]


def volume_dirs(pool_dir):
    """The VM directories of a pool, as (dir_prefix, vm_name, path).

    Only real directories, no symbolic links; one removed while this runs
    is left out (or, if it goes after it was yielded, lists as empty).
    """
    for prefix in DIR_PREFIXES:
        top = os.path.join(pool_dir, prefix)
        for name in sorted(listdir(top)):
            path = os.path.join(top, name)
            if _is_real_dir(path):
                yield prefix, name, path


class Listing(NamedTuple):
    """What one volume has on disk, from one directory listing."""

    committed: bool
    dirty: bool
    base: dict  # source version key ("": a hard link) -> path
    revisions: list  # of Revision, oldest first
    spares: dict  # spare key -> path
    snapbases: dict  # committed version key -> subvolume path
    readies: dict  # source version key -> subvolume path
    snaptemps: list  # subvolumes being filled
    pins: dict  # revision id -> marker of a pinned revision
    reverts: dict  # revision id -> request to revert to it at stop
    running: bool  # a running image in a subvolume
    temps: list
    exports: list
    imports: list


class VolumeFiles:
    """The paths of one volume's files below a pool directory."""

    def __init__(self, pool_dir, vid):
        self.vid = check_vid(vid)
        prefix, vm_name, self.volume = self.vid.split("/")
        self.pool_dir = pool_dir
        self.directory = os.path.join(pool_dir, prefix, vm_name)
        stem = os.path.join(self.directory, self.volume)
        #: The committed image.
        self.committed = stem + ".img"
        #: The image attached to the running VM.
        self.dirty = stem + "-dirty.img"
        #: Hard link to the source image a running snapshot was taken from,
        #: as older versions of the driver made it (see `base_marker`).
        self.base = self.committed + "~" + BASE
        #: Subvolume holding a snapshot volume's running image (btrfs).
        self.running = self.committed + "~" + RUNNING
        #: The running image inside it.
        self.running_image = os.path.join(self.running, SUBVOLUME_IMAGE)

    def revision(self, number, timestamp):
        """Path of numbered revision `number` taken at `timestamp`."""
        return f"{self.committed}.{number}@{timestamp}Z"

    def _internal(self, kind, detail=None):
        return f"{self.committed}~{kind}.{detail or secrets.token_hex(8)}"

    def temp(self):
        """A fresh name for a file being written before it is published."""
        return self._internal(TEMP)

    def export(self):
        """A fresh name for an export snapshot."""
        return self._internal(EXPORT)

    def import_target(self):
        """A fresh name for the file an import writes into."""
        return self._internal(IMPORT)

    def spare(self, key):
        """Name of the prepared copy of the committed image `key` names."""
        return self._internal(SPARE, key)

    def base_marker(self, key):
        """Empty file naming the source version `key` a running snapshot
        was started from.  Not a hard link to it: a link or unlink of a
        name of the source's image waits while that image is being cloned
        (its spare), which made a stop right after a start wait too."""
        return self._internal(BASE, key)

    def snapbase(self, key):
        """Subvolume holding committed version `key`, to snapshot from."""
        return self._internal(SNAPBASE, key)

    def ready(self, key):
        """Subvolume ready to become the running image of a snapshot
        volume started from its source's version `key`."""
        return self._internal(READY, key)

    def pin(self, revision_id):
        """Empty file marking revision `revision_id` as pinned."""
        return f"{self.committed}~{PIN}.{revision_id}"

    def revert_request(self, revision_id):
        """Empty file asking for a revert to `revision_id` at the stop of
        the running volume."""
        return f"{self.committed}~{REVERT}.{revision_id}"

    @property
    def defrag_attribute(self):
        """The extended attribute of the VM directory that holds when this
        volume was last defragmented (an attribute: set in one step, no
        temporary file for a crash to leave)."""
        return f"user.qubes-reflink.defragmented.{self.volume}"

    def snaptemp(self):
        """A fresh name for a subvolume being filled to become a snapbase."""
        return self._internal(SNAPTEMP)

    def owns(self, path):
        """True if `path` is one of this volume's internal files."""
        entry = classify(os.path.basename(path))
        return (
            os.path.dirname(path) == self.directory
            and entry is not None
            and entry.volume == self.volume
        )

    def scan(self):
        """List this volume's files, classified, in one directory read."""
        found = _nothing_found()
        names = listdir(self.directory)  # no directory: no files
        own = (self.volume + ".", self.volume + "-")
        for name in names:
            # cheap prefix test first: other volumes' files need no regex
            entry = classify(name) if name.startswith(own) else None
            if entry is None or entry.volume != self.volume:
                continue
            path = os.path.join(self.directory, name)
            if entry.kind in (COMMITTED, DIRTY, RUNNING):
                found[entry.kind] = True
            elif entry.kind == REVISION:
                found[REVISION].append(_revision(entry.detail, name, path))
            elif entry.kind in (SPARE, SNAPBASE, READY, BASE, PIN, REVERT):
                found[entry.kind][entry.detail] = path
            elif entry.kind in (TEMP, EXPORT, IMPORT, SNAPTEMP):
                found[entry.kind].append(path)
        # revisions named the older way predate the numbered ones; numbers
        # give the order of retirement, as the core's driver orders them
        found[REVISION].sort(
            key=lambda rev: (rev.number > 0, rev.number, rev.timestamp)
        )
        return Listing(
            committed=found[COMMITTED],
            dirty=found[DIRTY],
            base=found[BASE],
            revisions=found[REVISION],
            spares=found[SPARE],
            snapbases=found[SNAPBASE],
            readies=found[READY],
            snaptemps=found[SNAPTEMP],
            pins=found[PIN],
            reverts=found[REVERT],
            running=found[RUNNING],
            temps=found[TEMP],
            exports=found[EXPORT],
            imports=found[IMPORT],
        )


def _nothing_found():
    """What `VolumeFiles.scan` fills in, by kind, before it looks."""
    found = {kind: False for kind in (COMMITTED, DIRTY, RUNNING)}
    found.update({kind: {} for kind in (BASE, SPARE, SNAPBASE, READY)})
    found.update({kind: {} for kind in (PIN, REVERT)})
    found.update({kind: [] for kind in (REVISION, SNAPTEMP, TEMP)})
    found.update({kind: [] for kind in (EXPORT, IMPORT)})
    return found


def _revision(rev_id, name, path):
    number = int(rev_id) if rev_id.isdigit() else 0
    return Revision(rev_id, revision_timestamp(name), path, number)


# -- names outside pool directories (used by the qubes-reflink tool) --------

#: Suffix of the backups of qubes.xml that `qubes-reflink migrate` writes.
XML_BACKUP_SUFFIX = ".qubes-reflink-backup"
_XML_BACKUP_STAMP = re.compile(
    r"\.(\d{8}T\d{6})(?:-(\d{1,6}))?" + re.escape(XML_BACKUP_SUFFIX)
)
#: What the host names its per-volume state files in /var/run/qubes (R4.2+).
VOLUME_STATE_PREFIX = "qubes-volume-state-"


def xml_backup(xml_path, stamp, number=0):
    """Backup name of `xml_path` for `stamp` (``YYYYmmddTHHMMSS``); the
    `number`-th one of that second, when several are made in one."""
    extra = f"-{number}" if number else ""
    return f"{xml_path}.{stamp}{extra}{XML_BACKUP_SUFFIX}"


def xml_backups(xml_path):
    """The existing backups of `xml_path`, oldest first."""
    directory, base = os.path.split(os.path.abspath(xml_path))
    found = []
    for name in os.listdir(directory):
        rest = name[len(base) :] if name.startswith(base) else ""
        match = _XML_BACKUP_STAMP.fullmatch(rest)
        if match:
            order = (match[1], int(match[2] or 0))
            found.append((order, os.path.join(directory, name)))
    return [path for _order, path in sorted(found)]


def xml_temp(xml_path):
    """A fresh temporary name beside `xml_path`, for an atomic rewrite."""
    directory, base = os.path.split(os.path.abspath(xml_path))
    return os.path.join(directory, f".{base}~{TEMP}.{secrets.token_hex(8)}")


def volume_state_prefix(pool_name):
    """Start of the names of the host's state files of `pool_name`'s
    volumes: one exists while such a volume is in use."""
    return f"{VOLUME_STATE_PREFIX}{pool_name}:"


def volume_state_vid(pool_name, filename):
    """The vid a state file of `pool_name` is about, or None if it is not
    one (``-`` is doubled and ``/`` written as ``-`` in these names)."""
    prefix = volume_state_prefix(pool_name)
    if not filename.startswith(prefix):
        return None
    escaped = filename[len(prefix) :]
    return re.sub("--|-", lambda m: "-" if m[0] == "--" else "/", escaped)
