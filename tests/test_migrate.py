"""qubes-reflink migrate: qubes.xml edited byte-exactly, and its refusals.

The pools of the qubes.xml written here live on real loop-mounted btrfs,
XFS and ext4, holding the files the ``file`` driver leaves.
"""

import json
import os
import shutil
import subprocess

import pytest

from qubes_reflink import cli, layout, migrate
from qubes_reflink.pool import driver_name

QUBES_XML = """\
<?xml version='1.0' encoding='UTF-8'?>
<qubes>
  <properties>
    <property name="default_pool">varlibqubes</property>
    <property name="clockvm">sys-net</property>
  </properties>
  <labels>
    <label id="label-1" color="0xcc0000">red</label>
    <label id="label-8" color="0x000000">black</label>
  </labels>
  <pools>
    <pool dir_path="{btrfs}" driver="file" name="varlibqubes" \
revisions_to_keep="1"/>
    <pool dir_path="/var/lib/qubes/vm-kernels" driver="linux-kernel" \
name="linux-kernel"/>
    <pool name="lvm" driver="lvm_thin" thin_pool="vm-pool" \
volume_group="qubes_dom0" revisions_to_keep="2"/>
    <!-- a pool on XFS: <pool driver="file"/> in a comment stays -->
    <pool name='data' note="driver=&quot;file&quot; &gt; x"   driver = 'file'
          dir_path="{xfs}"/>
    <pool dir_path="{ext4}" driver="file" name="slow"/>
  </pools>
  <domains>
    <domain id="domain-1" class="TemplateVM">
      <properties>
        <property name="name">fedora</property>
        <property name="label">black</property>
      </properties>
      <volume-config>
        <volume name="root" pool="varlibqubes" vid="vm-templates/fedora/root" \
revisions_to_keep="1" rw="True" save_on_stop="True" size="21474836480"/>
      </volume-config>
      <devices class="block">
        <device backend-domain="dom0" id="loop0" driver="file"/>
      </devices>
    </domain>
    <domain id="domain-2" class="AppVM">
      <properties>
        <property name="name">work</property>
        <property name="template">fedora</property>
      </properties>
    </domain>
  </domains>
</qubes>
"""

#: What the file driver leaves in a pool directory while no VM runs, and
#: its copy-on-write files.
FILE_POOL = (
    "vm-templates/fedora/root.img",
    "vm-templates/fedora/root-cow.img",
    "vm-templates/fedora/root-cow.img.old",
    "appvms/work/private.img",
    "appvms/work/private-cow.img",
    "appvms/work/volatile.img",
    "appvms/work/root-cow.img",
)
COW = [name for name in FILE_POOL if "-cow.img" in name]


def make_file_pool(directory):
    """The files of a `file` pool, each with its own content."""
    for rel in FILE_POOL:
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as image:
            image.write(rel.encode() * 100)
    return directory


@pytest.fixture
def setup(mounts, tmp_path):
    """(qubes.xml path, its bytes, {fstype: pool dir}, run dir)."""
    dirs = {}
    for fstype in ("btrfs", "xfs", "ext4"):
        dirs[fstype] = make_file_pool(
            os.path.join(mounts(fstype), f"pool-{tmp_path.name}")
        )
    xml_dir = tmp_path / "qubes"
    xml_dir.mkdir()
    xml = xml_dir / "qubes.xml"
    data = QUBES_XML.format(**dirs).encode()
    xml.write_bytes(data)
    os.chmod(xml, 0o660)
    os.chown(xml, 0, 1000)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    yield str(xml), data, dirs, str(run_dir)
    for directory in dirs.values():
        shutil.rmtree(directory, ignore_errors=True)


def migrate_cmd(capsys, setup, *argv):
    """(exit code, stdout) of `qubes-reflink migrate` on the fixture."""
    xml, _data, _dirs, run_dir = setup
    code = cli.main(
        ["migrate", "--qubes-xml", xml, "--run-dir", run_dir]
        + [str(arg) for arg in argv]
    )
    return code, capsys.readouterr().out


