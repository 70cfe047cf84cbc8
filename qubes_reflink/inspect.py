"""Looking inside a pool directory while qubesd is stopped.

Pure functions returning data, for the ``qubes-reflink`` tool: what files
a pool holds and whether each is still needed (`scan_pool`), what is wrong
(`find_problems`) and how much space each volume takes (`disk_usage`).
Names are understood only through `layout`; nothing here changes a file.
"""

import os
import re
import stat
import subprocess
from typing import NamedTuple

from . import extents, judgement, layout

# What a file's state can be.
LIVE = "live"
STALE = "stale"
#: Temporary, export and import files are garbage unless qubesd is using
#: them right now, which an offline tool can't see.
STALE_IF_STOPPED = "stale if qubesd is stopped"
IN_USE = "in use by a loop device"
DAMAGED = "damaged"
UNKNOWN = "unknown"  # a file whose name is not part of the layout

#: Kinds whose files are VM images and should be mode 0600.
IMAGE_KINDS = (
    layout.COMMITTED,
    layout.DIRTY,
    layout.REVISION,
    layout.SPARE,
    layout.BASE,
    layout.RUNNING,
    layout.READY,
    layout.SNAPBASE,
)
_ORDER = IMAGE_KINDS + (
    layout.PIN,
    layout.REVERT,
    layout.SNAPTEMP,
    layout.TEMP,
    layout.EXPORT,
    layout.IMPORT,
    layout.CORE_LEFTOVER,
    layout.COW,
)


class FileInfo(NamedTuple):
    """One file found in a VM directory of the pool."""

    path: str
    vid: str  # "" for files whose name is not part of the layout
    kind: str  # a layout kind, or UNKNOWN
    detail: str  # revision id, spare key, token, core leftover kind
    stat: os.stat_result  # lstat: a symbolic link is not followed
    state: str  # LIVE, STALE, STALE_IF_STOPPED, IN_USE, DAMAGED or UNKNOWN
    verdict: judgement.Verdict = None  # the judgement of its name


class PoolScan(NamedTuple):
    """Every file of a pool's VM directories, by volume, and its trash."""

    pool_dir: str
    volumes: dict  # vid -> [FileInfo], committed image first
    unknown: list  # FileInfo of files the layout has no name for
    trash: list  # paths of discarded images not deleted yet


class Problem(NamedTuple):
    """Something `fsck` reports; `repair` says what --repair would do."""

    path: str
    code: str
    message: str
    repair: str  # REMOVE, CHMOD, REMOVE_COW or "" (report only)


REMOVE = "remove"
CHMOD = "chmod"
REMOVE_COW = "remove-cow"
REMOVE_SUBVOLUME = "remove-subvolume"


def loop_backing_files(sys_block="/sys/block"):
    """(st_dev, st_ino) of every file a loop device is attached to.

    Compared by inode, not by path, so that a file reached through another
    mount or a symbolic link still counts as in use.
    """
    found = set()
    try:
        names = os.listdir(sys_block)
    except FileNotFoundError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(
                os.path.join(sys_block, name, "loop", "backing_file"),
                encoding="utf-8",
                errors="surrogateescape",
            ) as backing:
                path = backing.read().rstrip("\n")
            found.add(_identity(os.stat(path)))
        except OSError:  # not attached, or its file is gone
            continue
    return found


def _identity(stat_result):
    return stat_result.st_dev, stat_result.st_ino


def qubesd_running(proc="/proc"):
    """Whether qubesd looks alive: its systemd unit is active, or a process
    is named qubesd (dom0 without systemd, or started by hand)."""
    try:
        if (
            subprocess.run(
                ["systemctl", "is-active", "--quiet", "qubesd"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                timeout=10,
            ).returncode
            == 0
        ):
            return True
    except (OSError, subprocess.TimeoutExpired):
        pass
    return bool(processes_named("qubesd", proc))


def processes_named(name, proc="/proc"):
    """Process ids whose command name (comm) is `name`."""
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "comm"), encoding="utf-8") as f:
                if f.read().strip() == name:
                    found.append(int(entry))
        except OSError:  # exited meanwhile
            continue
    return found


