"""Checks of the driver inside the real qubesd host code, run by
tests/test_real_host.py in a subprocess under the release's own Python,
with one qubes-core-admin release tree on PYTHONPATH.

Everything goes through the host's own code: ``Qubes.add_pool`` and
``remove_pool``, qubes.xml save and load, the real TemplateVM/AppVM/DispVM/
StandaloneVM classes and ``qubes.storage.Storage``, and the handlers of the
Admin API (``qubes.api.admin``/``qubes.api.internal``), driven as the host's
own tests drive them.  Where R4.2 and R4.3 differ, the checks ask the host
what it has (``HOST``) and expect what that release does.

Usage: PYTHON real_host_checks.py [CHECK_CLASS ...]
"""

# pylint: disable=import-error,too-many-lines,too-many-statements
# pylint: disable=protected-access,invalid-name,missing-docstring
import contextlib
import importlib.metadata
import inspect
import os
import shutil
import sys
import tempfile
import time
import unittest
import unittest.mock

import qubes
import qubes.api
import qubes.api.admin
import qubes.api.internal
import qubes.config
import qubes.exc
import qubes.storage
import qubes.tests
import qubes.tests.storage
import qubes.utils
import qubes.vm

from loopfs import loop_filesystem

import qubes_reflink
from qubes_reflink import btrfs, cli, fileops, layout
from qubes_reflink import host as reflink_host
from qubes_reflink import pool as reflink_pool_module
from qubes_reflink.pool import ReflinkPool
from qubes_reflink.volume import ReflinkVolume

MIB = 1024**2
STACK = contextlib.ExitStack()
MNT = {}


class HOST:
    """What this host release has, asked of its code (R4.2 lacks all)."""

    #: qubes.exc on R4.3; qubes.storage (re-exported on R4.3) before
    storage_error = getattr(
        qubes.exc, "StoragePoolException", qubes.storage.StoragePoolException
    )
    #: per-volume running-state files under VOLUME_STATE_DIR
    state_files = hasattr(qubes.storage, "VOLUME_STATE_DIR")
    #: Storage.set_revisions_to_keep, with its "source is running" checks
    set_revisions_to_keep = hasattr(
        qubes.storage.Storage, "set_revisions_to_keep"
    )
    #: the Admin API takes revisions_to_keep=-1 (snapshots disabled)
    api_negative_revisions = (
        "allow_negative"
        in inspect.signature(
            # validate_number on the development branch
            getattr(
                qubes.api.AbstractQubesAPI,
                "validate_size",
                getattr(qubes.api.AbstractQubesAPI, "validate_number", None),
            )
        ).parameters
    )
    #: qubes.xml gets "False" for a False bool (R4.2 leaves it out)
    writes_false = qubes.storage._sanitize_config({"x": False}) == {
        "x": "False"
    }
    #: what Revert of an unknown revision raises
    revision_not_found = tuple(
        exc
        for exc in (
            qubes.api.PermissionDenied,
            getattr(qubes.exc, "QubesVolumeRevisionNotFoundError", None),
        )
        if exc is not None
    )


def setUpModule():
    """One loop-mounted btrfs for the pools, one XFS, one ext4 (no
    reflinks)."""
    MNT["btrfs"] = STACK.enter_context(
        loop_filesystem("btrfs", size=2 * 1024**3)
    )
    MNT["xfs"] = STACK.enter_context(loop_filesystem("xfs", size=512 * MIB))
    MNT["ext4"] = STACK.enter_context(loop_filesystem("ext4", size=256 * MIB))


def tearDownModule():
    STACK.close()


def write_new(path, data):
    with open(path, "xb") as image:
        image.write(data)


def read_at(path, length, offset=0):
    with open(path, "rb") as image:
        image.seek(offset)
        return image.read(length)


def write_at(path, data, offset=0):
    with open(path, "r+b") as image:
        image.seek(offset)
        image.write(data)


def vol_file(pool, vid, suffix):
    return os.path.join(pool.dir_path, vid + suffix)


class HostCase(qubes.tests.QubesTestCase):
    """A host app in offline mode with /var/lib/qubes moved to btrfs."""

    def setUp(self):
        super().setUp()
        self.other_apps = []
        self.top = tempfile.mkdtemp(prefix="host-", dir=MNT["btrfs"])
        self.base = os.path.join(self.top, "varlibqubes")
        self.xml_path = os.path.join(self.top, "qubes.xml")
        self.state_dir = os.path.join(self.top, "run") + "/"
        os.makedirs(self.state_dir)
        kernels = os.path.join(self.base, "vm-kernels")
        for name in ("vmlinuz", "initramfs", "modules.img"):
            os.makedirs(os.path.join(kernels, "1.0"), exist_ok=True)
            with open(os.path.join(kernels, "1.0", name), "wb"):
                pass
        pool_configs = qubes.config.defaults["pool_configs"]
        for patch in (
            unittest.mock.patch.dict(
                qubes.config.system_path, {"qubes_base_dir": self.base}
            ),
            unittest.mock.patch("qubes.config.qubes_base_dir", self.base),
            unittest.mock.patch.dict(
                pool_configs["varlibqubes"], {"dir_path": self.base}
            ),
            unittest.mock.patch.dict(
                pool_configs["linux-kernel"], {"dir_path": kernels}
            ),
            unittest.mock.patch(
                "qubes.app.validate_kernel", lambda *args: None
            ),
        ) + self.state_dir_patches():
            patch.start()
            self.addCleanup(patch.stop)
        self.app = self.new_app()
        self.app.load_initial_values()
        self.app.default_kernel = "1.0"
        self.app.default_netvm = None
        self.loop.run_until_complete(self.app.setup_pools())

    def state_dir_patches(self):
        """R4.3 keeps running-state files in VOLUME_STATE_DIR: a scratch one."""
        if not HOST.state_files:
            return ()
        return (
            unittest.mock.patch(
                "qubes.storage.VOLUME_STATE_DIR", self.state_dir
            ),
        )

    def new_app(self, load=False):
        return qubes.Qubes(self.xml_path, load=load, offline_mode=True)

    def tearDown(self):
        for app in [self.app] + getattr(self, "other_apps", []):
            for pool in app.pools.values():
                if isinstance(pool, ReflinkPool):
                    self.run_coro(pool.wait_background())
                    self.run_coro(pool.close())
            app.close()
        # the host's leak check fails on any Qubes or VM object left
        for name, value in list(vars(self).items()):
            if name == "other_apps" or isinstance(
                value, (qubes.Qubes, qubes.vm.BaseVM)
            ):
                delattr(self, name)
        shutil.rmtree(self.top, ignore_errors=True)
        super().tearDown()

    def run_coro(self, coro):
        return self.loop.run_until_complete(coro)

    def add_pool(self, name="rl", **options):
        options.setdefault("dir_path", os.path.join(self.top, name))
        return self.run_coro(
            self.app.add_pool(name=name, driver="file-reflink", **options)
        )

    def settle(self, *vms):
        for vm in vms:
            for volume in vm.volumes.values():
                if isinstance(volume, ReflinkVolume):
                    self.run_coro(volume.settle())


# -- loading ---------------------------------------------------------


