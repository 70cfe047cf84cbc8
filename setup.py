"""Packaging of qubes-reflink, the file-reflink storage pool driver."""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent
VERSION = (HERE / "version").read_text(encoding="ascii").strip()

setuptools.setup(
    name="qubes-reflink",
    version=VERSION,
    description="Qubes OS storage pool driver snapshotting image files "
    "with reflinks (btrfs, XFS)",
    license="LGPL-2.1-or-later",
    packages=["qubes_reflink"],
    python_requires=">=3.11",
    entry_points={
        "qubes.storage": [
            "file-reflink = qubes_reflink.pool:ReflinkPool",
        ],
        "console_scripts": [
            "qubes-reflink = qubes_reflink.cli:main",
        ],
    },
    extras_require={
        # black and pylint pinned to a release line: a new line restyles
        # or adds checks, which would fail `make lint` on an unchanged tree
        "test": [
            "pytest>=8",
            "pytest-asyncio>=0.23",
            "hypothesis>=6",
            "black>=26,<27",
            "pylint>=4,<5",
            # what the qubes-core-admin trees of the real-host tests import
            # (setuptools for distutils, gone from Python 3.12)
            "lxml",
            "docutils",
            "jinja2",
            "PyYAML",
            "setuptools",
            # the write-logging block device of the power-cut tests
            # (libfuse3 itself: the system package fuse3)
            "mfusepy",
        ],
        "bench": ["matplotlib>=3.7"],
    },
)
