"""The driver under the real qubesd host code of each Qubes release.

For every release in `hosts.RELEASES` (R4.2: qubes-core-admin v4.2.39 under
Python 3.11; R4.3: v4.3.50 under Python 3.13), each check class of
`real_host_checks` runs in a subprocess of that release's Python with that
release's tree on PYTHONPATH, so that the host's ``qubes`` package is
imported there and the driver binds to its real ``qubes.storage`` classes.

A missing tree, Python or host module fails the test with what to install;
nothing here skips.  Needs root (loop-mounted btrfs and ext4).
"""

import os
import subprocess
import textwrap

import pytest

import hosts

CHECKS = (
    "TC_00_Loading",
    "TC_10_Pool",
    "TC_20_VolumeConfigs",
    "TC_30_RealVMs",
    "TC_35_MoreVMClasses",
    "TC_40_AdminAPI",
    "TC_50_Dom0Rename",
    "TC_60_FileDriverSwap",
    "TC_70_Revisions",
)

CHECKS_SCRIPT = os.path.join(hosts.HERE, "real_host_checks.py")


def run_host_checks(release, checks, tmp_path):
    """Run `checks` (class names) of real_host_checks under `release`."""
    try:
        python = release.interpreter()
        env = hosts.host_environment(
            release,
            hosts.write_host_metadata(release.tree(), str(tmp_path / "meta")),
        )
        hosts.check_host_imports(release, python, env)
    except hosts.HostUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    result = subprocess.run(
        [python, CHECKS_SCRIPT, *checks],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    return result


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("release", hosts.RELEASES, ids=lambda r: r.id)
def test_real_host(release, check, tmp_path):
    """One check class against one release's host code, in a subprocess."""
    result = run_host_checks(release, [check], tmp_path)
    assert result.returncode == 0, textwrap.indent(result.stdout, "  ")
    # unittest says how many ran: a class that ran nothing proves nothing,
    # and one that skipped anything did not run
    assert "\nOK" in result.stdout, result.stdout
    assert "skipped" not in result.stdout.rsplit("\n\n", 1)[-1], result.stdout


def test_every_check_class_is_run():
    """CHECKS names every check class of real_host_checks, and only those."""
    with open(CHECKS_SCRIPT, encoding="utf-8") as script:
        defined = [
            line.split()[1].split("(")[0]
            for line in script
            if line.startswith("class TC_")
        ]
    assert sorted(defined) == sorted(CHECKS)