class TC_00_Loading(unittest.TestCase):
    """The host finds the driver and binds it to its own classes."""

    def test_000_entry_point(self):
        self.assertIn("file-reflink", qubes.storage.pool_drivers())
        klass = qubes.utils.get_entry_point_one(
            qubes.storage.STORAGE_ENTRY_POINT, "file-reflink"
        )
        self.assertIs(klass, ReflinkPool)
        self.assertTrue(reflink_host.REAL_HOST)
        self.assertTrue(issubclass(ReflinkPool, qubes.storage.Pool))
        self.assertTrue(issubclass(ReflinkVolume, qubes.storage.Volume))
        self.assertIs(
            reflink_host.StoragePoolException,
            HOST.storage_error,
        )
        self.assertIs(reflink_host.BlockDevice, qubes.storage.BlockDevice)
        self.assertIs(qubes_reflink.ReflinkPool, ReflinkPool)

    def test_010_driver_parameters(self):
        # what qvm-pool and admin.pool.ListDrivers show: R4.3 says which
        # are required, R4.2 lists the names
        expected = {
            "dir_path": True,
            "revisions_to_keep": False,
            "setup_check": False,
            "ephemeral_volatile": False,
            "keep_revision_older_than": False,
            "auto_defrag": False,
            "defrag_threshold": False,
            "defrag_interval": False,
        }
        parameters = qubes.storage.driver_parameters("file-reflink")
        if isinstance(parameters, dict):
            self.assertEqual(parameters, expected)
        else:
            self.assertEqual(sorted(parameters), sorted(expected))


# -- pools ---------------------------------------------------------------


class TC_10_Pool(HostCase):
    def test_000_default_pool_is_ours(self):
        # load_initial_values picks file-reflink for a reflink-capable
        # /var/lib/qubes, with setup_check=False: that is this driver
        pool = self.app.pools["varlibqubes"]
        self.assertIsInstance(pool, ReflinkPool)
        self.assertFalse(pool.setup_check)
        self.assertEqual(pool.dir_path, self.base)

    def test_010_add_pool(self):
        pool = self.add_pool(revisions_to_keep="2")
        self.assertIsInstance(pool, ReflinkPool)
        self.assertIs(self.app.pools["rl"], pool)
        self.assertEqual(pool.revisions_to_keep, 2)
        for prefix in ("appvms", "vm-templates"):
            self.assertTrue(os.path.isdir(os.path.join(pool.root, prefix)))
        self.assertEqual(
            dict(pool.__xml__().attrib),
            {
                "name": "rl",
                "driver": "file-reflink",
                "dir_path": os.path.join(self.top, "rl"),
                "revisions_to_keep": "2",
                "setup_check": "True",
                "ephemeral_volatile": "False",
                "keep_revision_older_than": "0",
                "auto_defrag": "True",
                "defrag_threshold": "2048",
                "defrag_interval": "86400",
            },
        )
        self.assertEqual(pool.included_in(self.app), None)
        details = pool.usage_details
        self.assertGreater(details["data_size"], 0)
        self.assertGreaterEqual(details["data_usage"], 0)
        self.assertEqual(list(pool.volumes), [])

    def test_011_included_in(self):
        inner = self.add_pool(
            "inner", dir_path=os.path.join(self.base, "inner")
        )
        self.assertIs(
            inner.included_in(self.app), self.app.pools["varlibqubes"]
        )

    def test_020_xml_round_trip(self):
        pool = self.add_pool(
            revisions_to_keep="-1", ephemeral_volatile="yes", setup_check="no"
        )
        self.app.save()
        app2 = self.new_app(load=True)
        self.other_apps.append(app2)
        loaded = app2.pools["rl"]
        self.assertIsInstance(loaded, ReflinkPool)
        self.assertEqual(loaded.config, pool.config)
        self.assertEqual(loaded.revisions_to_keep, -1)
        self.assertTrue(loaded.ephemeral_volatile)
        self.assertFalse(loaded.setup_check)
        self.assertEqual(
            dict(loaded.__xml__().attrib), dict(pool.__xml__().attrib)
        )

    def test_030_setup_refuses_no_reflink(self):
        plain = tempfile.mkdtemp(prefix="noreflink-", dir=MNT["ext4"])
        self.assertFalse(_reflinks(plain), f"{plain} is on ext4")
        with self.assertRaisesRegex(HOST.storage_error, "setup_check=no"):
            self.add_pool("plain", dir_path=os.path.join(plain, "p"))
        self.assertNotIn("plain", self.app.pools)
        pool = self.add_pool(
            "plain", dir_path=os.path.join(plain, "p"), setup_check="False"
        )
        self.assertFalse(pool.setup_check)
        self.assertEqual(pool.__xml__().get("setup_check"), "False")

    def test_040_bad_options(self):
        for options in (
            {"dir_path": "relative/dir"},
            {"revisions_to_keep": "-2"},
            {"revisions_to_keep": "many"},
            {"setup_check": "maybe"},
            {"ephemeral_volatile": "2"},
        ):
            with self.subTest(options=options):
                with self.assertRaises(qubes.exc.QubesException):
                    self.add_pool("bad", **options)
                self.assertNotIn("bad", self.app.pools)

    def test_050_remove_pool(self):
        self.add_pool()
        self.run_coro(self.app.remove_pool("rl"))
        self.assertNotIn("rl", self.app.pools)
        # files stay: qubesd never calls destroy() on remove_pool
        self.assertTrue(os.path.isdir(os.path.join(self.top, "rl")))


def _reflinks(directory):
    """Whether `directory` can reflink."""
    return fileops.can_reflink(
        layout.probe_path(directory), layout.probe_path(directory)
    )


# -- init_volume with the configs the host passes ------------------------


