"""Switching ``file`` pools in qubes.xml to this driver, byte-exactly.

qubes.xml is read with an XML parser (expat, for the byte offset of each
element, and ElementTree, to check the result), never with a regular
expression over the whole file.  The only bytes that change are the value
of the ``driver`` attribute of the chosen ``<pool>`` elements: comments,
formatting and the attributes' order stay as they were, so the edit is
easy to review and to undo.
"""

import os
import re
import xml.etree.ElementTree as ET
from typing import NamedTuple
from xml.parsers import expat

from . import layout
from .inspect import IN_USE

DEFAULT_QUBES_XML = "/var/lib/qubes/qubes.xml"
DEFAULT_RUN_DIR = "/var/run/qubes"
SOURCE_DRIVER = "file"

_POOL_PATH = ("qubes", "pools", "pool")
_TAG_NAME = re.compile(rb"<[^\s/>]+")
_ATTRIBUTE = re.compile(rb"\s+([^\s=/>]+)\s*=\s*(\"[^\"]*\"|'[^']*')")


class MigrateError(Exception):
    """qubes.xml can't be migrated as asked; says why."""


class PoolElement(NamedTuple):
    """A ``<pool>`` of qubes.xml, with where its driver value lies."""

    name: str
    driver: str
    dir_path: str
    value_span: tuple  # (start, end) byte offsets of the driver's value


def read_pools(data):
    """Every ``<pool>`` under ``<qubes><pools>``, in document order."""
    parser = expat.ParserCreate()
    stack, pools = [], []

    def start(tag, attrs):
        stack.append(tag)
        if tuple(stack) == _POOL_PATH:
            span = _driver_span(data, parser.CurrentByteIndex)
            pools.append(
                PoolElement(
                    attrs.get("name", ""),
                    attrs.get("driver", ""),
                    attrs.get("dir_path", ""),
                    span,
                )
            )

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: stack.pop()
    try:
        parser.Parse(data, True)
    except expat.ExpatError as err:
        raise MigrateError(f"not well-formed XML: {err}") from None
    return pools


def _driver_span(data, offset):
    """Offsets of the driver attribute's value in the start tag at
    `offset` (None if it has none).  The tag is well-formed (expat said
    so), so its attributes follow each other as the pattern reads them."""
    match = _TAG_NAME.match(data, offset)
    position = match.end()
    while (attribute := _ATTRIBUTE.match(data, position)) is not None:
        if attribute[1] == b"driver":
            start, end = attribute.span(2)
            return (start + 1, end - 1)
        position = attribute.end()
    return None


def file_pools(data, names=None):
    """The pools to migrate: those with driver "file", or the named ones
    (each must exist and use the file driver)."""
    pools = read_pools(data)
    if not names:
        return [pool for pool in pools if pool.driver == SOURCE_DRIVER]
    by_name = {pool.name: pool for pool in pools}
    chosen = []
    for name in names:
        pool = by_name.get(name)
        if pool is None:
            raise MigrateError(f"qubes.xml has no pool named {name!r}")
        if pool.driver != SOURCE_DRIVER:
            raise MigrateError(
                f"pool {name!r} uses driver {pool.driver!r}, not "
                f"{SOURCE_DRIVER!r}: nothing to migrate"
            )
        chosen.append(pool)
    return chosen


def rewrite(data, pools, driver):
    """`data` with the driver value of each of `pools` set to `driver`;
    every other byte unchanged, checked by parsing the result."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", driver):
        raise MigrateError(f"refusing odd driver name {driver!r}")
    new = bytearray(data)
    for pool in sorted(pools, key=lambda p: p.value_span, reverse=True):
        start, end = pool.value_span
        new[start:end] = driver.encode("ascii")
    new = bytes(new)
    _check_only_drivers_changed(data, new, {p.name for p in pools}, driver)
    return new


def _check_only_drivers_changed(old, new, names, driver):
    """Parse both documents and compare them element by element."""
    old_root, new_root = ET.fromstring(old), ET.fromstring(new)
    old_all, new_all = list(old_root.iter()), list(new_root.iter())
    if len(old_all) != len(new_all):
        raise MigrateError("internal error: the edit changed the structure")
    pools = old_root.find("pools")
    wanted = {
        id(elem)
        for elem in (pools if pools is not None else [])
        if elem.get("name") in names
    }
    for before, after in zip(old_all, new_all):
        expected = dict(before.attrib)
        if id(before) in wanted:
            expected["driver"] = driver
        if (before.tag, expected, before.text, before.tail) != (
            after.tag,
            after.attrib,
            after.text,
            after.tail,
        ):
            raise MigrateError(
                f"internal error: the edit changed <{before.tag}>"
            )


def busy_volumes(pool_name, scan, run_dir=DEFAULT_RUN_DIR):
    """Why the pool looks in use: files attached to a loop device, and
    the host's volume state files (R4.2+) naming one of its volumes."""
    reasons = [
        f"{info.path} is attached to a loop device"
        for files in scan.volumes.values()
        for info in files
        if info.state == IN_USE
    ]
    reasons += [
        f"{info.path} is attached to a loop device"
        for info in scan.unknown
        if info.state == IN_USE
    ]
    try:
        names = sorted(os.listdir(run_dir))
    except FileNotFoundError:
        names = []
    for name in names:
        vid = layout.volume_state_vid(pool_name, name)
        if vid is not None:
            reasons.append(
                f"volume {vid} is in use ({os.path.join(run_dir, name)})"
            )
    return reasons


def cow_files(scan):
    """The file driver's ``*-cow.img*`` files of a pool, not in use."""
    return [
        info.path
        for files in scan.volumes.values()
        for info in files
        if info.kind == layout.COW and info.state != IN_USE
    ]


def line_of(data, offset):
    """1-based line number of byte `offset` in `data`, for messages."""
    return data.count(b"\n", 0, offset) + 1
