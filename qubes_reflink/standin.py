"""A small stand-in for the few qubesd host classes the driver builds on.

The host package ``qubes`` (qubes-core-admin) exists only in dom0 and on no
package registry.  Off dom0 (tests, demo, benchmarks, the CLI on a rescue
system) the driver subclasses these instead.  They follow the contract in
HOST-API.md: the same constructor keywords, ``Volume.locked``,
``BlockDevice``, ``StoragePoolException`` (a ``QubesException``) and
``isodate``.  Nothing here is driver logic; ``qubes_reflink.host`` picks the
real classes whenever ``qubes`` is importable.
"""

import asyncio
import datetime
import functools


class QubesException(Exception):
    """Base of the errors qubesd reports to the user as they are."""


class StoragePoolException(QubesException):
    """A storage operation failed; the message is shown to the user."""


class QubesValueError(QubesException, ValueError):
    """A setting was given a value it can't take."""


def isodate(seconds):
    """UTC ISO-8601 timestamp of `seconds`, without an offset suffix."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat().replace("+00:00", "")


class BlockDevice:
    """What the host attaches to a VM: a file path and how to attach it."""

    # pylint: disable=too-few-public-methods,too-many-arguments
    def __init__(
        self,
        path,
        name,
        script=None,
        rw=True,
        domain=None,
        devtype="disk",
    ):
        assert name and path and script is None
        self.path = path
        self.name = name
        self.rw = rw
        self.domain = domain
        self.devtype = devtype


class VolumesCollection:
    """``pool.volumes`` as the host offers it: iterating yields Volume
    objects (not vids); ``[...]`` and ``in`` take a vid or a Volume of
    this pool; ``keys()`` lists vids.  It is no dict: no ``len()``, no
    ``items()``, no equality with a dict."""

    def __init__(self, pool):
        self._pool = pool

    def _vid_of(self, item):
        if isinstance(item, Volume):
            if item.pool != self._pool:
                raise KeyError(item)
            return item.vid
        return item

    def __getitem__(self, item):
        return self._pool.get_volume(self._vid_of(item))

    def __contains__(self, item):
        try:
            self[item]
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(self._pool.list_volumes())

    def keys(self):
        """The vids of the pool's volumes."""
        return [volume.vid for volume in self]

    def values(self):
        """The pool's volumes."""
        return list(self)


class Pool:
    """Host base class of a storage pool."""

    def __init__(self, *, name, revisions_to_keep=1, ephemeral_volatile=False):
        self.name = name
        self.revisions_to_keep = revisions_to_keep
        self.ephemeral_volatile = bool(ephemeral_volatile)

    def __eq__(self, other):
        if isinstance(other, Pool):
            return self.name == other.name
        if isinstance(other, str):
            return self.name == other
        return NotImplemented

    def __hash__(self):
        return hash(self.name)

    def __str__(self):
        return self.name

    @property
    def volumes(self):
        """The pool's volumes, as the host's collection offers them."""
        return VolumesCollection(self)

    def list_volumes(self):
        """Overridden by the driver."""
        raise NotImplementedError

    @property
    def usage_details(self):
        """Usage figures as the host's pool widgets read them."""
        details = {}
        if self.usage is not None:
            details["data_usage"] = self.usage
        if self.size is not None:
            details["data_size"] = self.size
        return details

    @property
    def size(self):
        """Overridden by the driver."""
        return None

    @property
    def usage(self):
        """Overridden by the driver."""
        return None


class Volume:
    """Host base class of a volume: configuration, lock and defaults."""

    devtype = "disk"
    domain = None

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        name,
        pool,
        vid,
        *,
        revisions_to_keep=0,
        rw=False,
        save_on_stop=False,
        size=0,
        snap_on_start=False,
        source=None,
        ephemeral=None,
    ):
        if snap_on_start and source is None:
            raise StoragePoolException(
                f"snap_on_start specified on {name!r} but no volume source set"
            )
        if not snap_on_start and source is not None:
            raise StoragePoolException(
                f"source specified on {name!r} but no snap_on_start set"
            )
        # the host asserts both: a snapshot's source lies in the same pool
        assert isinstance(pool, Pool), pool
        assert source is None or (
            isinstance(source, Volume) and source.pool == pool
        ), f"source of {name!r} is not a volume of pool {pool}"
        self.name = str(name)
        self.pool = pool
        self.vid = vid
        self.revisions_to_keep = int(revisions_to_keep)
        self.rw = rw
        self.save_on_stop = save_on_stop
        self._size = int(size)
        self.snap_on_start = snap_on_start
        self.source = source
        self._ephemeral = ephemeral
        self._lock = asyncio.Lock()

    def __eq__(self, other):
        if isinstance(other, Volume):
            return other.pool == self.pool and other.vid == self.vid
        return NotImplemented

    def __hash__(self):
        return hash(f"{self.pool}:{self.vid}")

    def __str__(self):
        return str(self.vid)

    @staticmethod
    def locked(method):
        """Serialise the decorated coroutine method per volume lock."""

        @functools.wraps(method)
        async def wrapper(self, *args, **kwargs):
            async with self._lock:  # pylint: disable=protected-access
                return await method(self, *args, **kwargs)

        return wrapper

    def _can_be_ephemeral(self):
        """Only writable volatile volumes in dom0 can have a throwaway key."""
        return not (
            self.snap_on_start
            or self.save_on_stop
            or self.domain is not None
            or not self.rw
        )

    @property
    def ephemeral(self):
        """Whether the host encrypts this volatile volume with a throwaway key."""
        if self._ephemeral is not None:
            return self._ephemeral
        if not self._can_be_ephemeral():
            return False
        return self.pool.ephemeral_volatile

    @ephemeral.setter
    def ephemeral(self, value):
        """``qvm-volume config VM:volatile ephemeral ...``."""
        if value and not self._can_be_ephemeral():
            raise QubesValueError(
                f"Volume {self.name!r} can't be ephemeral: only a writable "
                "volatile volume in dom0 can"
            )
        self._ephemeral = bool(value)

    async def export_end(self, path):
        """Default of the host: nothing to clean up."""

    @property
    def config(self):
        """The volume's settings as qubes.xml stores them."""
        result = {
            "name": self.name,
            "pool": str(self.pool),
            "vid": self.vid,
            "revisions_to_keep": self.revisions_to_keep,
            "rw": self.rw,
            "save_on_stop": self.save_on_stop,
            "snap_on_start": self.snap_on_start,
        }
        if self._ephemeral is not None:
            result["ephemeral"] = self.ephemeral
        if self.size:
            result["size"] = self.size
        if self.source:
            result["source"] = str(self.source)
        return result

    @property
    def size(self):
        """Overridden by the driver."""
        return self._size
