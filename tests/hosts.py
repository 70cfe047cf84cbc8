"""The Qubes releases the driver is tested on, and how to run code under one.

Each release pairs a qubes-core-admin source tree with the Python of that
release's dom0.  The trees are looked for in the directory
QUBES_CORE_ADMIN_TREES names, else in ``../shared/qubes-core-admin`` beside
the project, else in a cache (``~/.cache/qubes-reflink``) that
``python3 tests/hosts.py --trees`` (run by `make test`) fills from the
project's public git repository, checking each tag and commit id.  A tree
is only read: it goes on PYTHONPATH (tree, its ``test-packages/``) of a
subprocess run by that Python, never into the pytest process, where the
driver is bound to its stand-in.

What is missing (a tree, a Python, a module the host imports) is reported
as `HostUnavailable` with what to do; the tests fail on it, never skip.
"""

import ast
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TREES = os.path.join(ROOT, "..", "shared", "qubes-core-admin")
#: Where the trees come from when none are beside the checkout.
UPSTREAM = "https://github.com/QubesOS/qubes-core-admin"
#: The project's virtual environments, one per Python (`make deps`).
VENVS = os.path.join(ROOT, ".venv")

#: What the host trees import beyond the standard library, by package name
#: (setuptools for `distutils`, which Python 3.12 dropped).
HOST_PACKAGES = ("lxml", "docutils", "jinja2", "PyYAML", "setuptools")


class HostUnavailable(Exception):
    """A release can't be run here; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One Qubes release: its core's tag and its dom0 Python."""

    qubes: str
    tag: str
    python: str
    #: the commit the tree is of (a tag must name it)
    commit: str
    #: the `make rpm RELEASE=` whose package this host loads
    rpm: str = None

    @property
    def rpm_release(self):
        """The release the dom0 package for this host is built for."""
        return self.rpm or self.qubes

    @property
    def id(self):  # pylint: disable=invalid-name
        """pytest parameter id."""
        return f"{self.qubes}-{self.tag}-py{self.python}"

    def tree(self):
        """The release's qubes-core-admin source tree."""
        tree = os.path.realpath(os.path.join(trees_dir(), self.tag))
        if not has_tree(os.path.dirname(tree), self.tag):
            raise HostUnavailable(
                f"no qubes-core-admin {self.tag} tree at {tree}: run "
                "`python3 tests/hosts.py --trees` (make test does) to fetch "
                f"it, or put the unmodified source tree of {self.tag} there "
                "(git archive), or set QUBES_CORE_ADMIN_TREES to the "
                "directory holding it"
            )
        return tree

    def interpreter(self):
        """Path of a Python of this release's version."""
        return find_python(self.python)


RELEASES = (
    Release(
        "R4.2", "v4.2.39", "3.11", "56c439c31bb22562ea9427297fc2c757d800bf11"
    ),
    Release(
        "R4.3", "v4.3.50", "3.13", "68fc8b6bb9176dafac77471efa8599f6dc04da70"
    ),
    # the development branch: the next release's host
    Release(
        "next",
        "main-1ad5f9b8",
        "3.13",
        "1ad5f9b84dc1eae76d1b885d009f3e84f5503740",
        rpm="R4.3",
    ),
)


def has_tree(trees, tag):
    """Whether `trees` holds the qubes-core-admin tree `tag`."""
    return os.path.isfile(
        os.path.join(trees, tag, "qubes", "storage", "__init__.py")
    )


def cache_dir():
    """Where fetched trees are kept, outside the checkout."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "qubes-reflink", "qubes-core-admin")


def trees_dir():
    """The directory holding the trees: QUBES_CORE_ADMIN_TREES, else
    ../shared/qubes-core-admin where it exists, else the cache."""
    named = os.environ.get("QUBES_CORE_ADMIN_TREES")
    if named:
        return named
    if os.path.isdir(DEFAULT_TREES):
        return os.path.realpath(DEFAULT_TREES)
    return cache_dir()


def fetch_trees():
    """Make sure every release's tree is there, fetching what the cache
    lacks; returns the directory holding them.  HostUnavailable says what
    is missing and how to get it where they can't be fetched."""
    trees = trees_dir()
    missing = [r for r in RELEASES if not has_tree(trees, r.tag)]
    if missing and trees == cache_dir():
        for release in missing:
            fetch_tree(release, trees)
    elif missing:
        raise HostUnavailable(
            f"{trees} lacks the qubes-core-admin trees "
            f"{', '.join(r.tag for r in missing)}: put them there (git "
            f"archive of {UPSTREAM}), or unset QUBES_CORE_ADMIN_TREES to "
            "have them fetched"
        )
    return trees


