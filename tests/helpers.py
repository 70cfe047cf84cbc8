"""Shared test helpers: VMs as the host describes them, and volume sets."""

import hashlib
import json
import os

from qubes_reflink import ReflinkPool, cli, extents

MIB = 1024**2


class FakeVM:
    """What init_volume reads of a VM: its name and directory prefix."""

    def __init__(self, name, dir_path_prefix="appvms"):
        self.name = name
        self.dir_path_prefix = dir_path_prefix


async def new_pool(directory, **options):
    """A set-up pool in `directory`/pool (options as qvm-pool passes them)."""
    options.setdefault("name", "test-pool")
    pool = ReflinkPool(dir_path=os.path.join(directory, "pool"), **options)
    await pool.setup()
    return pool


def origin(pool, vm, name="private", size=MIB, **config):
    """An origin volume (private, template root): committed at stop."""
    return pool.init_volume(
        vm,
        {
            "name": name,
            "size": size,
            "save_on_stop": True,
            "rw": True,
            **config,
        },
    )


def snapshot(pool, vm, source, name="root", **config):
    """A snapshot volume (AppVM root): fresh copy of `source` at start."""
    return pool.init_volume(
        vm,
        {
            "name": name,
            "size": source.size,
            "snap_on_start": True,
            "source": source,
            "rw": True,
            **config,
        },
    )


def volatile(pool, vm, name="volatile", size=MIB, **config):
    """A volatile volume: empty at each start."""
    return pool.init_volume(
        vm, {"name": name, "size": size, "rw": True, **config}
    )


def write_image(path, data, offset=0):
    """Write `data` into an image file as a VM would."""
    with open(path, "r+b") as image:
        image.seek(offset)
        image.write(data)


def read_image(path, length, offset=0):
    """Read `length` bytes of an image file."""
    with open(path, "rb") as image:
        image.seek(offset)
        return image.read(length)


def tree(directory):
    """Relative paths of all files below `directory`, sorted."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def snapshot_tree(directory):
    """Every file below `directory` -> (sha256 of contents, inode, size).

    Compare two snapshots to prove that an operation changed nothing.
    """
    found = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            digest = hashlib.sha256()
            with open(path, "rb") as file:
                while chunk := file.read(1024**2):
                    digest.update(chunk)
            stat_result = os.stat(path, follow_symlinks=False)
            found[os.path.relpath(path, directory)] = (
                digest.hexdigest(),
                stat_result.st_ino,
                stat_result.st_size,
            )
    return found


def shared_bytes(path_a, path_b):
    """Bytes of `path_a` that lie at the same physical place as data of
    `path_b`: what a reflink clone shares with its source (FIEMAP)."""
    return extents.space_usage([path_a, path_b])[path_a].shared


def data(tag, length=64 * 1024):
    """Recognisable bytes for `tag`."""
    text = f"<{tag}>".encode()
    return (text * (length // len(text) + 1))[:length]


def committed(volume):
    """The committed image's path, spelled out independently of layout."""
    return os.path.join(volume.pool.root, volume.vid + ".img")


def dirty(volume):
    """The running image's path, spelled out independently of layout: in
    its subvolume when the start snapshotted one (btrfs)."""
    running = os.path.join(volume.pool.root, volume.vid + ".img~running")
    if os.path.isdir(running):
        return os.path.join(running, "image.img")
    return os.path.join(volume.pool.root, volume.vid + "-dirty.img")


def vm_dir(volume):
    """The directory holding a volume's files."""
    return os.path.dirname(committed(volume))


def report_summary(request, path, results, lines):
    """Write a run's `results` to `path` as JSON and print `lines` past
    pytest's capture: the figures a long harness run ends with."""
    with open(path, "w", encoding="utf-8") as summary_file:
        json.dump(results, summary_file, indent=1, sort_keys=True)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))


def run_tool(capsys, *argv):
    """(exit code, stdout) of qubes-reflink with `argv`, in this process."""
    code = cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr().out


def run_tool_json(capsys, *argv):
    """(exit code, parsed --json output) of qubes-reflink, in-process."""
    code, out = run_tool(capsys, "--json", *argv)
    return code, json.loads(out)
