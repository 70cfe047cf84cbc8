"""Packaging: `make install`, the dom0 entry point rename, the RPM build.

On a Qubes R4.1+ dom0 the core (distribution `qubes`) registers its own
`file-reflink` storage driver; qubesd refuses a driver name registered twice.
The dom0 RPM therefore renames our entry point to `qubes-reflink` with
rpm_spec/rename-entry-point.sh; these tests run that very script.
"""

import configparser
import importlib.util
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

import hosts

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC_IN = ROOT / "rpm_spec" / "qubes-reflink.spec.in"
RENAME_SCRIPT = ROOT / "rpm_spec" / "rename-entry-point.sh"
VERSION = (ROOT / "version").read_text(encoding="ascii").strip()

GROUP = "qubes.storage"
OUR_VALUE = "qubes_reflink.pool:ReflinkPool"
CORE_VALUE = "qubes.storage.reflink:ReflinkPool"
CLI_VALUE = "qubes_reflink.cli:main"

# What setup.py needs to build and install (a tarball would hold more).
SOURCE_ENTRIES = (
    "setup.py",
    "setup.cfg",
    "pyproject.toml",
    "MANIFEST.in",
    "version",
    "LICENSE",
    "README.md",
    "Makefile",
    "qubes_reflink",
)

# Mimics qubesd's driver lookup (exactly one implementation per name) and the
# driver's own run-time search for the name it is registered under. Runs
# isolated (-I -S) with sys.path = the standard library + argv[1] only.
LOOKUP = r"""
import importlib.metadata as md
import json
import sys

sys.path.insert(0, sys.argv[1])


def get_pool_class(name):
    eps = md.entry_points(group="qubes.storage", name=name)
    if not eps:
        raise KeyError(name)
    if len(eps) > 1:
        raise TypeError(f"more than 1 implementation of {name!r} found")
    (ep,) = eps
    return ep.value


result = {"names": {}, "own_name": [], "providers": []}
for name in sys.argv[2:]:
    found = [ep.value for ep in md.entry_points(group="qubes.storage", name=name)]
    try:
        lookup = get_pool_class(name)
    except (KeyError, TypeError) as exc:
        lookup = f"{type(exc).__name__}: {exc}"
    result["names"][name] = {"found": sorted(found), "lookup": lookup}
for ep in md.entry_points(group="qubes.storage"):
    if ep.value == "qubes_reflink.pool:ReflinkPool":
        result["own_name"].append(ep.name)
for dist in md.distributions():
    if dist.entry_points.select(group="qubes.storage"):
        result["providers"].append(dist.metadata["Name"])
print(json.dumps(result))
"""


def run(cmd, **kwargs):
    """Run `cmd`, failing the test with its output when it fails."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, **kwargs
    )
    if proc.returncode:
        pytest.fail(
            f"{cmd} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def entry_points_of(meta_dir):
    """{group: {name: value}} from a metadata dir's entry_points.txt."""
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str
    parser.read_string((meta_dir / "entry_points.txt").read_text())
    return {group: dict(parser[group]) for group in parser.sections()}