class TC_20_VolumeConfigs(HostCase):
    def setUp(self):
        super().setUp()
        self.pool = self.add_pool(revisions_to_keep="2")
        self.app.default_pool = self.pool

    def test_000_config_from_creation(self):
        vm = qubes.tests.storage.TestVM(self)
        volume = self.pool.init_volume(
            vm,
            {
                "name": "private",
                "pool": self.pool,
                "save_on_stop": True,
                "rw": True,
                "size": 2 * MIB,
                "snap_on_start": False,
                "source": None,
            },
        )
        self.assertIsInstance(volume, qubes.storage.Volume)
        self.assertEqual(volume.vid, f"appvms/{vm.name}/private")
        self.assertEqual(volume.revisions_to_keep, 2)
        self.assertIs(volume.pool, self.pool)
        self.assertEqual(volume.pool, "rl")
        self.assertIn(volume, self.pool.volumes)
        self.assertIs(self.pool.volumes[volume.vid], volume)
        expected = {
            "name": "private",
            "pool": "rl",
            "vid": f"appvms/{vm.name}/private",
            "revisions_to_keep": "2",
            "rw": "True",
            "save_on_stop": "True",
            "size": str(2 * MIB),
        }
        if HOST.writes_false:
            expected["snap_on_start"] = "False"
        self.assertEqual(dict(volume.__xml__().attrib), expected)

    def test_010_config_from_xml_strings(self):
        vm = qubes.tests.storage.TestTemplateVM(self)
        vid = f"vm-templates/{vm.name}/root"
        config = {
            "name": "root",
            "pool": "rl",
            "vid": vid,
            "revisions_to_keep": "-1",
            "rw": True,
            "save_on_stop": True,
            "snap_on_start": False,
            "size": str(3 * MIB),
        }
        volume = self.pool.init_volume(vm, dict(config))
        self.assertEqual(volume.vid, vid)
        self.assertEqual(volume.revisions_to_keep, -1)
        self.assertEqual(volume.size, 3 * MIB)
        self.assertTrue(volume.snapshots_disabled)
        self.assertEqual(
            qubes.storage._sanitize_config(volume.config),
            qubes.storage._sanitize_config(config),
        )
        # a snapshot of it, with source as the host resolves it
        app_vm = qubes.tests.storage.TestVM(self)
        snap = self.pool.init_volume(
            app_vm,
            {
                "name": "root",
                "pool": "rl",
                "vid": f"appvms/{app_vm.name}/root",
                "snap_on_start": True,
                "save_on_stop": False,
                "rw": True,
                "source": self.pool.volumes[vid],
                "size": str(3 * MIB),
                "revisions_to_keep": "2",
            },
        )
        self.assertIs(snap.source, volume)
        self.assertEqual(snap.config["source"], vid)

    def test_020_ephemeral(self):
        vm = qubes.tests.storage.TestVM(self)
        volatile = self.pool.init_volume(
            vm, {"name": "volatile", "rw": True, "size": MIB}
        )
        self.assertFalse(volatile.ephemeral)
        self.pool.ephemeral_volatile = True  # admin.pool.Set...
        self.assertTrue(volatile.ephemeral)
        self.assertNotIn("ephemeral", volatile.config)
        volatile.ephemeral = False  # admin.vm.volume.Set.ephemeral
        self.assertFalse(volatile.ephemeral)
        self.assertEqual(volatile.config["ephemeral"], False)
        loaded = self.pool.init_volume(
            vm,
            {
                "name": "volatile",
                "rw": True,
                "size": "1",
                "ephemeral": True,
            },
        )
        self.assertTrue(loaded.ephemeral)
        private = self.pool.init_volume(
            vm, {"name": "private", "rw": True, "save_on_stop": True}
        )
        with self.assertRaises(qubes.exc.QubesValueError):
            private.ephemeral = True

    def test_030_refusals(self):
        vm = qubes.tests.storage.TestVM(self)
        vm.dir_path_prefix = "elsewhere"
        with self.assertRaises(HOST.storage_error):
            self.pool.init_volume(vm, {"name": "private"})
        vm = qubes.tests.storage.TestVM(self)
        with self.assertRaises(HOST.storage_error):
            self.pool.init_volume(vm, {"name": "x", "vid": "../../etc/x"})
        with self.assertRaises(HOST.storage_error):
            self.pool.init_volume(vm, {"name": "root", "snap_on_start": True})

    def test_040_core_tc10_import_data_empty(self):
        # the host's TC_10_ReflinkPool.test_012_import_data_empty
        vm = qubes.tests.storage.TestVM(self)
        volume = self.pool.init_volume(
            vm,
            {
                "name": "root",
                "pool": self.pool.name,
                "save_on_stop": True,
                "rw": True,
                "size": MIB,
            },
        )
        self.run_coro(volume.create())
        exported = self.run_coro(volume.export())
        with open(exported, "w", encoding="ascii") as export_file:
            export_file.write("test data")
        self.run_coro(volume.export_end(exported))
        import_path = self.run_coro(volume.import_data(volume.size))
        self.assertNotEqual(volume.path, import_path)
        with open(import_path, "w+", encoding="ascii"):
            pass
        self.run_coro(volume.import_data_end(True))
        self.assertFalse(os.path.exists(import_path))
        exported = self.run_coro(volume.export())
        with open(exported, encoding="ascii") as export_file:
            self.assertNotEqual(export_file.read().strip("\0"), "test data")
        self.run_coro(volume.export_end(exported))
        self.run_coro(volume.remove())

    def test_050_core_tc10_private_snapshots_disabled(self):
        # the host's TC_10_ReflinkPool.test_120, by public behaviour
        vm = qubes.tests.storage.TestVM(self)
        volume = self.pool.init_volume(
            vm,
            {
                "name": "private",
                "pool": self.pool.name,
                "save_on_stop": True,
                "rw": True,
                "size": qubes.config.defaults["root_img_size"],
                "revisions_to_keep": -1,
            },
        )
        self.assertEqual(volume.pool, self.pool.name)
        self.run_coro(volume.create())
        self.run_coro(volume.start())
        dirty = os.path.join(
            self.pool.dir_path, "appvms", vm.name, "private-dirty.img"
        )
        self.assertEqual(volume.block_device().path, dirty)
        directory = os.path.dirname(dirty)
        self.assertEqual(os.listdir(directory), ["private-dirty.img"])
        self.run_coro(volume.stop())
        self.run_coro(volume.settle())
        self.assertEqual(os.listdir(directory), ["private.img"])
        self.run_coro(volume.remove())


# -- the real VM classes through qubes.storage.Storage -------------------


class VMsCase(HostCase):
    def setUp(self):
        super().setUp()
        self.pool = self.add_pool(revisions_to_keep="2")
        self.app.default_pool = self.pool
        self.app.save = unittest.mock.Mock(wraps=self.app.save)
        self.tpl = self.app.add_new_vm(
            "TemplateVM", label="black", name="test-template"
        )
        self.run_coro(self.tpl.create_on_disk())
        self.app.default_template = self.tpl
        self.appvm = self.app.add_new_vm(
            "AppVM", label="red", name="test-vm1", template=self.tpl
        )
        self.run_coro(self.appvm.create_on_disk())

    def start(self, vm):
        self.run_coro(vm.storage.verify())
        self.run_coro(vm.storage.start())
        return {dev.name: dev.path for dev in vm.storage.block_devices()}

    def stop(self, vm):
        self.run_coro(vm.storage.stop())
        self.settle(vm)

    def committed(self, volume):
        return vol_file(volume.pool, volume.vid, ".img")

    def import_volume(self, vm, name, src_volume):
        """What qvm-clone does per volume: R4.3's Storage.import_volume,
        else (R4.2) the volume's own import_volume, as its Storage does."""
        if hasattr(vm.storage, "import_volume"):
            coro = vm.storage.import_volume(vm.volumes[name], src_volume)
        else:
            coro = vm.volumes[name].import_volume(src_volume)
        self.run_coro(qubes.utils.coro_maybe(coro))


