"""The Qubes releases the driver is tested on, and how to run code under one.

Each release pairs a qubes-core-admin source tree (under
``../shared/qubes-core-admin`` beside the project, or the directory named by
QUBES_CORE_ADMIN_TREES) with the Python of that release's dom0.  A tree is
only read: it goes on PYTHONPATH (tree, its ``test-packages/``) of a
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TREES = os.path.join(ROOT, "..", "shared", "qubes-core-admin")

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
        trees = os.environ.get("QUBES_CORE_ADMIN_TREES", DEFAULT_TREES)
        tree = os.path.realpath(os.path.join(trees, self.tag))
        if not os.path.isfile(
            os.path.join(tree, "qubes", "storage", "__init__.py")
        ):
            raise HostUnavailable(
                f"no qubes-core-admin {self.tag} tree at {tree}: put the "
                f"unmodified source tree of tag {self.tag} there (git "
                "archive), or set QUBES_CORE_ADMIN_TREES to the directory "
                "holding it"
            )
        return tree

    def interpreter(self):
        """Path of a Python of this release's version."""
        return find_python(self.python)


RELEASES = (
    Release("R4.2", "v4.2.39", "3.11"),
    Release("R4.3", "v4.3.50", "3.13"),
    # the development branch: the next release's host
    Release("next", "main-1ad5f9b8", "3.13", rpm="R4.3"),
)


def find_python(version):
    """A Python `version` executable: this one, python`version` on PATH, or
    pyenv's; each candidate is run to check that it is that version (a
    pyenv shim may name a version that is not selected)."""
    if "{}.{}".format(*sys.version_info[:2]) == version:
        return sys.executable
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(
        glob.glob(
            os.path.join(
                pyenv_root, "versions", f"{version}.*", "bin", "python3"
            )
        ),
        key=_version_key,
        reverse=True,
    )
    candidates.append(shutil.which(f"python{version}"))
    for candidate in candidates:
        if candidate and _runs_as(candidate, version):
            return candidate
    raise HostUnavailable(
        f"Python {version} is not installed (looked for python{version} on "
        f"PATH and under {pyenv_root}/versions): install it, e.g. "
        f"`pyenv install {version}`"
    )


def _runs_as(python, version):
    """Whether `python` runs and is Python `version`."""
    try:
        result = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
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


if __name__ == "__main__":
    # `python3 tests/hosts.py 3.13`: the path of that Python (for make)
    try:
        print(find_python(sys.argv[1]))
    except HostUnavailable as error:
        sys.exit(f"tests/hosts.py: {error}")