def _list_files(pool_dir):
    """(vid prefix, path, lstat, layout entry) of each file of the VM dirs.

    A subvolume of the layout (btrfs) counts as its image, ``image.img``
    in it (or as the directory itself while it holds none).

    qubesd may be at work meanwhile (spares renamed into place, images
    discarded, a VM's directory removed): a name gone by the time it is
    looked at is left out, as if listed a moment later, and so is a
    directory gone before it is listed.
    """
    for prefix, vm_name, directory in layout.volume_dirs(pool_dir):
        for name in sorted(layout.listdir(directory)):
            path = os.path.join(directory, name)
            try:
                stat_result = os.lstat(path)
            except layout.VANISHED:
                continue
            entry = layout.classify(name)
            if stat.S_ISDIR(stat_result.st_mode):
                if entry is None or entry.kind not in layout.SUBVOLUME_KINDS:
                    continue
                path, stat_result = _subvolume_image(path, stat_result)
            yield f"{prefix}/{vm_name}", path, stat_result, entry


def pool_images(pool_dir):
    """(vid, kind, path) of every regular image file the layout names in
    the pool's VM directories (committed, running, revisions, spares,
    snapbases, ready snapshots, exports...), subvolume images included."""
    for vm_dir, path, st, entry in _list_files(pool_dir):
        if entry is not None and stat.S_ISREG(st.st_mode):
            yield f"{vm_dir}/{entry.volume}", entry.kind, path


def _subvolume_image(path, dir_stat):
    """The image in the subvolume `path` and its lstat, or the directory
    itself when it holds none."""
    image = os.path.join(path, layout.SUBVOLUME_IMAGE)
    try:
        return image, os.lstat(image)
    except layout.VANISHED:
        return path, dir_stat


def scan_pool(pool_dir, attached=None):
    """Every file of the pool's VM directories, classified, with its state.

    `attached`: (st_dev, st_ino) of files loop devices use (default: read
    from /sys).  What each file of a volume is, `judgement` says, as it
    does for qubesd, from what an offline look can know: the committed
    image's version, whether a running image exists; not the exports in
    use, nor a snapshot volume's source.
    """
    if not os.path.isdir(pool_dir):
        raise NotADirectoryError(f"{pool_dir} is not a directory")
    if attached is None:
        attached = loop_backing_files()
    by_vid, unknown = {}, []
    for vm_dir, path, st, entry in _list_files(pool_dir):
        if entry is None:
            state = IN_USE if _identity(st) in attached else UNKNOWN
            unknown.append(FileInfo(path, "", UNKNOWN, "", st, state))
        else:
            vid = f"{vm_dir}/{entry.volume}"
            by_vid.setdefault(vid, []).append((path, st, entry))
    volumes = {
        vid: sorted(_judged(vid, found, attached), key=_sort_key)
        for vid, found in sorted(by_vid.items())
    }
    return PoolScan(pool_dir, volumes, unknown, layout.trash_entries(pool_dir))


def _judged(vid, found, attached):
    """FileInfo of each (path, lstat, entry) of one volume."""
    items = [_item(path, st, entry) for path, st, entry in found]
    verdicts = judgement.judge(items, _known(found))
    for path, st, entry in found:
        verdict = verdicts[path]
        state = IN_USE if _identity(st) in attached else _STATES[verdict.state]
        yield FileInfo(path, vid, entry.kind, entry.detail, st, state, verdict)


def _item(path, st, entry):
    regular = stat.S_ISREG(st.st_mode)
    return judgement.Item(
        path,
        entry.kind,
        entry.detail,
        links=st.st_nlink if regular else 1,
        regular=regular or entry.kind not in IMAGE_KINDS,
    )


def _known(found):
    """What an offline look knows of one volume besides its files."""
    kinds = {entry.kind: st for _path, st, entry in found}
    committed = kinds.get(layout.COMMITTED)
    if committed is not None and not stat.S_ISREG(committed.st_mode):
        committed = None
    return judgement.Known(
        committed=layout.spare_key(committed) if committed else None,
        source=judgement.UNKNOWN_SOURCE,
        running=layout.DIRTY in kinds or layout.RUNNING in kinds,
        in_use=None,
        revisions=frozenset(
            entry.detail
            for _path, _st, entry in found
            if entry.kind == layout.REVISION
        ),
    )


_STATES = {
    judgement.LIVE: LIVE,
    judgement.GARBAGE: STALE,
    judgement.UNSURE: STALE_IF_STOPPED,
    judgement.FOREIGN: STALE,
    judgement.DAMAGE: DAMAGED,
}


def _sort_key(info):
    """Images first, then revisions in the driver's order (older-style
    names first, then by number), then the rest."""
    if info.kind == layout.REVISION:
        name = os.path.basename(info.path)
        number = int(info.detail) if info.detail.isdigit() else 0
        stamp = layout.revision_timestamp(name)
        return (_ORDER.index(info.kind), number > 0, number, stamp)
    return (_ORDER.index(info.kind), False, 0, info.path)