class TC_30_RealVMs(VMsCase):
    def test_000_created(self):
        for vm in (self.tpl, self.appvm):
            for name in ("root", "private", "volatile"):
                volume = vm.volumes[name]
                self.assertIsInstance(volume, ReflinkVolume)
                self.assertIs(volume.pool, self.pool)
                self.assertEqual(
                    volume.vid, f"{vm.dir_path_prefix}/{vm.name}/{name}"
                )
        self.assertIs(
            self.appvm.volumes["root"].source, self.tpl.volumes["root"]
        )
        for name in ("root", "private"):
            self.assertTrue(
                os.path.exists(self.committed(self.tpl.volumes[name]))
            )
        self.assertTrue(
            os.path.exists(self.committed(self.appvm.volumes["private"]))
        )
        self.assertFalse(
            os.path.exists(self.committed(self.appvm.volumes["root"]))
        )

    def test_010_lifecycle(self):
        devs = self.start(self.tpl)
        self.assertEqual(
            devs["root"],
            vol_file(
                self.pool, "vm-templates/test-template/root", "-dirty.img"
            ),
        )
        if HOST.state_files:  # R4.3's bookkeeping of running volumes
            self.assertTrue(os.path.exists(self.tpl.volumes["root"].state_file))
            self.assertTrue(self.tpl.volumes["root"].is_running())
        self.assertTrue(self.tpl.volumes["root"].is_dirty())
        write_at(devs["root"], b"template-v1")
        write_at(devs["private"], b"tpl-private")
        self.stop(self.tpl)
        if HOST.state_files:
            self.assertFalse(self.tpl.volumes["root"].is_running())
        root = self.tpl.volumes["root"]
        self.assertEqual(read_at(self.committed(root), 11), b"template-v1")
        self.assertEqual(len(root.revisions), 1)

        devs = self.start(self.appvm)
        self.assertEqual(read_at(devs["root"], 11), b"template-v1")
        self.assertEqual(read_at(devs["volatile"], 4), b"\0\0\0\0")
        self.assertEqual(self.appvm.storage.outdated_volumes, [])
        self.assertFalse(self.appvm.volumes["root"].is_outdated())
        write_at(devs["private"], b"appvm-private")
        write_at(devs["root"], b"scratch-root")

        # the template is updated while the AppVM runs
        tdevs = self.start(self.tpl)
        # export while running: the committed data from before start
        path = self.run_coro(self.tpl.storage.export("root"))
        self.assertEqual(read_at(path, 11), b"template-v1")
        write_at(tdevs["root"], b"template-v2")
        self.stop(self.tpl)
        self.assertEqual(read_at(path, 11), b"template-v1")
        self.run_coro(self.tpl.storage.export_end("root", path))
        self.assertFalse(os.path.exists(path))
        self.assertTrue(self.appvm.volumes["root"].is_outdated())
        self.assertEqual(read_at(devs["root"], 12), b"scratch-root")

        # AppVM export while running: its private from before start
        path = self.run_coro(self.appvm.storage.export("private"))
        self.assertEqual(read_at(path, 4), b"\0\0\0\0")
        self.run_coro(self.appvm.storage.export_end("private", path))

        self.stop(self.appvm)
        private = self.appvm.volumes["private"]
        self.assertEqual(read_at(self.committed(private), 13), b"appvm-private")
        devs = self.start(self.appvm)
        self.assertEqual(read_at(devs["root"], 11), b"template-v2")
        self.assertFalse(self.appvm.volumes["root"].is_outdated())
        self.stop(self.appvm)
        self.assertEqual(len(root.revisions), 2)
        devs = self.start(self.tpl)
        self.stop(self.tpl)
        self.assertEqual(len(root.revisions), 2)  # pruned to 2

    def test_020_dispvm(self):
        self.appvm.template_for_dispvms = True
        devs = self.start(self.appvm)
        write_at(devs["private"], b"dvm-template-home")
        self.stop(self.appvm)
        disp = self.app.add_new_vm(
            "DispVM",
            label="red",
            name="disp123",
            template=self.appvm,
            dispid=123,
        )
        self.run_coro(disp.create_on_disk())
        self.assertEqual(disp.dir_path_prefix, "appvms")
        self.assertIs(disp.volumes["root"].source, self.tpl.volumes["root"])
        self.assertIs(
            disp.volumes["private"].source, self.appvm.volumes["private"]
        )
        devs = self.start(disp)
        self.assertEqual(read_at(devs["private"], 17), b"dvm-template-home")
        write_at(devs["private"], b"disposable-data")
        self.stop(disp)
        self.assertEqual(
            read_at(self.committed(self.appvm.volumes["private"]), 17),
            b"dvm-template-home",
        )
        self.run_coro(disp.storage.remove())
        self.settle(self.appvm, self.tpl)
        self.assertFalse(
            os.path.exists(
                os.path.join(self.pool.dir_path, "appvms", "disp123")
            )
        )
        for vid in ("appvms/disp123/root", "appvms/disp123/private"):
            self.assertNotIn(vid, self.pool.volumes)

    def test_030_clone_and_remove(self):
        devs = self.start(self.appvm)
        write_at(devs["private"], b"to-be-cloned")
        self.stop(self.appvm)
        clone = self.app.add_new_vm(
            "AppVM", label="red", name="test-clone", template=self.tpl
        )
        self.run_coro(clone.clone_disk_files(self.appvm))
        self.settle(clone)
        self.assertEqual(
            read_at(self.committed(clone.volumes["private"]), 12),
            b"to-be-cloned",
        )
        # clone into another pool of this driver (not the same object)
        other = self.add_pool("other")
        clone2 = self.app.add_new_vm(
            "AppVM", label="red", name="test-clone2", template=self.tpl
        )
        self.run_coro(
            clone2.clone_disk_files(self.appvm, pools={"private": other})
        )
        self.settle(clone2)
        self.assertIs(clone2.volumes["private"].pool, other)
        self.assertEqual(
            read_at(self.committed(clone2.volumes["private"]), 12),
            b"to-be-cloned",
        )
        for vm in (clone, clone2):
            self.run_coro(vm.storage.remove())
            self.settle(vm)
        self.assertEqual(
            os.listdir(os.path.join(self.pool.dir_path, "appvms")),
            ["test-vm1"],
        )
        self.assertEqual(os.listdir(os.path.join(other.dir_path, "appvms")), [])

    def test_040_import_data_and_resize(self):
        private = self.appvm.volumes["private"]
        path = self.run_coro(self.appvm.storage.import_data("private", 4 * MIB))
        write_at(path, b"imported")
        self.run_coro(self.appvm.storage.import_data_end("private", True))
        self.settle(self.appvm)
        self.assertEqual(private.size, 4 * MIB)
        self.assertEqual(read_at(self.committed(private), 8), b"imported")
        path = self.run_coro(self.appvm.storage.import_data("private", None))
        write_at(path, b"discard!")
        self.run_coro(self.appvm.storage.import_data_end("private", False))
        self.assertFalse(os.path.exists(path))
        self.assertEqual(read_at(self.committed(private), 8), b"imported")

        self.run_coro(self.appvm.storage.resize("private", 8 * MIB))
        self.settle(self.appvm)
        self.assertEqual(private.size, 8 * MIB)
        self.assertEqual(os.stat(self.committed(private)).st_size, 8 * MIB)
        devs = self.start(self.appvm)
        self.run_coro(self.appvm.storage.resize("private", 9 * MIB))
        self.assertEqual(os.stat(devs["private"]).st_size, 9 * MIB)
        # shrinking is accepted on every host (the admin client is where
        # a user is warned): a running image is cut in place
        write_at(devs["private"], b"head")
        self.run_coro(self.appvm.storage.resize("private", 5 * MIB))
        self.assertEqual(os.stat(devs["private"]).st_size, 5 * MIB)
        self.stop(self.appvm)
        self.settle(self.appvm)
        self.assertEqual(private.size, 5 * MIB)
        # a stopped one keeps its old image as a revision: a revert undoes
        # the shrink
        before = set(private.revisions)
        self.run_coro(self.appvm.storage.resize("private", 4 * MIB))
        self.settle(self.appvm)
        (kept,) = set(private.revisions) - before
        self.assertEqual(os.stat(self.committed(private)).st_size, 4 * MIB)
        self.assertEqual(read_at(self.committed(private), 4), b"head")
        self.run_coro(private.revert(kept))
        self.settle(self.appvm)
        self.assertEqual(private.size, 5 * MIB)
        self.assertEqual(read_at(self.committed(private), 4), b"head")

    def test_050_snapshots_disabled(self):
        if HOST.set_revisions_to_keep:
            self.tpl.storage.set_revisions_to_keep("root", -1)
        else:  # R4.2: qubes.xml or a pool option can hold it
            self.tpl.volumes["root"].revisions_to_keep = -1
        root = self.tpl.volumes["root"]
        self.assertTrue(root.snapshots_disabled)
        self.start(self.tpl)
        self.assertFalse(os.path.exists(self.committed(root)))
        # R4.3's Storage refuses to start from a running source; on R4.2
        # the driver refuses, finding no committed image to start from
        refusal = (
            (qubes.exc.QubesVMError, "is running")
            if HOST.set_revisions_to_keep
            else (HOST.storage_error, "running with snapshots disabled")
        )
        with self.assertRaisesRegex(*refusal):
            self.run_coro(self.appvm.storage.start())
        target = self.app.add_new_vm(
            "TemplateVM", label="black", name="test-template2"
        )
        self.run_coro(target.create_on_disk())
        with self.assertRaises(HOST.storage_error):
            self.import_volume(target, "root", root)
        self.stop(self.tpl)
        self.assertTrue(os.path.exists(self.committed(root)))
        self.assertEqual(root.revisions, {})
        self.start(self.appvm)
        self.stop(self.appvm)
        self.import_volume(target, "root", root)
        self.settle(target)

    def test_060_ephemeral_volatile(self):
        opened = []

        async def fake_cryptsetup(*args):
            if "open" in args:
                opened.append(args[-2])
                self.assertTrue(os.path.exists(args[-2]))

        async def fake_run_program(*_args, **_kwargs):
            return None

        self.pool.ephemeral_volatile = True
        volatile = self.appvm.volumes["volatile"]
        self.assertTrue(volatile.ephemeral)
        with unittest.mock.patch(
            "qubes.utils.cryptsetup", fake_cryptsetup
        ), unittest.mock.patch(
            "qubes.utils.run_program", fake_run_program
        ), unittest.mock.patch(
            "qubes.storage._am_root", False
        ):
            devs = self.start(self.appvm)
            self.assertEqual(opened, [volatile.block_device().path])
            self.assertTrue(devs["volatile"].startswith("/dev/mapper/"))
            self.stop(self.appvm)
        self.assertFalse(os.path.exists(volatile.block_device().path))

    def test_070_xml_round_trip_and_crash_recovery(self):
        devs = self.start(self.tpl)
        write_at(devs["private"], b"before-save")
        self.stop(self.tpl)
        devs = self.start(self.appvm)
        write_at(devs["private"], b"uncommitted")
        # qubesd "dies" here; qubes.xml as last saved
        self.app.save()
        app2 = self.new_app(load=True)
        self.other_apps.append(app2)
        tpl2, appvm2 = (
            app2.domains["test-template"],
            app2.domains["test-vm1"],
        )
        pool2 = app2.pools["rl"]
        self.assertIsInstance(pool2, ReflinkPool)
        for vm, vm2 in ((self.tpl, tpl2), (self.appvm, appvm2)):
            for name in ("root", "private", "volatile"):
                volume, volume2 = vm.volumes[name], vm2.volumes[name]
                self.assertIsInstance(volume2, ReflinkVolume)
                self.assertIs(volume2.pool, pool2)
                self.assertEqual(volume2.config, volume.config)
                self.assertEqual(volume2, volume)  # same pool name + vid
        self.assertIs(appvm2.volumes["root"].source, tpl2.volumes["root"])
        self.assertTrue(appvm2.volumes["private"].is_dirty())
        # qubesd start: stop_storage() for every VM that isn't running
        self.run_coro(app2.stop_storage())
        self.settle(tpl2, appvm2)
        private2 = appvm2.volumes["private"]
        self.assertFalse(private2.is_dirty())
        self.assertEqual(read_at(self.committed(private2), 11), b"uncommitted")
        self.assertEqual(
            read_at(self.committed(tpl2.volumes["private"]), 11),
            b"before-save",
        )
        devs = self.start(appvm2)
        self.assertEqual(read_at(devs["private"], 11), b"uncommitted")
        self.stop(appvm2)
        self.run_coro(self.appvm.storage.stop())  # stale object: harmless
        self.settle(self.appvm)

    def test_080_remove_pool_in_use(self):
        with self.assertRaises(qubes.exc.QubesPoolInUseError):
            self.run_coro(self.app.remove_pool("rl"))


