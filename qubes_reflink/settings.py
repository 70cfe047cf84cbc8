"""Pool settings the qubes-reflink tool changes while qubesd runs.

qubesd keeps a pool's options in memory and writes them to qubes.xml when
it saves, and its Admin API changes only revisions_to_keep and
ephemeral_volatile; an edit of qubes.xml while it runs would be
overwritten.  So the options a user changes later with ``qubes-reflink
set`` live in a small JSON file at the top of the pool directory, read by
the driver each time it needs them, and win over the value qubes.xml gave
(qvm-pool info then shows them, and qubesd's next save writes them to
qubes.xml too).
"""

import json
import logging

from . import fileops, layout, options
from .host import StoragePoolException

log = logging.getLogger("qubes.storage.reflink")

KEEP_REVISION_OLDER_THAN = "keep_revision_older_than"
AUTO_DEFRAG = "auto_defrag"
DEFRAG_THRESHOLD = "defrag_threshold"
DEFRAG_INTERVAL = "defrag_interval"

#: The settings `set` can change, with their parsers.
PARSERS = {
    KEEP_REVISION_OLDER_THAN: lambda value: options.parse_seconds(
        value, KEEP_REVISION_OLDER_THAN
    ),
    AUTO_DEFRAG: lambda value: options.parse_bool(value, AUTO_DEFRAG),
    DEFRAG_THRESHOLD: lambda value: options.parse_count(
        value, DEFRAG_THRESHOLD
    ),
    DEFRAG_INTERVAL: lambda value: options.parse_seconds(
        value, DEFRAG_INTERVAL
    ),
}


def load(pool_dir):
    """The settings stored for the pool in `pool_dir` (none: {}); a file
    that can't be read counts as none, with a warning: a setting only
    keeps more."""
    path = layout.settings_path(pool_dir)
    try:
        with open(path, encoding="utf-8") as stored:
            found = json.load(stored)
        return {
            key: parse(found[key])
            for key, parse in PARSERS.items()
            if key in found
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, StoragePoolException) as err:
        log.warning("ignoring the pool settings in %s: %s", path, err)
        return {}


def store(pool_dir, key, value):
    """Set `key` to `value` (a string, as typed) for the pool in
    `pool_dir`; returns the parsed value.  ValueError names what to give."""
    if key not in PARSERS:
        raise ValueError(
            f"unknown setting {key!r}: the settings are "
            f"{', '.join(sorted(PARSERS))}"
        )
    try:
        parsed = PARSERS[key](value)
    except StoragePoolException as err:
        raise ValueError(str(err)) from None
    current = load(pool_dir)
    current[key] = parsed
    path = layout.settings_path(pool_dir)
    data = json.dumps(current, indent=2, sort_keys=True).encode() + b"\n"
    fileops.write_file(path, data, layout.settings_temp(pool_dir))
    return parsed