def _of_kind(files, kind):
    return [info for info in files if info.kind == kind]


def _image(info):
    """Size facts of one file, for status."""
    if info is None:
        return None
    return {
        "path": info.path,
        "size": info.stat.st_size,
        "allocated": info.stat.st_blocks * 512,
        "mtime": int(info.stat.st_mtime),
        "mode": f"{stat.S_IMODE(info.stat.st_mode):04o}",
    }


def volume_status(files):
    """What status shows of one volume, as plain data (JSON-ready)."""
    committed = _of_kind(files, layout.COMMITTED)
    dirty = _of_kind(files, layout.DIRTY) + _of_kind(files, layout.RUNNING)
    pinned = {info.detail for info in _of_kind(files, layout.PIN)}
    reverts = _of_kind(files, layout.REVERT)
    revisions = []
    for info in _of_kind(files, layout.REVISION):
        entry = _image(info)
        entry["id"] = info.detail
        entry["timestamp"] = layout.revision_timestamp(
            os.path.basename(info.path)
        )
        entry["pinned"] = info.detail in pinned
        revisions.append(entry)
    others = [
        {
            "path": info.path,
            "kind": info.kind,
            "state": info.state,
            "size": info.stat.st_size,
            "allocated": info.stat.st_blocks * 512,
        }
        for info in files
        if info.kind not in _SHOWN_APART
    ]
    return {
        "vid": files[0].vid,
        "running": bool(dirty),
        "attached": any(info.state == IN_USE for info in dirty),
        "committed": _image(committed[0] if committed else None),
        "dirty": _image(dirty[0] if dirty else None),
        "revisions": revisions,
        "pending_revert": _newest(reverts),
        "other": others,
    }


#: Kinds status shows in fields of their own, not among the others.
_SHOWN_APART = (
    layout.COMMITTED,
    layout.DIRTY,
    layout.RUNNING,
    layout.REVISION,
    layout.PIN,
    layout.REVERT,
)


def _newest(reverts):
    """The revision id of the newest revert request, or None."""
    live = [info for info in reverts if info.state == LIVE]
    if not live:
        return None
    return max(live, key=lambda i: (i.stat.st_mtime_ns, i.detail)).detail


def find_problems(scan):
    """Everything fsck reports, in path order, with the repair it allows.

    Only files that are provably garbage while qubesd is stopped get
    REMOVE; committed images, running images and revisions never do.
    """
    problems = []
    for files in scan.volumes.values():
        problems += _volume_problems(files)
        for info in files:
            problems += _file_problems(info)
    problems += [
        Problem(
            path, "trash", "image a stop discarded, not deleted yet", REMOVE
        )
        for path in scan.trash
    ]
    return sorted(problems)


def pool_problems(pool_dir, with_subvolumes=False):
    """What fsck reports of the pool in `pool_dir`; `with_subvolumes`:
    also every subvolume of the pool (before switching to another driver),
    which a repair then removes."""
    scan = scan_pool(pool_dir)
    problems = find_problems(scan)
    if with_subvolumes:
        problems = sorted(set(problems + subvolume_removals(scan)))
    return problems


def _volume_problems(files):
    revisions = _of_kind(files, layout.REVISION)
    if revisions and not _of_kind(files, layout.COMMITTED):
        ids = ", ".join(info.detail for info in revisions)
        return [
            Problem(
                revisions[0].path,
                "orphan-revision",
                f"volume {files[0].vid} has revisions ({ids}) but no "
                "committed image; restore one with "
                "'qvm-volume revert' after qubesd starts",
                "",
            )
        ]
    return []


def _file_problems(info):
    problem = _judged_problem(info) if info.state != IN_USE else None
    if problem is None and info.kind in IMAGE_KINDS:
        problem = _image_problem(info)
    return [problem] if problem else []


#: What --repair may do to a file by its judgement.
_REPAIRS = {
    judgement.GARBAGE: REMOVE,
    judgement.UNSURE: REMOVE,
    judgement.FOREIGN: REMOVE_COW,
    judgement.DAMAGE: "",
}


def _judged_problem(info):
    """The problem `judgement` finds with a file, if any."""
    verdict = info.verdict
    if verdict.state not in _REPAIRS:
        return None
    path = info.path if verdict.state == judgement.FOREIGN else _removable(info)
    return Problem(path, verdict.code, verdict.reason, _REPAIRS[verdict.state])