# -- the Admin API handlers --------------------------------------------


class TC_35_MoreVMClasses(VMsCase):
    """StandaloneVM, template clone and removal, backup's export path."""

    def test_000_standalone_vm(self):
        vm = self.app.add_new_vm("StandaloneVM", label="red", name="test-sa")
        self.run_coro(vm.create_on_disk())
        for name in ("root", "private"):
            volume = vm.volumes[name]
            self.assertIsInstance(volume, ReflinkVolume)
            self.assertTrue(volume.save_on_stop)
            self.assertFalse(volume.snap_on_start)
        devs = self.start(vm)
        write_at(devs["root"], b"standalone-root")
        write_at(devs["private"], b"standalone-home")
        self.stop(vm)
        self.assertEqual(
            read_at(self.committed(vm.volumes["root"]), 15), b"standalone-root"
        )
        self.assertEqual(len(vm.volumes["root"].revisions), 1)
        clone = self.app.add_new_vm(
            "StandaloneVM", label="red", name="test-sa-clone"
        )
        self.run_coro(clone.clone_disk_files(vm))
        self.settle(clone)
        for name, data in (
            ("root", b"standalone-root"),
            ("private", b"standalone-home"),
        ):
            self.assertEqual(
                read_at(self.committed(clone.volumes[name]), 15), data
            )
        for each in (vm, clone):
            directory = os.path.join(self.pool.dir_path, "appvms", each.name)
            self.run_coro(each.remove_from_disk())
            self.settle(each)
            self.assertFalse(os.path.exists(directory))

    def test_010_template_clone(self):
        devs = self.start(self.tpl)
        write_at(devs["root"], b"template-v1")
        self.stop(self.tpl)
        tpl2 = self.app.add_new_vm(
            "TemplateVM", label="black", name="test-template-clone"
        )
        self.run_coro(tpl2.clone_disk_files(self.tpl))
        self.settle(tpl2)
        app2 = self.app.add_new_vm(
            "AppVM", label="red", name="test-vm-on-clone", template=tpl2
        )
        self.run_coro(app2.create_on_disk())
        devs = self.start(app2)
        self.assertEqual(read_at(devs["root"], 11), b"template-v1")
        self.stop(app2)
        # the source template is untouched by its clone's life
        self.assertEqual(
            read_at(self.committed(self.tpl.volumes["root"]), 11),
            b"template-v1",
        )
        self.run_coro(app2.remove_from_disk())
        self.run_coro(tpl2.remove_from_disk())
        self.settle(app2, tpl2, self.tpl)
        self.assertFalse(
            os.path.exists(
                os.path.join(self.pool.dir_path, "vm-templates", tpl2.name)
            )
        )

    def test_020_backup_export_path(self):
        # what qubes.backup does per volume: export, read the file,
        # export_end; while the VMs run, the data from before their start
        devs = self.start(self.tpl)
        write_at(devs["private"], b"backed-up")
        self.stop(self.tpl)
        devs = self.start(self.tpl)
        write_at(devs["private"], b"not-yet!!")
        listing = sorted(os.listdir(os.path.dirname(devs["private"])))
        for name in ("root", "private"):
            path = self.run_coro(self.tpl.storage.export(name))
            if name == "private":
                self.assertEqual(read_at(path, 9), b"backed-up")
            self.assertEqual(os.path.getsize(path), self.tpl.volumes[name].size)
            self.run_coro(self.tpl.storage.export_end(name, path))
        self.assertEqual(
            sorted(os.listdir(os.path.dirname(devs["private"]))), listing
        )
        self.stop(self.tpl)
        self.assertEqual(
            read_at(self.committed(self.tpl.volumes["private"]), 9),
            b"not-yet!!",
        )


