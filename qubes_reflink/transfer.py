"""Data in and out of a volume: the host API's export and import calls.

Part of `volume.ReflinkVolume` (a mixin, so that the adapter of the host
API stays readable in two halves): the checks and bookkeeping of exports
and imports in use; the file work is the volume kind's (`kinds`).
"""

from . import fileops, options
from .background import locked
from .host import StoragePoolException


class DataTransferMixin:
    """export, export_end, import_data, import_data_end, import_volume."""

    @locked
    async def export(self):
        """A fresh snapshot of the committed data, valid until export_end.

        It is a clone of its own, so a commit, revert or removal while a
        backup reads it changes nothing in it.
        """
        path = await self._run("Exporting", self.kind.export)
        self._live.exports.add(path)
        return path

    async def export_end(self, path):
        """Remove the snapshot that export() returned."""
        if path not in self._live.exports:
            raise StoragePoolException(
                f"{path!r} is not an export of volume {self.vid} in use"
            )
        self._live.exports.discard(path)
        try:
            await self._run("Ending export", self.pool.trash.discard, [path])
        finally:
            self.pool.trash.sweep_later()

    @locked
    async def import_data(self, size):
        """A new empty image of `size` bytes for the caller to fill."""
        size = options.parse_size(size)
        if size == 0:
            raise StoragePoolException(
                f"Cannot import into volume {self.vid}: the size of the "
                "new data must be more than 0 bytes"
            )
        self._check_importable()
        if self._live.import_path is not None:
            raise StoragePoolException(
                f"An import into volume {self.vid} is already in progress"
            )
        path = await self._run("Importing", self.kind.import_target, size)
        self._live.import_path = path
        return path

    def _check_importable(self):
        if not self.kind.saves:
            raise StoragePoolException(
                f"Cannot import into volume {self.vid}: it keeps no data "
                "of its own (not save_on_stop)"
            )
        self.kind.refuse_if_running("import into")

    @locked
    async def import_data_end(self, success):
        """Commit the imported image, or throw it away."""
        path, self._live.import_path = self._live.import_path, None
        if path is None:
            raise StoragePoolException(
                f"No import into volume {self.vid} is in progress"
            )
        if success:
            await self._run(
                "Committing the import", self.kind.commit_or_drop, path
            )
            self.pool.background.committed(self)
        else:
            await self._run(
                "Discarding the import", fileops.remove_files, [path]
            )
        return self

    @locked
    async def import_volume(self, src_volume):
        """Replace this volume's data with a copy of `src_volume`'s.

        A source on the same filesystem is reflinked straight from its
        committed image; any other is read through its export().
        """
        if not self.kind.saves:
            return self
        self._check_importable()
        if self._can_read_directly(src_volume):
            await self._run(
                "Cloning",
                self.kind.import_from,
                src_volume.committed_data_path(),
            )
        else:
            path = await src_volume.export()
            try:
                await self._run("Copying", self.kind.import_from, path)
            finally:
                await src_volume.export_end(path)
        self.pool.background.committed(self)
        return self

    def _can_read_directly(self, src_volume):
        """A volume of this driver on the same filesystem: a clone."""
        if not isinstance(src_volume, DataTransferMixin):
            return False
        here = fileops.stat_or_none(self.pool.root)
        there = fileops.stat_or_none(src_volume.pool.root)
        return here and there and here.st_dev == there.st_dev