def _image_problem(info):
    if not stat.S_ISREG(info.stat.st_mode):
        return None  # a damaged file: judged so, or in use
    mode = stat.S_IMODE(info.stat.st_mode)
    if mode != 0o600:
        return Problem(
            info.path, "mode", f"mode {mode:04o}, images should be 0600", CHMOD
        )
    return None


def subvolume_removals(scan):
    """What switching the pool to the file or core file-reflink driver
    removes first: every subvolume of the layout not in use (those drivers
    know none, and would fail on them when removing a VM), and the base
    link of a running image so removed."""
    removals = []
    for files in scan.volumes.values():
        gone = [
            info
            for info in files
            if info.kind in layout.SUBVOLUME_KINDS and info.state != IN_USE
        ]
        if any(info.kind == layout.RUNNING for info in gone):
            gone += _of_kind(files, layout.BASE)
        removals += [
            Problem(
                _removable(info),
                info.kind,
                (
                    "btrfs subvolume of this driver, unknown to other drivers"
                    if info.kind != layout.BASE
                    else "base marker of the running image removed with it"
                ),
                REMOVE_SUBVOLUME,
            )
            for info in gone
        ]
    return removals


def subvolume_of(info):
    """The subvolume to destroy to remove `info` (a subvolume kind), which
    names its image or the subvolume itself."""
    if stat.S_ISDIR(info.stat.st_mode):
        return info.path
    return os.path.dirname(info.path)


def _removable(info):
    """What a removal of `info` removes: a file, or its subvolume."""
    if info.kind in layout.SUBVOLUME_KINDS:
        return subvolume_of(info)
    return info.path


def disk_usage(scan, vids=None, progress=None):
    """Apparent, allocated, shared and exclusive bytes from extent maps.

    Per file (committed, running, each revision, ...), per volume and for
    the pool (or the volumes `vids`); sharing is judged within the files
    looked at and from the filesystem's own SHARED flags.  `progress(n)`
    is called after each volume's maps are read.  Raises KeyError for an
    unknown vid.  Every figure comes from one reading of each file's map,
    so that a file gone since the scan is in none of them (not in the
    pool's total but not its volume's, or the other way round).
    """
    chosen = list(scan.volumes) if not vids else list(vids)
    for vid in chosen:
        if vid not in scan.volumes:
            raise KeyError(vid)
    files = {
        vid: [
            i
            for i in scan.volumes[vid]
            if stat.S_ISREG(i.stat.st_mode) and i.kind not in _MARKERS
        ]
        for vid in chosen
    }
    maps = extents.ExtentMaps()
    for number, infos in enumerate(files.values(), 1):
        maps.add(info.path for info in infos)
        if progress:
            progress(number)
    per_file, total = maps.measure()
    volumes = [
        _du_volume(vid, infos, per_file, maps, _pinned(scan.volumes[vid]))
        for vid, infos in files.items()
    ]
    return {"volumes": volumes, "total": total._asdict()}


#: Empty files naming a revision: no data, no row in du.
_MARKERS = (layout.PIN, layout.REVERT)


def _pinned(files):
    return {info.detail for info in files if info.kind == layout.PIN}


def _du_volume(vid, infos, per_file, maps, pinned):
    """One volume's rows and total, of its files still there when read."""
    present = [info for info in infos if info.path in per_file]
    total = maps.measure(info.path for info in present)[1]
    rows = [_du_row(info, per_file[info.path], pinned) for info in present]
    return {"vid": vid, "files": rows, "total": total._asdict()}


def _du_row(info, usage, pinned):
    row = {
        "path": info.path,
        "kind": info.kind,
        "detail": info.detail,
        "state": info.state,
    }
    if info.kind == layout.REVISION:
        row["timestamp"] = layout.revision_timestamp(
            os.path.basename(info.path)
        )
        row["pinned"] = info.detail in pinned
    row.update(usage._asdict())
    return row


def _unescape_mount(field):
    """/proc/self/mounts writes space, tab, newline, backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_of(path, mounts="/proc/self/mounts"):
    """(mount point, filesystem type, source) of the mount holding `path`:
    the longest mount point that is a prefix of its real path."""
    real = os.path.realpath(path)
    best = ("", "", "")
    with open(mounts, encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            source, point, fstype = line.split()[:3]
            point = _unescape_mount(point)
            inside = (
                point == "/" or real == point or real.startswith(point + "/")
            )
            if inside and len(point) >= len(best[0]):
                best = (point, fstype, _unescape_mount(source))
    return best