class TC_40_AdminAPI(VMsCase):
    def call(self, method, dest=b"dom0", arg=b"", payload=b""):
        api = qubes.api.admin.QubesAdminAPI(
            self.app, b"dom0", method, dest, arg
        )
        return self.run_coro(api.execute(untrusted_payload=payload))

    def call_internal(self, method, dest, arg=b"", payload=b""):
        api = qubes.api.internal.QubesInternalAPI(
            self.app, b"dom0", method, dest, arg
        )
        return self.run_coro(api.execute(untrusted_payload=payload))

    def set_revisions_to_keep(self, method, target, dest=b"dom0", arg=None):
        """Set revisions_to_keep=-1 on `target` (a pool or a volume) through
        `method`: R4.3's API takes it; R4.2's refuses any negative number
        and leaves the value as it was."""
        arg = arg or target.name.encode()
        before = target.revisions_to_keep
        if HOST.api_negative_revisions:
            self.call(method, dest, arg, b"-1")
            self.assertEqual(target.revisions_to_keep, -1)
            return
        with self.assertRaises(qubes.api.ProtocolError):
            self.call(method, dest, arg, b"-1")
        self.assertEqual(target.revisions_to_keep, before)

    def test_000_pool_calls(self):
        drivers = self.call(b"admin.pool.ListDrivers")
        self.assertIn(
            "file-reflink dir_path revisions_to_keep setup_check "
            "ephemeral_volatile keep_revision_older_than auto_defrag "
            "defrag_threshold defrag_interval\n",
            drivers,
        )
        dir_path = os.path.join(self.top, "api-pool")
        self.call(
            b"admin.pool.Add",
            arg=b"file-reflink",
            payload=(
                f"name=api-pool\ndir_path={dir_path}\nrevisions_to_keep=3\n"
            ).encode(),
        )
        pool = self.app.pools["api-pool"]
        self.assertIsInstance(pool, ReflinkPool)
        self.assertEqual(pool.revisions_to_keep, 3)
        info = self.call(b"admin.pool.Info", arg=b"api-pool")
        lines = dict(line.split("=", 1) for line in info.splitlines())
        self.assertEqual(lines["driver"], "file-reflink")
        self.assertEqual(lines["dir_path"], dir_path)
        self.assertEqual(lines["revisions_to_keep"], "3")
        self.assertEqual(lines["setup_check"], "True")
        self.assertEqual(lines["ephemeral_volatile"], "False")
        self.assertEqual(lines["keep_revision_older_than"], "0")
        self.assertGreater(int(lines["size"]), 0)
        self.assertIn("usage", lines)
        self.assertEqual(lines["auto_defrag"], "True")
        self.assertEqual(lines["defrag_threshold"], "2048")
        self.assertEqual(lines["defrag_interval"], "86400")
        # a dir_path that did not exist, on btrfs: a subvolume of its own
        self.assertTrue(btrfs.is_subvolume(dir_path))
        usage = self.call(b"admin.pool.UsageDetails", arg=b"api-pool")
        details = dict(line.split("=") for line in usage.splitlines())
        self.assertEqual(
            sorted(details),
            ["data_size", "data_usage", "metadata_size", "metadata_usage"],
        )
        self.assertLess(0, int(details["metadata_usage"]))
        self.assertLess(
            int(details["metadata_usage"]), int(details["metadata_size"])
        )
        self.set_revisions_to_keep(b"admin.pool.Set.revisions_to_keep", pool)
        self.call(
            b"admin.pool.Set.ephemeral_volatile",
            arg=b"api-pool",
            payload=b"True",
        )
        self.assertTrue(pool.ephemeral_volatile)
        self.assertEqual(
            pool.__xml__().get("revisions_to_keep"),
            str(pool.revisions_to_keep),
        )
        self.assertEqual(
            sorted(
                self.call(b"admin.pool.volume.List", arg=b"rl").splitlines()
            ),
            sorted(v.vid for v in self.pool.volumes),
        )
        self.call(b"admin.pool.Remove", arg=b"api-pool")
        self.assertNotIn("api-pool", self.app.pools)
        # R4.3's handler names the missing option; R4.2's passes what it
        # got, and the driver says what to give (never a TypeError)
        with self.assertRaisesRegex(qubes.exc.QubesException, "dir_path"):
            self.call(
                b"admin.pool.Add",
                arg=b"file-reflink",
                payload=b"name=x\nrevisions_to_keep=1\n",
            )
        self.assertNotIn("x", self.app.pools)

    def test_010_volume_info_revisions_revert(self):
        vm = b"test-vm1"
        for content in (b"first", b"second", b"third!"):
            devs = self.start(self.appvm)
            write_at(devs["private"], content)
            self.stop(self.appvm)
        info = self.call(b"admin.vm.volume.Info", vm, b"private")
        lines = dict(line.split("=", 1) for line in info.splitlines())
        private = self.appvm.volumes["private"]
        self.assertEqual(lines["pool"], "rl")
        self.assertEqual(lines["vid"], "appvms/test-vm1/private")
        self.assertEqual(lines["size"], str(private.size))
        self.assertEqual(lines["path"], private.path)
        self.assertEqual(lines["revisions_to_keep"], "2")
        self.assertEqual(lines["ephemeral"], "False")
        self.assertEqual(lines["is_outdated"], "False")
        self.assertEqual(
            self.call(b"admin.vm.volume.Info", vm, b"root").splitlines()[-1],
            "is_outdated=False",
        )
        snapshots = self.call(
            b"admin.vm.volume.ListSnapshots", vm, b"private"
        ).splitlines()
        self.assertEqual(len(snapshots), 2)
        self.assertEqual(snapshots, list(private.revisions))
        # the oldest kept revision holds "first"
        self.call(
            b"admin.vm.volume.Revert", vm, b"private", snapshots[0].encode()
        )
        self.settle(self.appvm)
        self.assertEqual(read_at(self.committed(private), 5), b"first")
        with self.assertRaises(HOST.revision_not_found):
            self.call(b"admin.vm.volume.Revert", vm, b"private", b"nope")

    def test_020_resize_clone_import_set(self):
        vm = b"test-vm1"
        private = self.appvm.volumes["private"]
        new_size = private.size + MIB
        self.call(
            b"admin.vm.volume.Resize",
            vm,
            b"private",
            str(new_size).encode(),
        )
        self.settle(self.appvm)
        self.assertEqual(private.size, new_size)
        # Import (no size) and ImportWithSize through the internal half
        answer = self.call_internal(
            b"internal.vm.volume.ImportBegin", vm, b"private", b""
        )
        size, path = answer.split(" ", 1)
        self.assertEqual(int(size), new_size)
        write_at(path, b"imported-by-api")
        self.call_internal(
            b"internal.vm.volume.ImportEnd", vm, b"private", b"ok"
        )
        self.settle(self.appvm)
        self.assertEqual(
            read_at(self.committed(private), 15), b"imported-by-api"
        )
        answer = self.call_internal(
            b"internal.vm.volume.ImportBegin",
            vm,
            b"private",
            str(2 * MIB).encode(),
        )
        size, path = answer.split(" ", 1)
        with self.assertRaises(qubes.exc.QubesException):
            self.call_internal(
                b"internal.vm.volume.ImportEnd", vm, b"private", b"fail\nx"
            )
        self.assertFalse(os.path.exists(path))
        self.assertEqual(private.size, new_size)
        # Clear
        self.call(b"admin.vm.volume.Clear", vm, b"private")
        self.settle(self.appvm)
        self.assertEqual(read_at(self.committed(private), 8), bytes(8))
        # CloneFrom / CloneTo
        devs = self.start(self.tpl)
        write_at(devs["private"], b"template-home")
        self.stop(self.tpl)
        token = self.call(
            b"admin.vm.volume.CloneFrom", b"test-template", b"private"
        )
        self.call(b"admin.vm.volume.CloneTo", vm, b"private", token.encode())
        self.settle(self.appvm)
        self.assertEqual(read_at(self.committed(private), 13), b"template-home")
        # Set.revisions_to_keep, Set.rw, Set.ephemeral
        self.call(
            b"admin.vm.volume.Set.revisions_to_keep", vm, b"private", b"1"
        )
        self.assertEqual(private.revisions_to_keep, 1)
        self.set_revisions_to_keep(
            b"admin.vm.volume.Set.revisions_to_keep", private, vm, b"private"
        )
        if HOST.api_negative_revisions:
            self.assertTrue(private.snapshots_disabled)
            devs = self.start(self.appvm)
            self.assertFalse(os.path.exists(self.committed(private)))
            self.stop(self.appvm)
            self.assertEqual(private.revisions, {})
        self.call(b"admin.vm.volume.Set.rw", vm, b"root", b"False")
        self.assertFalse(self.appvm.volumes["root"].rw)
        self.call(b"admin.vm.volume.Set.ephemeral", vm, b"volatile", b"True")
        self.assertTrue(self.appvm.volumes["volatile"].ephemeral)
        with self.assertRaises(qubes.exc.QubesValueError):
            self.call(b"admin.vm.volume.Set.ephemeral", vm, b"private", b"True")
        self.assertGreater(self.app.save.call_count, 0)


