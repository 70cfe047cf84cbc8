"""The host classes the driver builds on: qubesd's own when importable.

In dom0 the ``qubes`` package is there and the driver must subclass its
``Pool``/``Volume`` (qubesd checks ``isinstance``).  Elsewhere the stand-in
in ``qubes_reflink.standin`` provides the same contract.
"""

try:
    import qubes.storage as _storage

    try:
        from qubes.exc import StoragePoolException
    except ImportError:  # hosts before R4.3 keep it in qubes.storage
        StoragePoolException = _storage.StoragePoolException
    BlockDevice = _storage.BlockDevice
    Pool = _storage.Pool
    Volume = _storage.Volume
    isodate = _storage.isodate
    REAL_HOST = True
except ImportError:
    from .standin import (  # noqa: F401
        BlockDevice,
        Pool,
        StoragePoolException,
        Volume,
        isodate,
    )

    REAL_HOST = False

__all__ = [
    "BlockDevice",
    "Pool",
    "REAL_HOST",
    "StoragePoolException",
    "Volume",
    "isodate",
]