def our_metadata(sitelib):
    """Our one egg-info/dist-info directory under `sitelib`."""
    found = [
        *sitelib.glob("qubes_reflink-*.egg-info"),
        *sitelib.glob("qubes_reflink-*.dist-info"),
    ]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(DESTDIR, sitelib) of `make install DESTDIR=...` from a source copy.

    The copy keeps build/ and *.egg-info out of the working tree.
    """
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip(f"setuptools is not installed for {sys.executable}")
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for entry in SOURCE_ENTRIES:
        path = ROOT / entry
        if path.is_dir():
            shutil.copytree(
                path,
                src / entry,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        elif path.exists():
            shutil.copy2(path, src / entry)
    destdir = base / "root"
    run(
        ["make", "install", f"DESTDIR={destdir}", f"PYTHON={sys.executable}"],
        cwd=src,
    )
    metas = list(destdir.glob("usr/**/qubes_reflink-*.egg-info")) + list(
        destdir.glob("usr/**/qubes_reflink-*.dist-info")
    )
    assert len(metas) == 1, metas
    return destdir, metas[0].parent


def test_make_install_destdir(installed):
    destdir, sitelib = installed
    # The package, with every module of the source tree.
    sources = sorted(p.name for p in (ROOT / "qubes_reflink").glob("*.py"))
    installed_modules = sorted(
        p.name for p in (sitelib / "qubes_reflink").glob("*.py")
    )
    assert installed_modules == sources
    assert VERSION in our_metadata(sitelib).name
    # Entry points, as setup.py declares them (no rename off dom0).
    entry_points = entry_points_of(our_metadata(sitelib))
    assert entry_points[GROUP] == {"file-reflink": OUR_VALUE}
    assert entry_points["console_scripts"] == {"qubes-reflink": CLI_VALUE}
    # The console script lands in /usr/bin under DESTDIR.
    script = destdir / "usr" / "bin" / "qubes-reflink"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    # dom0's interpreter, whatever Python ran the install
    assert script.read_text().startswith("#!/usr/bin/python3\n")


def make_site(tmp_path, name, installed_sitelib, rename):
    """A sys.path directory: fake Qubes core + our metadata (RPM-renamed?)."""
    site = tmp_path / name
    shutil.copytree(installed_sitelib, site)
    core = site / "qubes-99.dist-info"
    core.mkdir()
    (core / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qubes\nVersion: 99\n"
    )
    (core / "entry_points.txt").write_text(
        "[qubes.storage]\n"
        "file = qubes.storage.file:FilePool\n"
        f"file-reflink = {CORE_VALUE}\n"
        "lvm_thin = qubes.storage.lvm:ThinPool\n"
    )
    if rename:
        run(["sh", str(RENAME_SCRIPT), str(site)])
    return site


def lookup(site):
    proc = run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            LOOKUP,
            str(site),
            "file-reflink",
            "qubes-reflink",
        ]
    )
    return json.loads(proc.stdout)


def test_spec_uses_rename_script():
    spec = SPEC_IN.read_text()
    install = spec.split("\n%install\n", 1)[1].split("\n%files", 1)[0]
    assert (
        "sh rpm_spec/rename-entry-point.sh %{buildroot}%{python3_sitelib}"
        in install.splitlines()
    )


def test_rename_coexists_with_core_driver(installed, tmp_path):
    _destdir, sitelib = installed

    # As the dom0 RPM installs it: one implementation of each name.
    site = make_site(tmp_path, "renamed", sitelib, rename=True)
    entry_points = entry_points_of(our_metadata(site))
    assert entry_points[GROUP] == {"qubes-reflink": OUR_VALUE}
    assert entry_points["console_scripts"] == {"qubes-reflink": CLI_VALUE}
    result = lookup(site)
    assert sorted(result["providers"]) == ["qubes", "qubes-reflink"]
    assert result["names"]["file-reflink"] == {
        "found": [CORE_VALUE],
        "lookup": CORE_VALUE,
    }
    assert result["names"]["qubes-reflink"] == {
        "found": [OUR_VALUE],
        "lookup": OUR_VALUE,
    }
    # What the driver finds at run time as its own name.
    assert result["own_name"] == ["qubes-reflink"]

    # Without the rename, qubesd could load neither file-reflink driver.
    site = make_site(tmp_path, "as-is", sitelib, rename=False)
    result = lookup(site)
    assert sorted(result["providers"]) == ["qubes", "qubes-reflink"]
    assert result["names"]["file-reflink"] == {
        "found": sorted([CORE_VALUE, OUR_VALUE]),
        "lookup": "TypeError: more than 1 implementation of "
        "'file-reflink' found",
    }
    assert result["names"]["qubes-reflink"]["found"] == []
    assert result["own_name"] == ["file-reflink"]


def test_rename_script_refuses_unexpected_metadata(installed, tmp_path):
    _destdir, sitelib = installed
    site = make_site(tmp_path, "twice", sitelib, rename=True)
    # Already renamed: nothing to rename, and the build must stop.
    proc = subprocess.run(
        ["sh", str(RENAME_SCRIPT), str(site)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert entry_points_of(our_metadata(site))[GROUP] == {
        "qubes-reflink": OUR_VALUE
    }
    # No metadata of ours at all (the core's alone is never touched).
    empty = tmp_path / "empty"
    shutil.copytree(site / "qubes-99.dist-info", empty / "qubes-99.dist-info")
    before = (empty / "qubes-99.dist-info" / "entry_points.txt").read_text()
    proc = subprocess.run(
        ["sh", str(RENAME_SCRIPT), str(empty)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    after = (empty / "qubes-99.dist-info" / "entry_points.txt").read_text()
    assert after == before


def unpack_rpm(rpm, root):
    """Extract the payload of `rpm` into `root` (via rpm2archive), as rpm
    would install it there."""
    if not shutil.which("rpm2archive"):
        pytest.fail("rpm2archive is not installed (package rpm)")
    with open(rpm, "rb") as rpm_file:
        proc = subprocess.run(
            ["rpm2archive", "-"],
            stdin=rpm_file,
            capture_output=True,
            check=True,
        )
    with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:*") as tar:
        # the "data" filter where this Python has it (3.11.4 and later)
        options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, **options)  # nosec: our own package
    return root


@pytest.fixture(scope="module", params=hosts.RELEASES, ids=lambda r: r.id)
def release_rpm(request, tmp_path_factory):
    """(release, path) of the RPM `make rpm RELEASE=...` builds for it."""
    release = request.param
    for tool in ("rpmbuild", "rpm", "git", "make"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed: RPM build not tested")
    if not (ROOT / ".git").exists():
        pytest.fail("not a git checkout: `make rpm` uses git archive")
    topdir = tmp_path_factory.mktemp("rpmbuild")
    run(
        [
            "make",
            "rpm",
            f"RELEASE={release.rpm_release}",
            f"RPM_TOPDIR={topdir}",
            f"PYTHON={sys.executable}",
        ],
        cwd=ROOT,
    )
    rpms = list(
        (topdir / "RPMS" / "noarch").glob(f"qubes-reflink-{VERSION}-1*.rpm")
    )
    assert len(rpms) == 1, rpms
    assert list((topdir / "SRPMS").glob(f"qubes-reflink-{VERSION}-1*.src.rpm"))
    return release, rpms[0]


def test_rpm_build(release_rpm):
    """The package is made for its release's dom0 Python, and only that."""
    release, rpm = release_rpm
    sitelib = f"/usr/lib/python{release.python}/site-packages"
    files = run(["rpm", "-qlp", str(rpm)]).stdout.split()
    egg_info = f"{sitelib}/qubes_reflink-{VERSION}-py{release.python}.egg-info"
    assert f"{egg_info}/entry_points.txt" in files
    for module in (ROOT / "qubes_reflink").glob("*.py"):
        assert f"{sitelib}/qubes_reflink/{module.name}" in files
    assert all(
        path.startswith((sitelib, "/usr/bin/", "/usr/share/")) for path in files
    ), files
    assert "/usr/bin/qubes-reflink" in files
    assert any(
        re.fullmatch(r"/usr/share/licenses/.*/LICENSE", f) for f in files
    )
    assert any(re.fullmatch(r"/usr/share/doc/.*/README\.md", f) for f in files)

    requires = run(["rpm", "-qpR", str(rpm)]).stdout.splitlines()
    assert "qubes-core-dom0" in requires
    assert f"python(abi) = {release.python}" in requires
    assert not [
        r
        for r in requires
        if r.startswith("python(abi)") and release.python not in r
    ]