# -- on a dom0 whose core registers its own file-reflink -----------------

OURS = "qubes_reflink.pool:ReflinkPool"


def dom0_entry_points(renamed):
    """importlib.metadata.entry_points as on a dom0 with the core's own
    file-reflink and ours under `renamed` (what the RPM's
    rename-entry-point.sh makes)."""
    real = importlib.metadata.entry_points

    def entry_points(**params):
        if params.get("group") != qubes.storage.STORAGE_ENTRY_POINT:
            return real(**params)
        group = qubes.storage.STORAGE_ENTRY_POINT
        found = [e for e in real(group=group) if e.value != OURS] + [
            importlib.metadata.EntryPoint(
                name="file-reflink",
                value="qubes.storage.reflink:ReflinkPool",
                group=group,
            ),
            importlib.metadata.EntryPoint(
                name=renamed, value=OURS, group=group
            ),
        ]
        if "name" in params:
            found = [e for e in found if e.name == params["name"]]
        return importlib.metadata.EntryPoints(found)

    return entry_points


class TC_50_Dom0Rename(HostCase):
    def setUp(self):
        reflink_pool_module.driver_name.cache_clear()
        patch = unittest.mock.patch(
            "importlib.metadata.entry_points",
            dom0_entry_points("qubes-reflink"),
        )
        patch.start()
        self.addCleanup(patch.stop)
        self.addCleanup(reflink_pool_module.driver_name.cache_clear)
        super().setUp()

    def test_000_same_name_is_refused(self):
        # the core refuses a name registered twice; its message is lost on
        # Python >= 3.10 (it formats EntryPoint.module_name, which
        # importlib.metadata no longer has): TypeError or AttributeError
        with unittest.mock.patch(
            "importlib.metadata.entry_points",
            dom0_entry_points("file-reflink"),
        ):
            with self.assertRaises((TypeError, AttributeError)):
                qubes.utils.get_entry_point_one(
                    qubes.storage.STORAGE_ENTRY_POINT, "file-reflink"
                )

    def test_010_renamed_driver(self):
        import qubes.storage.reflink as core_reflink

        drivers = qubes.storage.pool_drivers()
        self.assertIn("file-reflink", drivers)
        self.assertIn("qubes-reflink", drivers)
        self.assertIn(
            "setup_check", qubes.storage.driver_parameters("qubes-reflink")
        )
        # the default pool stays the core's own file-reflink
        self.assertIsInstance(
            self.app.pools["varlibqubes"], core_reflink.ReflinkPool
        )
        pool = self.run_coro(
            self.app.add_pool(
                name="rl",
                driver="qubes-reflink",
                dir_path=os.path.join(self.top, "rl"),
            )
        )
        self.assertIsInstance(pool, ReflinkPool)
        self.assertEqual(pool.config["driver"], "qubes-reflink")
        self.assertEqual(pool.__xml__().get("driver"), "qubes-reflink")
        self.app.save()
        app2 = self.new_app(load=True)
        self.other_apps.append(app2)
        self.assertIsInstance(app2.pools["rl"], ReflinkPool)
        self.assertIsInstance(
            app2.pools["varlibqubes"], core_reflink.ReflinkPool
        )


# -- a `file` pool switched to this driver, and back -------------------------


class TC_60_FileDriverSwap(HostCase):
    """The drop-in switch of a `file` pool to this driver, with qubesd
    stopped: by the edit the seed documents, or by `qubes-reflink
    migrate`; and back by `qubes-reflink migrate --revert`."""

    def make_file_pool_vms(self):
        pool = self.run_coro(
            self.app.add_pool(
                name="legacy",
                driver="file",
                dir_path=os.path.join(self.top, "legacy"),
            )
        )
        self.assertEqual(type(pool).__name__, "FilePool")
        self.app.default_pool = pool
        tpl = self.app.add_new_vm("TemplateVM", label="black", name="old-tpl")
        self.run_coro(tpl.create_on_disk())
        self.app.default_template = tpl
        appvm = self.app.add_new_vm(
            "AppVM", label="red", name="old-vm", template=tpl
        )
        self.run_coro(appvm.create_on_disk())
        write_at(vol_file(pool, "vm-templates/old-tpl/root", ".img"), b"tpl")
        write_at(vol_file(pool, "appvms/old-vm/private", ".img"), b"home")
        cow = vol_file(pool, "appvms/old-vm/private", "-cow.img")
        write_new(cow, b"file-driver-cow")
        self.app.save()
        return cow

    def load(self):
        app = self.new_app(load=True)
        self.other_apps.append(app)
        return app

    def run_vms(self, app):
        """Start and stop the VMs of the switched pool; check their data."""
        pool = app.pools["legacy"]
        self.assertIsInstance(pool, ReflinkPool)
        tpl, appvm = app.domains["old-tpl"], app.domains["old-vm"]
        for vm in (tpl, appvm):
            self.run_coro(vm.storage.verify())
            self.run_coro(vm.storage.start())
        devs = {dev.name: dev.path for dev in appvm.storage.block_devices()}
        self.assertEqual(read_at(devs["private"], 4), b"home")
        self.assertEqual(read_at(devs["root"], 3), b"tpl")
        write_at(devs["private"], b"HOME")
        for vm in (appvm, tpl):
            self.run_coro(vm.storage.stop())
            self.settle(vm)
        self.run_coro(pool.wait_background())
        private = appvm.volumes["private"]
        self.assertEqual(
            read_at(vol_file(pool, private.vid, ".img"), 4), b"HOME"
        )

    def test_000_seed_edit(self):
        cow = self.make_file_pool_vms()
        with open(self.xml_path, encoding="utf-8") as xml:
            text = xml.read()
        with open(self.xml_path, "w", encoding="utf-8") as xml:
            xml.write(text.replace(' driver="file"', ' driver="file-reflink"'))
        self.run_vms(self.load())
        # the file driver's own files are never touched
        self.assertEqual(read_at(cow, 15), b"file-driver-cow")

    def test_010_migrate_tool_and_back(self):
        self.make_file_pool_vms()
        tool = ["migrate", "--qubes-xml", self.xml_path, "--pool", "legacy"]
        self.assertEqual(cli.main([*tool, "--apply"]), cli.EXIT_OK)
        self.run_vms(self.load())
        self.assertEqual(cli.main([*tool, "--revert", "--apply"]), cli.EXIT_OK)
        back = self.load()
        self.assertEqual(type(back.pools["legacy"]).__name__, "FilePool")
        appvm = back.domains["old-vm"]
        self.run_coro(qubes.utils.coro_maybe(appvm.storage.verify()))
        # what `file` reads is the data committed under this driver
        self.assertEqual(read_at(appvm.volumes["private"].path, 4), b"HOME")


