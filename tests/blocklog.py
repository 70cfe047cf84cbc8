"""A write-logging block device for the power-cut tests, served by FUSE.

Run as ``python3 tests/blocklog.py WORKDIR MOUNTPOINT``: it serves one
file, ``MOUNTPOINT/disk``, backed by ``WORKDIR/image`` (which must exist),
to be attached to a loop device.  The loop driver turns every block write
into a write of that file and every cache flush into an fsync of it, and
with ``direct_io`` (no page cache between the loop device and this
process) and one thread, each reaches this process whole and in order.

Writing ``start`` to ``MOUNTPOINT/control`` copies the image as it is to
``WORKDIR/base`` and starts the log; ``mark LABEL`` records a marker.  The
log (``WORKDIR/log``) is a sequence of records (`Record`); the data of the
writes is appended to ``WORKDIR/data``.  `read_log` reads them back.

Everything that reaches this process is on "the disk": the base plus the
writes up to a point is a state the disk could be in after a power cut
there, and writes after the last flush may each have been lost.
"""

import errno
import os
import stat
import struct
import sys
from typing import NamedTuple

HEADER = struct.Struct("<cQQQ")  # kind, offset, length, position in data
WRITE, FLUSH, MARK = b"W", b"F", b"M"


class Record(NamedTuple):
    """One logged event: a write (offset, length, where its data is in the
    data file), a flush, or a marker (its label)."""

    kind: bytes
    offset: int = 0
    length: int = 0
    data_pos: int = 0
    label: str = ""


def read_log(workdir):
    """The records of the log in `workdir`, in order."""
    records = []
    with open(os.path.join(workdir, "log"), "rb") as log, open(
        os.path.join(workdir, "data"), "rb"
    ) as data:
        while header := log.read(HEADER.size):
            kind, offset, length, pos = HEADER.unpack(header)
            label = ""
            if kind == MARK:
                data.seek(pos)
                label = data.read(length).decode()
            records.append(Record(kind, offset, length, pos, label))
    return records


def _copy_sparse(src_fd, dst_path):
    """Copy the data extents of `src_fd` to a new sparse file `dst_path`."""
    size = os.fstat(src_fd).st_size
    with open(dst_path, "wb") as dst:
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src_fd, offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(src_fd, start, os.SEEK_HOLE)
            os.copy_file_range(src_fd, dst.fileno(), end - start, start, start)
            offset = end


class LoggingDisk:  # pylint: disable=too-many-instance-attributes
    """FUSE operations: one file ``/disk`` and one file ``/control``."""

    use_ns = True

    def __init__(self, workdir):
        # absolute: libfuse changes the working directory to /
        self.workdir = os.path.abspath(workdir)
        self.image = os.open(os.path.join(self.workdir, "image"), os.O_RDWR)
        self.log = open(os.path.join(self.workdir, "log"), "wb")
        self.data = open(os.path.join(self.workdir, "data"), "wb")
        self.logging = False

    def _record(self, kind, offset=0, payload=b""):
        pos = self.data.tell()
        if payload:
            self.data.write(payload)
        self.log.write(HEADER.pack(kind, offset, len(payload), pos))
        # Flushed at once: the harness reads the log while this runs.
        self.data.flush()
        self.log.flush()

    def _control(self, command):
        if command == "start":
            _copy_sparse(self.image, os.path.join(self.workdir, "base"))
            self.logging = True
        elif command.startswith("mark "):
            self._record(MARK, 0, command[5:].encode())
        else:
            raise OSError(errno.EINVAL, f"unknown command {command!r}")

    # -- FUSE operations ---------------------------------------------------

    def getattr(self, path, _fh=None):
        """The root directory, the disk (the image's size) and control."""
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/disk":
            size = os.fstat(self.image).st_size
            return {"st_mode": stat.S_IFREG | 0o600, "st_size": size}
        if path == "/control":
            return {"st_mode": stat.S_IFREG | 0o600, "st_size": 0}
        raise OSError(errno.ENOENT, path)

    def readdir(self, _path, _fh):
        """The two files."""
        return [".", "..", "disk", "control"]

    def open(self, path, fi):
        """Every open bypasses the page cache (direct_io)."""
        self.getattr(path)
        fi.direct_io = 1
        return 0

    def truncate(self, path, _length, _fh=None):
        """Opening control with O_TRUNC; the disk keeps its size."""
        if path != "/control":
            raise OSError(errno.EPERM, path)
        return 0

    def read(self, path, size, offset, _fi):
        """Reads of the disk come from the live image."""
        if path != "/disk":
            return b""
        return os.pread(self.image, size, offset)

    def write(self, path, data, offset, _fi):
        """A block write, logged once the log is started; or a command."""
        if path == "/control":
            self._control(data.decode().strip())
            return len(data)
        if self.logging:
            self._record(WRITE, offset, data)
        return os.pwrite(self.image, data, offset)

    def fsync(self, path, _datasync, _fi):
        """A cache flush of the loop device."""
        if path == "/disk" and self.logging:
            self._record(FLUSH)
        return 0

    def flush(self, _path, _fi):
        """close(): nothing to do."""
        return 0

    def release(self, _path, _fi):
        """The last close: nothing to do."""
        return 0


def main(workdir, mountpoint):
    """Serve until unmounted (``fusermount3 -u MOUNTPOINT``)."""
    # pylint: disable=import-outside-toplevel
    import mfusepy

    mfusepy.FUSE(
        LoggingDisk(workdir),
        mountpoint,
        raw_fi=True,
        foreground=True,
        nothreads=True,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
