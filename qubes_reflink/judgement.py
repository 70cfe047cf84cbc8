"""What each file of a volume is: live, garbage, or damage.

One pure function, `judge`, decides it for the driver at run time (what a
volume's operation cleans up under its lock) and for the ``qubes-reflink``
tool offline (what `status` shows and `fsck` reports and repairs), so the
two can never disagree.  It reads no file: the caller gives the listing of
the volume's directory and what it knows of the volume.

The caller's knowledge differs in two ways only.  Under the volume's lock
qubesd knows which exports and imports are in use; an offline tool does
not, so for it such files are garbage only if qubesd is stopped.  qubesd
knows a snapshot volume's source; the tool reads no qubes.xml, so for it a
ready snapshot's version is unknown and the snapshot counts as live.
"""

from typing import NamedTuple

from . import layout

LIVE = "live"
GARBAGE = "garbage"
#: Garbage unless qubesd uses it right now (only an offline look says so).
UNSURE = "garbage unless in use"
DAMAGE = "damage"
#: A file of the `file` driver: this driver never touches it.
FOREIGN = "foreign"

#: `Known.source` when the source's version can't be known (offline).
UNKNOWN_SOURCE = "?"


class Item(NamedTuple):
    """One file of the volume, as listed."""

    path: str
    kind: str  # a layout kind
    detail: str = ""  # spare/snapbase/ready/base key, revision id, token
    links: int = 1  # hard links of a spare (other kinds: not looked at)
    regular: bool = True  # an image kind that is a regular file


class Known(NamedTuple):
    """What the caller knows of the volume besides its files."""

    #: key (`layout.spare_key`) of the committed image spares and snapbases
    #: are kept for; None: none is (no committed image, or a snapshot
    #: volume, which keeps none of its own)
    committed: str = None
    #: key of the source's committed version a ready snapshot must have;
    #: None: the source has none; UNKNOWN_SOURCE: can't be known
    source: str = UNKNOWN_SOURCE
    running: bool = False  # a running image exists
    #: exports and imports in use; None: unknown (qubesd may be using any)
    in_use: frozenset = None
    #: ids of the volume's revisions (what pins and revert requests name)
    revisions: frozenset = frozenset()


class Verdict(NamedTuple):
    """The judgement of one file, with the reason a person reads."""

    state: str  # LIVE, GARBAGE, UNSURE, DAMAGE or FOREIGN
    reason: str
    code: str = ""  # what `fsck` calls it, unless it is live


_ALWAYS_LIVE = {
    layout.COMMITTED: "committed image",
    layout.REVISION: "revision",
    layout.DIRTY: "running image",
    layout.RUNNING: "running image (btrfs subvolume)",
}

_TEMPORARY = {
    layout.TEMP: "incomplete temporary file",
    layout.SNAPTEMP: "unfinished snapshot base (btrfs subvolume)",
    layout.EXPORT: "export snapshot left behind",
    layout.IMPORT: "unfinished import",
}


def judge(items, known):
    """{path: Verdict} for every item of one volume."""
    return {item.path: _judge_one(item, known) for item in items}


def _judge_one(item, known):
    if item.kind in _ALWAYS_LIVE:
        verdict = Verdict(LIVE, _ALWAYS_LIVE[item.kind])
    elif item.kind in _TEMPORARY:
        verdict = _temporary(item, known)
    else:
        verdict = _BY_KIND.get(item.kind, _versioned)(item, known)
    if verdict.state == LIVE and not item.regular:
        return Verdict(DAMAGE, "not a regular file (left alone)", "not-regular")
    return verdict


def _temporary(item, known):
    what = _TEMPORARY[item.kind]
    if known.in_use is None:
        return Verdict(UNSURE, what, item.kind)
    if item.kind in (layout.EXPORT, layout.IMPORT) and item.path in (
        known.in_use
    ):
        return Verdict(LIVE, f"{item.kind} in use")
    return Verdict(GARBAGE, what, item.kind)


def _core_leftover(item, _known):
    # left by the core driver: qubesd may be that driver right now
    return Verdict(
        UNSURE,
        f"{item.detail} leftover of the core file-reflink driver",
        layout.CORE_LEFTOVER,
    )


def _cow(_item, _known):
    return Verdict(
        FOREIGN, "copy-on-write image of the 'file' driver", layout.COW
    )


def _base(_item, known):
    if known.running:
        return Verdict(LIVE, "base marker of the running image")
    return Verdict(
        GARBAGE, "base marker of a volume that is not running", "stale-base"
    )


def _ready(item, known):
    if known.source in (UNKNOWN_SOURCE, item.detail):
        return Verdict(LIVE, "ready snapshot of the source's version")
    return Verdict(
        GARBAGE, "ready snapshot of an older source version", "stale-ready"
    )


def _versioned(item, known):
    """Spares and snapbases: each is of one version of the committed
    image, and worth keeping only while that version is current."""
    if item.kind == layout.SPARE and item.links > 1:
        # the state a power cut leaves after a start took the spare on
        # btrfs (docs/DESIGN.md): the other name is a VM's image now
        return Verdict(
            GARBAGE,
            "spare with a second name (a VM's image since a start took "
            "it): only this name is removed",
            "linked-spare",
        )
    if known.committed is not None and item.detail == known.committed:
        return Verdict(LIVE, f"{item.kind} of the committed image")
    what = {
        layout.SPARE: "spare",
        layout.SNAPBASE: "snapshot base (btrfs subvolume)",
    }[item.kind]
    return Verdict(
        GARBAGE,
        f"{what} of no current committed image of its volume",
        f"stale-{item.kind}",
    )


def _marker(item, known):
    """A pin or a pending revert names a revision: worth keeping while it
    exists (a revert to an unpinned revision renames it away)."""
    what = {layout.PIN: "pin", layout.REVERT: "revert request"}[item.kind]
    if item.detail in known.revisions:
        return Verdict(LIVE, f"{what} of revision {item.detail}")
    return Verdict(
        GARBAGE, f"{what} of no revision of its volume", f"stale-{item.kind}"
    )


_BY_KIND = {
    layout.PIN: _marker,
    layout.REVERT: _marker,
    layout.CORE_LEFTOVER: _core_leftover,
    layout.COW: _cow,
    layout.BASE: _base,
    layout.READY: _ready,
}


def garbage(verdicts):
    """The paths judged garbage, sorted."""
    return sorted(p for p, v in verdicts.items() if v.state == GARBAGE)


def items_of(listing, links):
    """The items of a `layout.Listing`; `links`: hard links of each spare
    (path -> count), which the caller looked up."""
    items = [layout_item(layout.TEMP, path) for path in listing.temps]
    items += [layout_item(layout.SNAPTEMP, p) for p in listing.snaptemps]
    items += [layout_item(layout.EXPORT, path) for path in listing.exports]
    items += [layout_item(layout.IMPORT, path) for path in listing.imports]
    for kind, by_key in (
        (layout.BASE, listing.base),
        (layout.SNAPBASE, listing.snapbases),
        (layout.READY, listing.readies),
        (layout.PIN, listing.pins),
        (layout.REVERT, listing.reverts),
    ):
        items += [layout_item(kind, p, key) for key, p in by_key.items()]
    items += [
        Item(path, layout.SPARE, key, links.get(path, 1))
        for key, path in listing.spares.items()
    ]
    return items


def layout_item(kind, path, detail=""):
    """An item of `kind` that is a regular file (or a subvolume)."""
    return Item(path, kind, detail)