def fetch_tree(release, trees, url=None):
    """Fetch `release`'s commit from `url` (QUBES_CORE_ADMIN_URL, else the
    project's public repository), check that it is that commit and that
    its tag names it, and unpack it as `trees`/<tag>."""
    url = url or os.environ.get("QUBES_CORE_ADMIN_URL", UPSTREAM)
    print(
        f"fetching qubes-core-admin {release.tag} ({release.commit}) from "
        f"{url} into {trees}",
        file=sys.stderr,
    )
    os.makedirs(trees, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=trees, prefix=".fetch-") as work:
        try:
            _fetch_checked(release, url, work)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise HostUnavailable(
                f"the qubes-core-admin tree {release.tag} is missing and "
                f"could not be fetched from {url} ({detail.strip()}); "
                f"fetch it where you are online (git archive {release.commit} "
                f"of {UPSTREAM}, unpacked as {trees}/{release.tag}), or set "
                "QUBES_CORE_ADMIN_TREES to a directory holding the trees "
                f"{', '.join(r.tag for r in RELEASES)}"
            ) from None
        os.rename(os.path.join(work, "tree"), os.path.join(trees, release.tag))


def _fetch_checked(release, url, work):
    def git(*args):
        return subprocess.run(
            ["git", "-C", work, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout.strip()

    git("init", "-q")
    git("fetch", "-q", "--depth", "1", url, release.commit)
    fetched = git("rev-parse", "FETCH_HEAD")
    if fetched != release.commit:
        raise OSError(f"fetched commit {fetched}, not {release.commit}")
    if release.tag.startswith("v"):  # a release tag must name that commit
        listed = git("ls-remote", url, f"refs/tags/{release.tag}^{{}}")
        tagged = listed.split()[0] if listed else "nothing"
        if tagged != release.commit:
            raise OSError(
                f"tag {release.tag} names {tagged}, not the pinned commit"
            )
    os.mkdir(os.path.join(work, "tree"))
    archive = subprocess.run(
        ["git", "-C", work, "archive", release.commit],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(
        ["tar", "-x", "-C", os.path.join(work, "tree")],
        input=archive,
        check=True,
    )


def venv_python(version):
    """The Python of the project's virtual environment for `version`."""
    return os.path.join(VENVS, f"py{version}", "bin", "python")


def find_python(version, base=False):
    """A Python `version` executable: the project's virtual environment
    for it (`make deps` makes it), else, and always with `base` (the one to
    make it from), this one, python`version` or python3 on PATH, pyenv's or
    uv's; each candidate is run to check that it is that version (a pyenv
    shim may name a version that is not selected) and, for `base`, that it
    can make a virtual environment."""
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    uv_root = os.path.expanduser("~/.local/share/uv/python")
    candidates = [] if base else [venv_python(version)]
    if sys.prefix == sys.base_prefix or not base:
        candidates.append(sys.executable)
    candidates += [shutil.which(f"python{version}"), shutil.which("python3")]
    for pattern in (
        os.path.join(pyenv_root, "versions", f"{version}.*", "bin", "python3"),
        os.path.join(uv_root, f"cpython-{version}.*", "bin", "python3"),
    ):
        candidates += sorted(glob.glob(pattern), key=_version_key, reverse=True)
    for candidate in candidates:
        if candidate and _runs_as(candidate, version, base):
            return candidate
    raise HostUnavailable(
        f"Python {version} is not installed (looked for python{version} and "
        f"python3 on PATH, under {pyenv_root}/versions and {uv_root}): "
        f"install it, e.g. `pyenv install {version}`, or with uv from the "
        f"package index (`pip install uv; uv python install {version}`); "
        "on Debian, the system's Python also needs python3-venv"
    )


def _runs_as(python, version, venv=False):
    """Whether `python` runs and is Python `version` (and, with `venv`,
    can make a virtual environment with pip in it)."""
    probe = "import sys; print('%d.%d' % sys.version_info[:2])"
    if venv:
        probe = "import venv, ensurepip; " + probe
    try:
        result = subprocess.run(
            [python, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return False
    return result.returncode == 0 and result.stdout.strip() == version


def _version_key(path):
    release = path.split(os.sep)[-3]
    return tuple(
        int(part) if part.isdigit() else 0 for part in release.split(".")
    )


#: The groups of the host's entry points that qubesd looks up.
HOST_GROUPS = ("qubes.vm", "qubes.ext", "qubes.devices", "qubes.storage")

#: Host entry points left out: their modules need what is not here (the
#: qrexec package; lvm and zfs run at import).  The core's own file-reflink
#: is added only where a test wants the dom0 situation: with the project
#: installed from source, that name is this driver's.
LEFT_OUT = {
    ("qubes.ext", "qubes.ext.admin"),
    ("qubes.ext", "qubes.ext.block"),
    ("qubes.devices", "block"),
    ("qubes.storage", "lvm_thin"),
    ("qubes.storage", "zfs"),
}
CORE_FILE_REFLINK = ("qubes.storage", "file-reflink")


def tree_entry_points(tree):
    """{group: ["name = value", ...]} that the tree's setup.py declares,
    read from its syntax tree (it is never run)."""
    with open(os.path.join(tree, "setup.py"), encoding="utf-8") as setup:
        module = ast.parse(setup.read())
    declared = next(
        node.value
        for node in ast.walk(module)
        if isinstance(node, ast.keyword) and node.arg == "entry_points"
    )
    found = {}
    for key, value in zip(declared.keys, declared.values):
        found[key.value] = [
            node.value
            for node in ast.walk(value)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "=" in node.value
            and ":" in node.value
        ]
    return found


def write_host_metadata(tree, directory, core_file_reflink=False):
    """A dist-info in `directory` declaring the entry points of the host
    tree `tree` that qubesd looks up, as the installed core (distribution
    ``qubes``) would; `core_file_reflink` adds the core's own driver."""
    info = os.path.join(directory, "qubes-0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w", encoding="ascii") as meta:
        meta.write("Metadata-Version: 2.1\nName: qubes\nVersion: 0\n")
    left_out = set(LEFT_OUT)
    if not core_file_reflink:
        left_out.add(CORE_FILE_REFLINK)
    lines = []
    declared = tree_entry_points(tree)
    for group in HOST_GROUPS:
        lines.append(f"[{group}]")
        for entry in declared.get(group, ()):
            name = entry.split("=", 1)[0].strip()
            if (group, name) not in left_out and "qubes.tests" not in entry:
                lines.append(entry)
    with open(
        os.path.join(info, "entry_points.txt"), "w", encoding="ascii"
    ) as out:
        out.write("\n".join(lines) + "\n")
    with open(
        os.path.join(info, "top_level.txt"), "w", encoding="ascii"
    ) as out:
        out.write("qubes\n")
    return directory


def host_environment(release, metadata_dir, extra_path=()):
    """os.environ for a subprocess that runs against `release`'s tree."""
    tree = release.tree()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [
            *extra_path,
            tree,
            os.path.join(tree, "test-packages"),
            metadata_dir,
            HERE,
        ]
    )
    # the project's own warnings are errors in the host checks too
    env["PYTHONWARNINGS"] = "error::DeprecationWarning:qubes_reflink"
    env.pop("PYTHONHOME", None)
    return env


def check_host_imports(release, python, env):
    """Raise HostUnavailable naming any module the host tree needs that
    `python` lacks (so the test says what to install, not a traceback)."""
    probe = (
        "import importlib.util, sys\n"
        "names = ['lxml', 'docutils', 'jinja2', 'yaml', 'distutils']\n"
        "print(' '.join(n for n in names if importlib.util.find_spec(n) is None))\n"
    )
    result = subprocess.run(
        [python, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    missing = result.stdout.split()
    if missing:
        raise HostUnavailable(
            f"{python} lacks modules the {release.tag} host imports: "
            f"{', '.join(missing)}; install {' '.join(HOST_PACKAGES)} for it "
            f"({python} -m pip install {' '.join(HOST_PACKAGES)}), as "
            "`make deps` does"
        )


def site_view_without_project(python, directory):
    """A directory of symlinks to everything in `python`'s site-packages
    except this project's own installation (the editable install of `make
    deps`), so that a payload under test is the only qubes_reflink there.

    A check that runs ``python -S`` adds it with `site.addsitedir` (which
    reads its .pth files, setuptools' distutils shim among them)."""
    result = subprocess.run(
        [
            python,
            "-c",
            "import site; print('\\n'.join(site.getsitepackages()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    os.makedirs(directory, exist_ok=True)
    for site_dir in result.stdout.split():
        for name in sorted(
            os.listdir(site_dir) if os.path.isdir(site_dir) else ()
        ):
            own = name.lower().replace("-", "_")
            if "qubes_reflink" in own or os.path.lexists(
                os.path.join(directory, name)
            ):
                continue
            os.symlink(
                os.path.join(site_dir, name), os.path.join(directory, name)
            )
    return directory


def main(argv):
    """For make: ``3.13`` prints the path of that Python (its virtual
    environment first), ``--base 3.13`` the one to make that from,
    ``--trees`` the directory of the host trees, fetching what is missing."""
    try:
        if argv[:1] == ["--trees"]:
            print(fetch_trees())
        elif argv[:1] == ["--base"]:
            print(find_python(argv[1], base=True))
        else:
            print(find_python(argv[0]))
    except HostUnavailable as error:
        sys.exit(f"tests/hosts.py: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