def test_rpm_payload_on_its_host(release_rpm, tmp_path):
    """Unpacked into a scratch root, the RPM is what its release's qubesd
    finds as `qubes-reflink`, beside the core's own `file-reflink`, with
    pools of both in one qubes.xml; its console script runs."""
    release, rpm = release_rpm
    root = unpack_rpm(rpm, tmp_path / "root")
    sitelib = root / f"usr/lib/python{release.python}/site-packages"
    (egg_info,) = sitelib.glob("qubes_reflink-*.egg-info")
    assert entry_points_of(egg_info)[GROUP] == {"qubes-reflink": OUR_VALUE}
    assert entry_points_of(egg_info)["console_scripts"] == {
        "qubes-reflink": CLI_VALUE
    }
    try:
        python = release.interpreter()
        meta = hosts.write_host_metadata(
            release.tree(), str(tmp_path / "meta"), core_file_reflink=True
        )
        env = hosts.host_environment(release, meta, extra_path=[str(sitelib)])
        hosts.check_host_imports(release, python, env)
    except hosts.HostUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    env["QUBES_REFLINK_SITE_VIEW"] = hosts.site_view_without_project(
        python, str(tmp_path / "site")
    )
    env["QUBES_REFLINK_PAYLOAD_SITELIB"] = str(sitelib)
    env["QUBES_REFLINK_PAYLOAD_SCRIPT"] = str(root / "usr/bin/qubes-reflink")
    result = subprocess.run(
        [python, "-S", os.path.join(hosts.HERE, "rpm_payload_checks.py")],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    assert "\nOK" in result.stdout, result.stdout


def test_rpm_unknown_release_is_refused(tmp_path):
    """A release the package is not built for stops before any build."""
    proc = subprocess.run(
        ["make", "rpm", "RELEASE=R4.1", f"RPM_TOPDIR={tmp_path}/top"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "RELEASE=R4.1 is not a release" in proc.stderr
    assert "use R4.2 or R4.3" in proc.stderr
    assert not (tmp_path / "top").exists()