# -- revisions users can trust ---------------------------------------------

DAY = 86400


class TC_70_Revisions(HostCase):
    """Pins, the restore point and a revert of a running qube, through the
    host's own VMs, Admin API and qubes.xml, on btrfs, XFS and ext4."""

    def call(self, method, dest=b"dom0", arg=b"", payload=b"", app=None):
        api = qubes.api.admin.QubesAdminAPI(
            app or self.app, b"dom0", method, dest, arg
        )
        return self.run_coro(api.execute(untrusted_payload=payload))

    def world(self, fstype):
        """A pool on `fstype` added through the Admin API (rtk 1, restore
        point a day), with a template and an AppVM in it."""
        name = f"rev-{fstype}"
        top = tempfile.mkdtemp(prefix="rev-", dir=MNT[fstype])
        self.addCleanup(shutil.rmtree, top, ignore_errors=True)
        payload = (
            f"name={name}\ndir_path={top}/pool\nrevisions_to_keep=1\n"
            f"setup_check=no\nkeep_revision_older_than={DAY}\n"
        )
        self.call(
            b"admin.pool.Add", arg=b"file-reflink", payload=payload.encode()
        )
        info = self.call(b"admin.pool.Info", arg=name.encode())
        self.assertIn(f"keep_revision_older_than={DAY}", info.splitlines())
        self.app.default_pool = self.app.pools[name]
        tpl = self.app.add_new_vm(
            "TemplateVM", label="black", name=f"t-{fstype}"
        )
        self.run_coro(tpl.create_on_disk())
        vm = self.app.add_new_vm(
            "AppVM", label="red", name=f"a-{fstype}", template=tpl
        )
        self.run_coro(vm.create_on_disk())
        return vm

    def run_vm(self, vm, content):
        self.run_coro(vm.storage.verify())
        self.run_coro(vm.storage.start())
        devs = {dev.name: dev.path for dev in vm.storage.block_devices()}
        write_at(devs["private"], content)
        self.run_coro(vm.storage.stop())
        self.settle(vm)

    def restarted(self, vm):
        """qubesd saved and started again: the VM as the new app has it,
        after the recovery stop of its volumes."""
        self.app.save()
        app = self.new_app(load=True)
        self.other_apps.append(app)
        again = app.domains[vm.name]
        self.run_coro(again.storage.stop())
        self.settle(again)
        return app, again

    def snapshots(self, vm, app=None):
        listed = self.call(
            b"admin.vm.volume.ListSnapshots",
            vm.name.encode(),
            b"private",
            app=app,
        )
        return listed.splitlines()

    def revision_data(self, volume, revision, length):
        directory = os.path.dirname(vol_file(volume.pool, volume.vid, ".img"))
        prefix = f"private.img.{revision}@"
        (name,) = [n for n in os.listdir(directory) if n.startswith(prefix)]
        return read_at(os.path.join(directory, name), length)

    def test_000_pin_outlives_restarts_and_reverts(self):
        for fstype in ("btrfs", "xfs", "ext4"):
            with self.subTest(fstype=fstype):
                vm = self.world(fstype)
                self.run_vm(vm, b"keep me")
                self.run_vm(vm, b"next one")
                (pinned,) = self.snapshots(vm)
                private = vm.volumes["private"]
                self.assertEqual(
                    cli.main(
                        ["pin", private.pool.dir_path, private.vid, pinned]
                    ),
                    0,
                )
                for number in range(5):
                    self.run_vm(vm, b"restart%d" % number)
                app, again = self.restarted(vm)
                self.assertIn(pinned, self.snapshots(again, app))
                self.call(
                    b"admin.vm.volume.Revert",
                    again.name.encode(),
                    b"private",
                    pinned.encode(),
                    app=app,
                )
                committed = vol_file(private.pool, private.vid, ".img")
                self.assertEqual(read_at(committed, 7), b"keep me")
                self.assertIn(pinned, self.snapshots(again, app))

    def test_010_restore_point_outlives_quick_restarts(self):
        for fstype in ("btrfs", "xfs", "ext4"):
            with self.subTest(fstype=fstype):
                vm = self.world(fstype)
                self.run_vm(vm, b"yesterday")
                private = vm.volumes["private"]
                committed = vol_file(private.pool, private.vid, ".img")
                then = time.time() - 2 * DAY
                os.utime(committed, (then, then))
                for number in range(5):
                    self.run_vm(vm, b"quick%d" % number)
                app, again = self.restarted(vm)
                kept = self.snapshots(again, app)
                self.assertEqual(len(kept), 2)  # the count, and one more
                self.assertEqual(
                    self.revision_data(again.volumes["private"], kept[0], 9),
                    b"yesterday",
                )

    def test_020_revert_of_a_running_qube_applies_at_shutdown(self):
        for fstype in ("btrfs", "xfs", "ext4"):
            with self.subTest(fstype=fstype):
                vm = self.world(fstype)
                self.run_vm(vm, b"good data")
                self.run_vm(vm, b"broken!!!")
                (good,) = self.snapshots(vm)
                self.run_coro(vm.storage.verify())
                self.run_coro(vm.storage.start())
                devs = {d.name: d.path for d in vm.storage.block_devices()}
                write_at(devs["private"], b"this run!")
                self.call(
                    b"admin.vm.volume.Revert",
                    vm.name.encode(),
                    b"private",
                    good.encode(),
                )
                private = vm.volumes["private"]
                committed = vol_file(private.pool, private.vid, ".img")
                self.assertEqual(read_at(committed, 9), b"broken!!!")
                # qubesd restarts before the qube stops: the request holds
                app, again = self.restarted(vm)
                self.assertEqual(read_at(committed, 9), b"good data")
                newest = self.snapshots(again, app)[-1]
                self.assertEqual(
                    self.revision_data(again.volumes["private"], newest, 9),
                    b"this run!",
                )


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"] + sys.argv[1:], exit=True)
