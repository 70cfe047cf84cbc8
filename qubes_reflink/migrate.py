"""Switching ``file`` pools in qubes.xml to this driver, byte-exactly.

qubes.xml is read with an XML parser (expat, for the byte offset of each
element, and ElementTree, to check the result), never with a regular
expression over the whole file.  The only bytes that change are the value
of the ``driver`` attribute of the chosen ``<pool>`` elements: comments,
formatting and the attributes' order stay as they were, so the edit is
easy to review and to undo.
"""

import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from typing import NamedTuple
from xml.parsers import expat

from . import fileops, inspect, layout
from .inspect import IN_USE

log = logging.getLogger("qubes.storage.reflink")

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


# -- what a migration of a pool involves ------------------------------------

#: Why a migration may not go ahead (`obstacle`).
NO_REFLINK = "no-reflink"
IN_USE_NOW = "in-use"


def plan_pool(pool, data, setup_check=True, run_dir=DEFAULT_RUN_DIR):
    """What migrating the `PoolElement` `pool` of qubes.xml `data`
    involves, and what stands in the way (JSON-ready)."""
    directory = os.path.realpath(pool.dir_path)
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{pool.dir_path} is not a directory")
    scan = inspect.scan_pool(directory)
    reflink = None
    if setup_check:
        reflink = fileops.can_reflink(
            layout.probe_path(directory), layout.probe_path(directory)
        )
    return {
        "name": pool.name,
        "dir_path": pool.dir_path,
        "fstype": inspect.mount_of(directory)[1],
        "line": line_of(data, pool.value_span[0]),
        "reflink": reflink,
        "busy": busy_volumes(pool.name, scan, run_dir),
        "cow": cow_files(scan),
    }


def obstacle(plans, force=False, qubesd_matters=False):
    """None if the migration of `plans` may go ahead, else NO_REFLINK or
    IN_USE_NOW; `force` overrides the latter, and `qubesd_matters` (it is
    about to be applied) makes a running qubesd one."""
    if any(plan["reflink"] is False for plan in plans):
        return NO_REFLINK
    if force:
        return None
    if any(plan["busy"] for plan in plans):
        return IN_USE_NOW
    if qubesd_matters and inspect.qubesd_running():
        return IN_USE_NOW
    return None


# -- carrying it out ---------------------------------------------------------


def switch(xml_path, data, pools, driver):
    """Back up qubes.xml (its bytes `data`), then replace it with the copy
    where `pools` use `driver`; returns the backup's path."""
    new = rewrite(data, pools, driver)
    like = os.stat(xml_path)
    backup = write_backup(xml_path, data, like)
    with open(xml_path, "rb") as xml_file:
        if xml_file.read() != data:
            raise RuntimeError(f"{xml_path} changed while being migrated")
    fileops.write_file(xml_path, new, layout.xml_temp(xml_path), like=like)
    log.info(
        "migrate: set driver %s of pools %s in %s",
        driver,
        ", ".join(p.name for p in pools),
        xml_path,
    )
    return backup


def write_backup(xml_path, data, like):
    """A new backup file named after the time; never overwrites one."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for number in range(100):
        backup = layout.xml_backup(xml_path, stamp, number)
        try:
            fileops.write_file(
                backup,
                data,
                layout.xml_temp(xml_path),
                like=like,
                replace=False,
            )
            return backup
        except FileExistsError:
            continue
    raise FileExistsError(f"too many backups of {xml_path} this second")


def remove_cow(paths):
    """Remove the cow files `paths`; yields each path as it is gone."""
    for path in paths:
        fileops.remove_files([path])
        yield path


# -- going back ----------------------------------------------------------------


def newest_backup(xml_path):
    """The newest backup of `xml_path` that a migration wrote."""
    backups = layout.xml_backups(xml_path)
    if not backups:
        raise FileNotFoundError(f"no backup of {xml_path} made by migrate")
    return backups[-1]


def reverted_subvolumes(xml_path, backup, driver):
    """The subvolumes, not in use, of the pools that going back to
    `backup` gives back from `driver` to the file driver, which knows
    none: the problems a repair removes first."""
    with open(xml_path, "rb") as xml_file:
        current = read_pools(xml_file.read())
    with open(backup, "rb") as backup_file:
        before = {p.name: p.driver for p in read_pools(backup_file.read())}
    removals = []
    for pool in current:
        if pool.driver != driver or before.get(pool.name) == pool.driver:
            continue
        if os.path.isdir(pool.dir_path):
            scan = inspect.scan_pool(pool.dir_path)
            removals += inspect.subvolume_removals(scan)
    return removals


def restore(xml_path, backup):
    """Put `backup` back in place of qubes.xml, atomically."""
    with open(backup, "rb") as backup_file:
        data = backup_file.read()
    fileops.write_file(
        xml_path, data, layout.xml_temp(xml_path), like=os.stat(xml_path)
    )
    log.info("migrate: restored %s from %s", xml_path, backup)