def expected_after(data, dirs, pools=("varlibqubes", "data")):
    """qubes.xml as it must be after migrating `pools`: the driver value
    replaced at exactly those places."""
    new = driver_name().encode()
    edits = {
        "varlibqubes": (b'driver="file" name="varlibqubes"', b'driver="'),
        "data": (b"driver = 'file'", b"driver = '"),
        "slow": (b'driver="file" name="slow"', b'driver="'),
    }
    for pool in pools:
        old, head = edits[pool]
        assert data.count(old) == 1
        data = data.replace(old, head + new + old[len(head) + 4 :])
    return data


def cow_left(dirs):
    """The cow files still on disk, per filesystem."""
    return {
        fstype: [r for r in COW if os.path.exists(os.path.join(d, r))]
        for fstype, d in dirs.items()
    }


def read(path):
    with open(path, "rb") as xml_file:
        return xml_file.read()


def test_read_pools_finds_driver_values():
    data = QUBES_XML.format(btrfs="/a", xfs="/b", ext4="/c").encode()
    pools = migrate.read_pools(data)
    assert [(p.name, p.driver, p.dir_path) for p in pools] == [
        ("varlibqubes", "file", "/a"),
        ("linux-kernel", "linux-kernel", "/var/lib/qubes/vm-kernels"),
        ("lvm", "lvm_thin", ""),
        ("data", "file", "/b"),
        ("slow", "file", "/c"),
    ]
    for pool in pools:
        start, end = pool.value_span
        assert data[start:end] == pool.driver.encode()
    assert [p.name for p in migrate.file_pools(data)] == [
        "varlibqubes",
        "data",
        "slow",
    ]


def test_dry_run_changes_nothing(setup, capsys):
    xml, data, dirs, _run = setup
    code, out = migrate_cmd(capsys, setup, "--pool", "varlibqubes")
    assert code == 0
    assert "pool varlibqubes" in out and "reflinks: yes" in out
    line = data[: data.index(b'driver="file" name="varlibqubes"')].count(b"\n")
    assert f'driver "file" -> "{driver_name()}" (line {line + 1})' in out
    for rel in COW[:2]:
        assert os.path.join(dirs["btrfs"], rel) in out
    assert "would write backup" in out and "--apply" in out
    assert read(xml) == data
    assert layout.xml_backups(xml) == []
    assert cow_left(dirs)["btrfs"] == COW


def test_apply_edits_only_driver_attributes(setup, capsys):
    xml, data, dirs, _run = setup
    before = os.stat(xml)
    code, out = migrate_cmd(
        capsys, setup, "--pool", "varlibqubes", "--pool", "data", "--apply"
    )
    assert code == 0, out
    assert read(xml) == expected_after(data, dirs)  # byte for byte
    after = os.stat(xml)
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert after.st_ino != before.st_ino  # replaced atomically, by rename
    (backup,) = layout.xml_backups(xml)
    assert read(backup) == data
    assert backup.endswith(".qubes-reflink-backup")
    assert cow_left(dirs) == {"btrfs": [], "xfs": [], "ext4": COW}
    for fstype in ("btrfs", "xfs"):
        for rel in FILE_POOL:
            if rel not in COW:  # images untouched
                with open(os.path.join(dirs[fstype], rel), "rb") as image:
                    assert image.read() == rel.encode() * 100
    # nothing left to do for those pools now
    code, out = migrate_cmd(capsys, setup, "--pool", "data")
    assert code == 2


def test_revert_restores_the_backup(setup, capsys):
    xml, data, _dirs, _run = setup
    assert migrate_cmd(capsys, setup, "--revert")[0] == 2  # no backup yet
    migrate_cmd(capsys, setup, "--pool", "varlibqubes", "--apply")
    migrated = read(xml)
    code, out = migrate_cmd(capsys, setup, "--revert")
    assert code == 0 and "would restore" in out
    assert read(xml) == migrated
    code, out = migrate_cmd(capsys, setup, "--revert", "--apply")
    assert code == 0 and read(xml) == data
    assert os.stat(xml).st_mode & 0o777 == 0o660


def test_refuses_pool_that_cannot_reflink(setup, capsys):
    xml, data, dirs, _run = setup
    code, out = migrate_cmd(capsys, setup, "--apply")
    assert code == 1 and "reflinks: NO" in out and "refusing" in out
    assert read(xml) == data and layout.xml_backups(xml) == []
    assert cow_left(dirs)["btrfs"] == COW
    code, out = migrate_cmd(capsys, setup, "--apply", "--no-setup-check")
    assert code == 0, out
    pools = ("varlibqubes", "data", "slow")
    assert read(xml) == expected_after(data, dirs, pools)


