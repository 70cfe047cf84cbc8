"""Parsing of pool and volume options, which arrive as strings.

``qvm-pool add -o`` and qubes.xml hand every option over as a string
("1", "False", "no", "on", ...).  Each parser accepts the real type too,
and rejects anything else with a message naming the option and saying
what to give instead.
"""

import os

from .host import StoragePoolException

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def parse_bool(value, option):
    """True/False from a bool or any of True/False, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise StoragePoolException(
        f"Invalid value {value!r} for option '{option}': use True or False "
        "(yes/no, on/off and 1/0 work too)"
    )


def _parse_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if digits.isascii() and digits.isdigit():
            return int(text)
    return None


def parse_revisions_to_keep(value, option="revisions_to_keep"):
    """A revision count: 0 or more, or -1 for "keep no snapshot at all"."""
    number = _parse_int(value)
    if number is None or number < -1:
        raise StoragePoolException(
            f"Invalid value {value!r} for option '{option}': give the whole "
            "number of old revisions to keep (0 or more), or -1 to keep no "
            "snapshot at all"
        )
    return number


#: The largest size a file can have (off_t); no image can be larger.
MAX_SIZE = 2**63 - 1


def parse_seconds(value, option):
    """A duration in whole seconds, 0 or more (0: off)."""
    seconds = _parse_int(value)
    if seconds is None or seconds < 0:
        raise StoragePoolException(
            f"Invalid {option} {value!r}: give a number of seconds, 0 or "
            "more (0 turns it off), e.g. 86400 for a day"
        )
    return seconds


def parse_count(value, option):
    """A whole number, 0 or more."""
    number = _parse_int(value)
    if number is None or number < 0:
        raise StoragePoolException(
            f"Invalid {option} {value!r}: give a whole number, 0 or more"
        )
    return number


def parse_size(value, what="size"):
    """A size in bytes: a whole number, 0 or more, at most MAX_SIZE."""
    number = _parse_int(value)
    if number is None or number < 0 or number > MAX_SIZE:
        raise StoragePoolException(
            f"Invalid {what} {value!r}: give a whole number of bytes "
            f"(0 to {MAX_SIZE}), for example 10737418240 for 10 GiB"
        )
    return number


def parse_dir_path(value):
    """An absolute directory path, normalised; never empty or relative."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise StoragePoolException(
            f"Invalid value {value!r} for option 'dir_path': give the "
            "absolute path of the pool's directory, for example "
            "-o dir_path=/var/lib/mypool"
        )
    if not os.path.isabs(value):
        raise StoragePoolException(
            f"Invalid value {value!r} for option 'dir_path': it must be an "
            f"absolute path (for example /var/lib/{value.strip('/')})"
        )
    return os.path.normpath(value)


_VOLUME_BOOLS = ("rw", "save_on_stop", "snap_on_start")


def parse_volume_options(kwargs):
    """Volume options from qubes.xml arrive as strings: convert them."""
    parsed = dict(kwargs)
    for option in _VOLUME_BOOLS:
        if option in parsed:
            parsed[option] = parse_bool(parsed[option], option)
    if parsed.get("ephemeral") is not None:
        parsed["ephemeral"] = parse_bool(parsed["ephemeral"], "ephemeral")
    if "revisions_to_keep" in parsed:
        parsed["revisions_to_keep"] = parse_revisions_to_keep(
            parsed["revisions_to_keep"]
        )
    if "size" in parsed:
        parsed["size"] = parse_size(parsed["size"])
    return parsed
