"""tools/ensure-system-deps: what `make test` does when tools are missing."""

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

SCRIPT = (
    pathlib.Path(__file__).resolve().parent.parent
    / "tools"
    / ("ensure-system-deps")
)


def run_as_nobody(path_dir, partial=False):
    """The script as an unprivileged user, with only `path_dir` on PATH;
    run from a copy in `path_dir`, as the checkout may lie where that user
    can't go (root's home)."""
    script = os.path.join(path_dir, "ensure-system-deps")
    shutil.copy(SCRIPT, script)
    os.chmod(script, 0o755)
    env = {"PATH": str(path_dir)}
    if partial:
        env["PARTIAL"] = "1"
    return subprocess.run(
        [
            shutil.which("setpriv"),
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
        + ["/bin/sh", script],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def bare_path():
    """A PATH directory, readable by any user, holding what the script
    itself runs and none of the tools it looks for."""
    bin_dir = tempfile.mkdtemp(prefix="bare-path-")
    os.chmod(bin_dir, 0o755)
    for tool in ("id", "sort", "tr", "sed", "printf"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, os.path.join(bin_dir, tool))
    yield bin_dir
    shutil.rmtree(bin_dir)


def test_without_root_it_stops_naming_what_is_missing(bare_path):
    result = run_as_nobody(bare_path)
    assert result.returncode == 1
    for package in ("btrfs-progs", "xfsprogs", "strace", "rpm", "fuse3"):
        assert package in result.stderr
    assert "PARTIAL=1" in result.stderr


def test_partial_run_goes_on(bare_path):
    result = run_as_nobody(bare_path, partial=True)
    assert result.returncode == 0
    assert "btrfs-progs" in result.stderr


def test_nothing_missing_nothing_done():
    result = subprocess.run(
        ["/bin/sh", str(SCRIPT)], capture_output=True, text=True, check=True
    )
    assert result.stdout == ""
