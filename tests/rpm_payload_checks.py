"""Checks of an unpacked dom0 RPM inside the real qubesd host code, run by
tests/test_packaging.py in a subprocess under the release's own Python.

The subprocess runs ``python -S`` with PYTHONPATH = the payload's
site-packages, the release's qubes-core-admin tree (and its test-packages),
a dist-info declaring the tree's entry points *with* the core's own
``file-reflink`` (as the installed core does on dom0), and tests/.  The
Python's own site-packages come in through QUBES_REFLINK_SITE_VIEW, a view
without this project's editable install: the payload's qubes_reflink is the
only one there is, as on dom0.

Usage: PYTHON -S rpm_payload_checks.py [CHECK_CLASS ...]
"""

# pylint: disable=wrong-import-position,import-error,invalid-name
# pylint: disable=missing-docstring,protected-access
import os
import site
import subprocess
import sys
import unittest

site.addsitedir(os.environ["QUBES_REFLINK_SITE_VIEW"])
PAYLOAD_SITELIB = os.environ["QUBES_REFLINK_PAYLOAD_SITELIB"]
PAYLOAD_SCRIPT = os.environ["QUBES_REFLINK_PAYLOAD_SCRIPT"]

import qubes
import qubes.storage
import qubes.storage.reflink as core_reflink
import qubes.utils

import qubes_reflink
from qubes_reflink import pool as reflink_pool_module
from qubes_reflink.pool import ReflinkPool

import real_host_checks
from real_host_checks import HostCase, read_at, vol_file, write_at

OUR_NAME = "qubes-reflink"
CORE_NAME = "file-reflink"


def setUpModule():
    real_host_checks.setUpModule()


def tearDownModule():
    real_host_checks.tearDownModule()


class TC_00_Lookup(unittest.TestCase):
    """The host's own lookup finds each driver under its dom0 name."""

    def test_000_payload_is_the_driver(self):
        self.assertTrue(
            qubes_reflink.__file__.startswith(PAYLOAD_SITELIB + os.sep),
            qubes_reflink.__file__,
        )

    def test_010_names(self):
        drivers = qubes.storage.pool_drivers()
        self.assertIn(OUR_NAME, drivers)
        self.assertIn(CORE_NAME, drivers)
        ours = qubes.utils.get_entry_point_one(
            qubes.storage.STORAGE_ENTRY_POINT, OUR_NAME
        )
        core = qubes.utils.get_entry_point_one(
            qubes.storage.STORAGE_ENTRY_POINT, CORE_NAME
        )
        self.assertIs(ours, ReflinkPool)
        self.assertIs(core, core_reflink.ReflinkPool)
        self.assertEqual(reflink_pool_module.driver_name(), OUR_NAME)


class TC_10_SideBySide(HostCase):
    """A qubes.xml holding pools of both drivers loads and runs VMs."""

    def make_vms(self, pool, prefix):
        tpl = self.app.add_new_vm(
            "TemplateVM", label="black", name=f"{prefix}-tpl"
        )
        self.run_coro(tpl.create_on_disk(pool=pool))
        appvm = self.app.add_new_vm(
            "AppVM", label="red", name=f"{prefix}-vm", template=tpl
        )
        self.run_coro(appvm.create_on_disk(pool=pool))
        write_at(
            vol_file(pool, tpl.volumes["root"].vid, ".img"), prefix.encode()
        )
        return appvm

    def add(self, name, driver):
        return self.run_coro(
            self.app.add_pool(
                name=name,
                driver=driver,
                dir_path=os.path.join(self.top, name),
            )
        )

    def test_000_both_drivers(self):
        ours = self.add("ours", OUR_NAME)
        core = self.add("core", CORE_NAME)
        self.assertIsInstance(ours, ReflinkPool)
        self.assertIsInstance(core, core_reflink.ReflinkPool)
        self.make_vms(ours, "ours")
        self.make_vms(core, "core")
        self.app.save()
        with open(self.xml_path, encoding="utf-8") as xml:
            text = xml.read()
        self.assertIn(f'driver="{OUR_NAME}"', text)
        self.assertIn(f'driver="{CORE_NAME}"', text)

        app = self.new_app(load=True)
        self.other_apps.append(app)
        self.assertIsInstance(app.pools["ours"], ReflinkPool)
        self.assertIsInstance(app.pools["core"], core_reflink.ReflinkPool)
        for prefix in ("ours", "core"):
            self.run_vm(app, prefix)

    def run_vm(self, app, prefix):
        """Start the AppVM of a pool, see its template's root, write its
        private, stop it: the data is committed."""
        appvm = app.domains[f"{prefix}-vm"]
        self.run_coro(qubes.utils.coro_maybe(appvm.storage.verify()))
        self.run_coro(appvm.storage.start())
        devs = {dev.name: dev.path for dev in appvm.storage.block_devices()}
        self.assertEqual(read_at(devs["root"], 4), prefix.encode())
        write_at(devs["private"], b"HOME" + prefix.encode())
        self.run_coro(appvm.storage.stop())
        self.settle(appvm)
        private = appvm.volumes["private"]
        self.assertEqual(
            read_at(vol_file(private.pool, private.vid, ".img"), 8),
            b"HOME" + prefix.encode(),
        )


class TC_20_ConsoleScript(unittest.TestCase):
    """/usr/bin/qubes-reflink of the payload runs under this Python."""

    def script(self, *args):
        env = dict(os.environ, PYTHONPATH=PAYLOAD_SITELIB)
        return subprocess.run(
            [sys.executable, "-S", PAYLOAD_SCRIPT, *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    def test_000_shebang(self):
        with open(PAYLOAD_SCRIPT, encoding="utf-8") as script:
            self.assertEqual(script.readline(), "#!/usr/bin/python3\n")

    def test_010_help(self):
        result = self.script("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("usage: qubes-reflink", result.stdout)

    def test_020_check(self):
        btrfs = self.script("check", real_host_checks.MNT["btrfs"])
        self.assertEqual(btrfs.returncode, 0, btrfs.stdout + btrfs.stderr)
        ext4 = self.script("check", real_host_checks.MNT["ext4"])
        self.assertEqual(ext4.returncode, 1, ext4.stdout + ext4.stderr)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"] + sys.argv[1:], exit=True)