def test_refuses_while_a_volume_state_file_exists(setup, capsys):
    xml, data, _dirs, run_dir = setup
    state = os.path.join(
        run_dir, "qubes-volume-state-varlibqubes:appvms-work-private"
    )
    with open(state, "w", encoding="ascii"):
        pass
    code, out = migrate_cmd(capsys, setup, "--pool", "varlibqubes", "--apply")
    assert code == 3 and "volume appvms/work/private is in use" in out
    assert read(xml) == data
    # another pool's state files do not matter
    code, out = migrate_cmd(capsys, setup, "--pool", "data", "--apply")
    assert code == 0
    code, out = migrate_cmd(
        capsys, setup, "--pool", "varlibqubes", "--apply", "--force"
    )
    assert code == 0


def test_refuses_while_an_image_is_attached(setup, capsys):
    xml, data, dirs, _run = setup
    cow = os.path.join(dirs["btrfs"], "appvms/work/private-cow.img")
    with open(cow, "r+b") as image:
        image.truncate(1024**2)
    loop = subprocess.run(
        ["losetup", "-f", "--show", cow],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        code, out = migrate_cmd(
            capsys, setup, "--pool", "varlibqubes", "--apply"
        )
        assert code == 3 and f"{cow} is attached to a loop device" in out
        assert read(xml) == data
        code, out = migrate_cmd(
            capsys, setup, "--pool", "varlibqubes", "--apply", "--force"
        )
        assert code == 0
        assert cow_left(dirs)["btrfs"] == ["appvms/work/private-cow.img"]
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_refuses_apply_while_qubesd_runs(setup, capsys, tmp_path):
    xml, data, _dirs, _run = setup
    program = tmp_path / "qubesd"
    shutil.copy("/bin/sleep", program)
    qubesd = subprocess.Popen([str(program), "300"])
    try:
        assert migrate_cmd(capsys, setup, "--pool", "data")[0] == 0
        code, out = migrate_cmd(capsys, setup, "--pool", "data", "--apply")
        assert code == 3 and "qubesd" in out
        assert read(xml) == data
    finally:
        qubesd.kill()
        qubesd.wait()


def test_errors(setup, capsys):
    xml, data, _dirs, _run = setup
    assert migrate_cmd(capsys, setup, "--pool", "nosuch")[0] == 2
    assert migrate_cmd(capsys, setup, "--pool", "lvm")[0] == 2
    with open(xml, "wb") as broken:
        broken.write(data[:-20])
    assert cli.main(["migrate", "--qubes-xml", xml, "--apply"]) == 2
    assert "not well-formed" in capsys.readouterr().err
    assert read(xml) == data[:-20]


def test_nothing_to_do_and_json(setup, capsys):
    xml, data, dirs, _run = setup
    code, out = migrate_cmd(capsys, setup, "--json", "--pool", "data")
    report = json.loads(out)
    assert code == 0 and report["applied"] is False
    (pool,) = report["pools"]
    assert (pool["name"], pool["fstype"], pool["reflink"]) == (
        "data",
        "xfs",
        True,
    )
    assert sorted(pool["cow"]) == sorted(
        os.path.join(dirs["xfs"], rel) for rel in COW
    )
    with open(xml, "wb") as other:
        other.write(
            data.replace(b'"file"', b'"lvm_thin"').replace(
                b"'file'", b"'lvm_thin'"
            )
        )
    code, out = migrate_cmd(capsys, setup)
    assert code == 0 and "nothing to do" in out


def test_backups_newest_last(tmp_path):
    xml = str(tmp_path / "qubes.xml")
    names = [
        layout.xml_backup(xml, "20250101T000000", 1),
        layout.xml_backup(xml, "20240101T000000"),
        layout.xml_backup(xml, "20250101T000000"),
        xml + ".bak",
    ]
    for name in names:
        open(name, "wb").close()
    assert layout.xml_backups(xml) == [names[1], names[2], names[0]]
