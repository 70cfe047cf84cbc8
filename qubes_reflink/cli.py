"""qubes-reflink: look inside a file-reflink pool, repair it, migrate to it.

The operator's tool, used while qubesd is stopped (or to look while it
runs).  It parses, calls and prints: its findings come from `inspect`,
its repairs from `repair`, the switch of drivers from `migrate`; it
changes no file itself.
"""

import argparse
import errno
import logging
import os
import sys
import threading
import time

from . import btrfs, defrag, fileops, health, inspect, layout, migrate
from . import qubesxml, repair, revisions, settings
from .output import Output
from .pool import DEFAULT_DEFRAG_THRESHOLD, driver_name

EXIT_OK = 0
# check: no reflinks; fsck: problems; migrate: can't reflink; defrag: not
# enough free space
EXIT_NO = 1
EXIT_ERROR = 2
EXIT_REFUSED = 3  # qubesd or a VM is running (override with --force)

EXIT_CODES = """\
exit codes:
  0  success: reflinks work (check, which may still warn), nothing wrong
     (fsck), done or would be done (migrate, defrag)
  1  no: no reflinks (check), problems found or remaining (fsck), a pool's
     filesystem can't reflink (migrate), not enough free space (defrag)
  2  error: bad arguments, missing or unreadable files, I/O errors
  3  refused because qubesd or a VM of the pool is running (see --force)
"""

EXAMPLES = {
    "check": """\
examples:
  qubes-reflink check /var/lib/qubes
  qubes-reflink check /mnt/new-pool --from /var/lib/qubes
""",
    "defrag": """\
examples:
  qubes-reflink defrag --dry-run /var/lib/qubes
  qubes-reflink defrag /var/lib/qubes vm-templates/fedora-42/root
""",
    "status": """\
examples:
  qubes-reflink status /var/lib/qubes
  qubes-reflink --json status /var/lib/qubes | jq '.volumes[].vid'
""",
    "du": """\
examples:
  qubes-reflink du /var/lib/qubes
  qubes-reflink du --raw /var/lib/qubes appvms/work/private
""",
    "fsck": """\
examples:
  qubes-reflink fsck /var/lib/qubes
  systemctl stop qubesd; qubes-reflink fsck --repair /var/lib/qubes
""",
    "pin": """\
examples:
  qubes-reflink status /var/lib/qubes          # revision ids per volume
  qubes-reflink pin /var/lib/qubes appvms/work/private 3
""",
    "unpin": """\
examples:
  qubes-reflink unpin /var/lib/qubes appvms/work/private 3
""",
    "cancel-revert": """\
examples:
  qubes-reflink cancel-revert /var/lib/qubes appvms/work/private
""",
    "set": """\
examples:
  qubes-reflink set /var/lib/qubes keep_revision_older_than=86400
  qubes-reflink set /var/lib/qubes keep_revision_older_than=0   # off
  qubes-reflink set /var/lib/qubes auto_defrag=False
""",
    "migrate": """\
examples:
  qubes-reflink migrate                 # show what would be done
  systemctl stop qubesd
  qubes-reflink migrate --apply         # switch every 'file' pool
  qubes-reflink migrate --revert --apply
""",
}


def iso(seconds):
    """UTC timestamp in the form revisions are named with."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# -- check ----------------------------------------------------------------


def cmd_check(args, out):
    """Can DIR reflink (and can files be reflinked from --from into it)?"""
    target = _existing_dir(args.dir)
    source = _existing_dir(args.from_dir) if args.from_dir else target
    places = {"dir": _mount_facts(target)}
    if source != target:
        places["from"] = _mount_facts(source)
    ok = _probe(source, target)
    for facts in places.values():
        out.line(
            f"{facts['path']}: {facts['fstype']} "
            f"(mounted at {facts['mountpoint']} from {facts['source']})"
        )
    what = (
        f"from {source} into {target}" if source != target else "in " + target
    )
    answer = {True: "yes", False: "no", None: "can't tell: no space left"}
    out.line(f"reflinks {what}: {answer[ok]}")
    found = health.check(target, _threshold(target, args))
    _print_health(out, target, found)
    out.data(
        {
            **places,
            "reflink": ok,
            "subvolume": found.subvolume,
            "metadata": found.space._asdict() if found.space else None,
            "warnings": [finding._asdict() for finding in found.findings],
        }
    )
    return {True: EXIT_OK, False: EXIT_NO, None: EXIT_ERROR}[ok]


def _probe(source, target):
    """Whether files reflink from `source` into `target`; None when a
    full filesystem leaves no room for the probe files (the health
    findings then say why)."""
    try:
        return fileops.can_reflink(
            layout.probe_path(source), layout.probe_path(target)
        )
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return None
        raise


def _threshold(pool_dir, args):
    """What counts as fragmented: --defrag-threshold, else the pool's
    setting (`qubes-reflink set`), else the default."""
    if args.defrag_threshold is not None:
        return args.defrag_threshold
    return settings.load(pool_dir).get(
        settings.DEFRAG_THRESHOLD, DEFAULT_DEFRAG_THRESHOLD
    )


def _print_health(out, target, found):
    if found.subvolume is not None:
        out.line(
            f"{target} is {'' if found.subvolume else 'not '}a btrfs "
            "subvolume of its own"
        )
    if found.space is not None:
        out.line(
            f"btrfs metadata: {out.size(found.space.metadata_usage)} used of "
            f"{out.size(found.space.metadata_size)}; unallocated: "
            f"{out.size(found.space.unallocated)}"
        )
    for finding in found.findings:
        out.line(f"warning: {finding.message}")


def _existing_dir(path):
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise NotADirectoryError(f"{path} is not a directory")
    return real


def _mount_facts(path):
    point, fstype, source = inspect.mount_of(path)
    return {
        "path": path,
        "fstype": fstype,
        "mountpoint": point,
        "source": source,
    }


# -- defrag ---------------------------------------------------------------


def cmd_defrag(args, out):
    """Rewrite fragmented committed images, keeping what they share."""
    pool_dir = _existing_dir(args.pool_dir)
    plans, skipped = defrag.plan_pool(pool_dir, args.vids)
    need = defrag.space_needed(plans, btrfs.space(pool_dir) is not None)
    free = fileops.free_space(pool_dir)
    report = {
        "pool_dir": pool_dir,
        "space_needed": need,
        "space_free": free,
        "skipped": skipped,
        "volumes": [_plan_facts(p) for p in plans],
    }
    for vid, why in skipped.items():
        out.line(f"{vid}: left alone: {why}")
    for facts in report["volumes"]:
        out.line(
            f"{facts['vid']}: {facts['extents']} extents, about "
            f"{facts['extents_after']} after rewriting "
            f"{out.size(facts['rewrite'])}"
        )
    out.line(
        f"free space needed: {out.size(need)}; free: {out.size(free)}; "
        "space used afterwards: about the same (what is shared stays shared)"
    )
    if need > free:
        out.line("refusing: not enough free space; free some space first")
        out.data({**report, "refused": True, "results": []})
        return EXIT_NO
    if args.dry_run:
        out.line("nothing changed (dry run)")
        out.data({**report, "refused": False, "results": []})
        return EXIT_OK
    results = _run_defrag(pool_dir, plans, out)
    out.data(
        {**report, "refused": False, "results": [r._asdict() for r in results]}
    )
    return EXIT_OK


def _plan_facts(the_plan):
    return {
        "vid": the_plan.vid,
        "extents": the_plan.extents,
        "extents_after": the_plan.extents_after,
        "rewrite": the_plan.rewrite,
        "data": the_plan.data,
    }


def _run_defrag(pool_dir, plans, out):
    """Defragment `plans` in a thread of idle I/O priority (the priority
    is the thread's, not the caller's); print what each gave."""
    total = sum(p.rewrite for p in plans)
    progress = out.progress(max(total // defrag.MIB, 1), "MiB rewritten")
    finished = 0
    results = []

    def shown(done, _total):
        progress.update((finished + done) // defrag.MIB)

    def work():
        nonlocal finished
        defrag.idle_priority()
        runner = defrag.Defragmenter(pool_dir, defrag_stop(pool_dir), shown)
        for the_plan in plans:
            results.append(runner.run(the_plan))
            finished += the_plan.rewrite

    _in_thread(work)
    progress.close()
    for result in results:
        out.line(
            f"{result.vid}: {result.extents_before} -> "
            f"{result.extents_after} extents; {result.sharers} other files "
            "share the new extents"
            + (f"; stopped: {result.abandoned}" if result.abandoned else "")
        )
    return results


def defrag_stop(pool_dir):
    """What stops the tool's work on a volume: the volume's start."""
    return lambda vid: defrag.volume_running(pool_dir, vid)


def _in_thread(work):
    """Run `work` in a thread of its own; re-raise what it raised."""
    failure = []

    def run():
        try:
            work()
        except BaseException as err:  # pylint: disable=broad-exception-caught
            failure.append(err)

    thread = threading.Thread(target=run, name="qubes-reflink-defrag")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


# -- status ---------------------------------------------------------------


def cmd_status(args, out):
    """Every volume on disk and every other file, with its state."""
    pool_dir = _existing_dir(args.pool_dir)
    scan = inspect.scan_pool(pool_dir)
    volumes = [inspect.volume_status(files) for files in scan.volumes.values()]
    unknown = [info.path for info in scan.unknown]
    fstype = inspect.mount_of(pool_dir)[1]
    out.line(f"pool {pool_dir} ({fstype}): {len(volumes)} volumes")
    for volume in volumes:
        _print_volume(out, volume)
    if unknown:
        out.line()
        out.line(f"{len(unknown)} other files (not of the pool layout):")
        if not args.verbose:
            out.line("  (list them with -v)")
        for path in unknown if args.verbose else ():
            out.line(f"  {path}")
    if scan.trash:
        out.line()
        out.line(
            f"{len(scan.trash)} discarded images in the trash, deleted in "
            "the background by qubesd (or by 'fsck --repair')"
        )
    out.data(
        {
            "pool_dir": pool_dir,
            "fstype": fstype,
            "volumes": volumes,
            "unknown": unknown,
            "trash": scan.trash,
        }
    )
    return EXIT_OK


def _running_state(volume):
    if not volume["running"]:
        return "stopped"
    if volume["attached"]:
        return "running"
    return "running image present, not attached to a loop device"


def _print_volume(out, volume):
    out.line()
    out.line(f"{volume['vid']}: {_running_state(volume)}")
    for label in ("committed", "dirty"):
        image = volume[label]
        if image is not None:
            out.line(
                f"  {label:<13}{out.size(image['size'])}, "
                f"{out.size(image['allocated'])} allocated, "
                f"modified {iso(image['mtime'])}"
            )
    if volume["committed"] is None and volume["dirty"] is None:
        out.line("  no image of its own (snapshot or volatile volume)")
    for rev in volume["revisions"]:
        out.line(
            f"  revision {rev['id']:<4}{rev['timestamp']}Z, "
            f"{out.size(rev['allocated'])} allocated"
            + (", pinned" if rev["pinned"] else "")
        )
    if volume["pending_revert"] is not None:
        out.line(
            f"  revert to revision {volume['pending_revert']} at the VM's "
            "stop (cancel with 'qubes-reflink cancel-revert')"
        )
    for other in volume["other"]:
        name = os.path.basename(other["path"])
        out.line(f"  {other['kind']:<13}{name}: {other['state']}")


# -- du -------------------------------------------------------------------

_DU_FIELDS = ("apparent", "allocated", "shared", "exclusive")


def cmd_du(args, out):
    """Apparent, allocated, shared and exclusive bytes per file and volume."""
    pool_dir = _existing_dir(args.pool_dir)
    scan = inspect.scan_pool(pool_dir)
    unknown = [vid for vid in args.vids if vid not in scan.volumes]
    if unknown:
        raise LookupError(f"no volume {', '.join(unknown)} in {pool_dir}")
    meter = out.progress(len(args.vids or scan.volumes), "volumes measured")
    try:
        report = inspect.disk_usage(scan, args.vids, meter.update)
    finally:
        meter.close()
    _print_du(out, report)
    out.data({"pool_dir": pool_dir, **report})
    return EXIT_OK


def _du_line(out, label, usage, indent=""):
    sizes = "".join(f"{out.size(usage[f]):>12}" for f in _DU_FIELDS)
    out.line(f"{indent}{label:<{44 - len(indent)}}{sizes}")


def _du_label(row):
    if row["kind"] == layout.REVISION:
        pinned = ", pinned" if row["pinned"] else ""
        return f"revision {row['detail']} ({row['timestamp']}Z{pinned})"
    if row["kind"] == layout.SPARE:
        return f"spare ({row['state']})"
    return row["kind"]


def _print_du(out, report):
    header = "".join(f"{f.upper():>12}" for f in _DU_FIELDS)
    out.line(f"{'':<44}{header}")
    for volume in report["volumes"]:
        _du_line(out, volume["vid"], volume["total"])
        for row in volume["files"]:
            _du_line(out, _du_label(row), row, indent="  ")
    _du_line(out, f"total ({len(report['volumes'])} volumes)", report["total"])


# -- revisions -------------------------------------------------------------


def cmd_pin(args, out):
    """Keep a revision whatever the count: pruning never takes it."""
    files = _volume_files(args)
    layout.check_revision_id(args.revision)
    keep = qubesxml.revisions_to_keep(args.qubes_xml, files.pool_dir, args.vid)
    if keep == -1:
        raise ValueError(
            f"volume {args.vid} keeps no revisions (revisions_to_keep -1: "
            "snapshots disabled): give it revisions first, e.g. "
            f"'qvm-volume config VM:VOLUME revisions_to_keep 1'"
        )
    made = revisions.pin(files, args.revision)
    state = "pinned" if made else "was pinned already"
    out.line(f"{args.vid}: revision {args.revision} {state}")
    out.data({"vid": args.vid, "revision": args.revision, "pinned": True})
    return EXIT_OK


def cmd_unpin(args, out):
    """Make a pinned revision ordinary again."""
    files = _volume_files(args)
    layout.check_revision_id(args.revision)
    revisions.unpin(files, args.revision)
    out.line(
        f"{args.vid}: revision {args.revision} unpinned (pruned at the next "
        "commit if it is beyond revisions_to_keep)"
    )
    out.data({"vid": args.vid, "revision": args.revision, "pinned": False})
    return EXIT_OK


def cmd_cancel_revert(args, out):
    """Drop the revert a running volume would carry out at its stop."""
    files = _volume_files(args)
    cancelled = revisions.cancel_revert(files)
    if cancelled is None:
        out.line(f"{args.vid}: no revert is pending")
    else:
        out.line(f"{args.vid}: the revert to revision {cancelled} is cancelled")
    out.data({"vid": args.vid, "cancelled": cancelled})
    return EXIT_OK


def cmd_set(args, out):
    """Change a pool setting while qubesd runs (see `settings`)."""
    pool_dir = _existing_dir(args.pool_dir)
    key, sep, value = args.setting.partition("=")
    if not sep:
        raise ValueError(
            f"give the setting as KEY=VALUE, e.g. "
            f"{settings.KEEP_REVISION_OLDER_THAN}=86400"
        )
    parsed = settings.store(pool_dir, key, value)
    out.line(f"{pool_dir}: {key}={parsed} (in effect at the next prune)")
    out.data({"pool_dir": pool_dir, key: parsed})
    return EXIT_OK


def _volume_files(args):
    """The files of the volume VID of the pool DIR_PATH, which must exist."""
    pool_dir = _existing_dir(args.pool_dir)
    files = layout.VolumeFiles(pool_dir, args.vid)
    listing = files.scan()
    if not (listing.committed or listing.revisions or listing.dirty):
        raise LookupError(
            f"no volume {args.vid} in {pool_dir} (list them with "
            f"'qubes-reflink status {pool_dir}')"
        )
    return files


# -- fsck -----------------------------------------------------------------

_WOULD = {
    inspect.REMOVE: "--repair removes it",
    inspect.CHMOD: "--repair sets mode 0600",
    inspect.REMOVE_COW: "--repair --remove-cow removes it",
    inspect.REMOVE_SUBVOLUME: "--repair --remove-subvolumes removes it",
    "": "left for you to decide",
}


def cmd_fsck(args, out):
    """Find garbage and damage; with --repair, remove provable garbage."""
    pool_dir = _existing_dir(args.pool_dir)
    if args.repair and not args.force and inspect.qubesd_running():
        out.line("refusing to repair while qubesd is running: stop it first")
        out.line("(or use --force if it does not use this pool)")
        return EXIT_REFUSED
    problems = inspect.pool_problems(pool_dir, args.remove_subvolumes)
    done = _repair(out, problems, args.remove_cow) if args.repair else []
    if args.repair:
        problems = inspect.pool_problems(pool_dir, args.remove_subvolumes)
    for problem in problems:
        out.line(
            f"{problem.path}: {problem.message} ({_WOULD[problem.repair]})"
        )
    out.line(_fsck_summary(problems, done, args))
    out.data(
        {
            "pool_dir": pool_dir,
            "repaired": done,
            "problems": [p._asdict() for p in problems],
        }
    )
    return EXIT_NO if problems else EXIT_OK


def _fsck_summary(problems, done, args):
    text = f"{len(done)} repaired, " if args.repair else ""
    text += f"{len(problems)} problems" + (" remaining" if args.repair else "")
    if not args.repair and not args.force and problems:
        if inspect.qubesd_running():
            text += (
                "; qubesd is running: temporary, export and import files "
                "may be in use"
            )
    return text


def _repair(out, problems, remove_cow):
    """Carry out the repairs fsck allows, showing each."""
    chosen = repair.chosen(problems, remove_cow)
    meter = out.progress(len(chosen), "repairs")
    done = []
    try:
        for number, (problem, action) in enumerate(repair.carry_out(chosen), 1):
            out.line(f"{action}: {problem.path} ({problem.message})")
            done.append({"path": problem.path, "action": action})
            meter.update(number)
    finally:
        meter.close()
    return done


# -- migrate --------------------------------------------------------------


def cmd_migrate(args, out):
    """Switch 'file' pools to this driver in qubes.xml, or --revert."""
    xml_path = os.path.abspath(args.qubes_xml)
    if args.revert:
        return _revert(args, out, xml_path)
    with open(xml_path, "rb") as xml_file:
        data = xml_file.read()
    pools = migrate.file_pools(data, args.pool)
    target = driver_name()
    if not pools:
        out.line(f"{xml_path}: no pool uses the 'file' driver; nothing to do")
        out.data({"qubes_xml": xml_path, "pools": [], "applied": False})
        return EXIT_OK
    plans = [
        migrate.plan_pool(pool, data, not args.no_setup_check, args.run_dir)
        for pool in pools
    ]
    for plan in plans:
        _print_plan(out, plan, target)
    verdict = _VERDICTS[migrate.obstacle(plans, args.force, args.apply)]
    report = {"qubes_xml": xml_path, "driver": target, "pools": plans}
    if verdict != EXIT_OK or not args.apply:
        _print_dry_run(out, xml_path, verdict)
        out.data({**report, "applied": False, "exit": verdict})
        return verdict
    backup = migrate.switch(xml_path, data, pools, target)
    out.line(f"wrote backup {backup}")
    out.line(
        f'rewrote {xml_path}: driver="{target}" for '
        f"{', '.join(p.name for p in pools)}"
    )
    removed = _remove_cow(out, [p for plan in plans for p in plan["cow"]])
    out.line("done: start qubesd again (systemctl start qubesd)")
    out.data({**report, "applied": True, "backup": backup, "removed": removed})
    return EXIT_OK


_VERDICTS = {
    None: EXIT_OK,
    migrate.NO_REFLINK: EXIT_NO,
    migrate.IN_USE_NOW: EXIT_REFUSED,
}


def _print_plan(out, plan, target):
    out.line(
        f"pool {plan['name']} ({plan['dir_path']}, {plan['fstype']}): "
        f"driver \"file\" -> \"{target}\" (line {plan['line']})"
    )
    if plan["reflink"] is not None:
        out.line(f"  reflinks: {'yes' if plan['reflink'] else 'NO'}")
    for reason in plan["busy"]:
        out.line(f"  in use: {reason}")
    out.line(f"  *-cow.img* files to remove: {len(plan['cow'])}")
    for path in plan["cow"]:
        out.line(f"    {path}")


def _print_dry_run(out, xml_path, verdict):
    if verdict == EXIT_NO:
        out.line(
            "refusing: a pool's filesystem can't reflink (move it to btrfs "
            "or XFS, or use --no-setup-check to accept full copies)"
        )
    elif verdict == EXIT_REFUSED:
        out.line(
            "refusing: qubesd or a VM of these pools is running; shut the "
            "VMs down and stop qubesd (or use --force)"
        )
    else:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        out.line(f"would write backup {layout.xml_backup(xml_path, stamp)}")
        out.line(f"would rewrite {xml_path} (only the attributes above)")
        out.line("would remove the *-cow.img* files listed above")
        out.line("nothing changed: run again with --apply to do it")


def _remove_cow(out, paths):
    meter = out.progress(len(paths), "*-cow.img* files removed")
    removed = []
    try:
        for number, path in enumerate(migrate.remove_cow(paths), 1):
            removed.append(path)
            out.line(f"removed {path}")
            meter.update(number)
    finally:
        meter.close()
    return removed


def _revert(args, out, xml_path):
    """Put the newest backup back in place of qubes.xml."""
    newest = migrate.newest_backup(xml_path)
    if args.apply and not args.force and inspect.qubesd_running():
        out.line("refusing: qubesd is running; stop it first (or --force)")
        return EXIT_REFUSED
    subvolumes = migrate.reverted_subvolumes(xml_path, newest, driver_name())
    if not args.apply:
        for problem in subvolumes:
            out.line(f"would remove {problem.path} ({problem.message})")
        out.line(f"would restore {newest} as {xml_path}")
        out.line("nothing changed: run again with --apply to do it")
        out.data({"qubes_xml": xml_path, "backup": newest, "applied": False})
        return EXIT_OK
    _repair(out, subvolumes, remove_cow=False)
    migrate.restore(xml_path, newest)
    out.line(f"restored {xml_path} from {newest}")
    out.data({"qubes_xml": xml_path, "backup": newest, "applied": True})
    return EXIT_OK


# -- parser ---------------------------------------------------------------


def _common(parser, suppress):
    """-v/-q/--raw/--json, accepted before and after the subcommand."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default or 0,
        help="say more: list every file, log every file operation (-vv: debug)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default or 0,
        help="print nothing but errors; the exit code tells the result",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        default=default or False,
        help="sizes in bytes instead of KiB, MiB, GiB",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default or False,
        help="print one JSON document instead of text",
    )


def _subparser(subparsers, name, help_text, func):
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EXAMPLES[name] + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, suppress=True)
    parser.set_defaults(func=func)
    return parser


def build_parser():
    """The argument parser of qubes-reflink and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="qubes-reflink",
        description="Inspect, repair and migrate to file-reflink storage "
        "pools (run it in dom0, as root, preferably with qubesd stopped).",
        epilog="examples:\n"
        + "".join(text.split("\n", 1)[1] for text in EXAMPLES.values())
        + "\n"
        + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_check(subparsers)
    status = _subparser(
        subparsers,
        "status",
        "list the volumes and files of a pool",
        cmd_status,
    )
    status.add_argument("pool_dir", help="the pool's dir_path")
    du = _subparser(
        subparsers,
        "du",
        "space per volume and revision: allocated, shared, exclusive",
        cmd_du,
    )
    _pool_and_vids(du, "only these volumes (appvms/VM/VOLUME, ...)")
    _add_defrag(subparsers)
    _add_fsck(subparsers)
    _add_revisions(subparsers)
    _add_migrate(subparsers)
    return parser


def _pool_and_vids(parser, vids_help):
    """POOL_DIR [VID...]"""
    parser.add_argument("pool_dir", help="the pool's dir_path")
    parser.add_argument("vids", nargs="*", metavar="VID", help=vids_help)


def _add_check(subparsers):
    check = _subparser(
        subparsers, "check", "can a directory reflink files?", cmd_check
    )
    check.add_argument("dir", help="directory to test (a pool's dir_path)")
    check.add_argument(
        "--from",
        dest="from_dir",
        metavar="DIR2",
        help="test reflinking files from DIR2 into DIR instead",
    )
    check.add_argument(
        "--defrag-threshold",
        type=int,
        metavar="N",
        help="warn about committed images N extents beyond their "
        "contiguous pieces (default: the pool's defrag_threshold setting, "
        f"else {DEFAULT_DEFRAG_THRESHOLD})",
    )


def _add_defrag(subparsers):
    parser = _subparser(
        subparsers,
        "defrag",
        "rewrite fragmented committed images contiguously, keeping them "
        "shared with their revisions, spares and snapshots (safe while "
        "qubesd runs; a volume that starts is left for later)",
        cmd_defrag,
    )
    _pool_and_vids(parser, "only these volumes (default: every fragmented one)")
    parser.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="say what would be rewritten and the free space it needs; "
        "change nothing",
    )


def _add_fsck(subparsers):
    fsck = _subparser(
        subparsers,
        "fsck",
        "find leftovers and damage in a pool; --repair removes garbage",
        cmd_fsck,
    )
    fsck.add_argument("pool_dir", help="the pool's dir_path")
    fsck.add_argument(
        "--repair",
        action="store_true",
        help="remove temporary, export, import files, stale spares, base "
        "markers and snapshot subvolumes, and set image modes to 0600 "
        "(never touches committed or running images or revisions)",
    )
    fsck.add_argument(
        "--remove-cow",
        action="store_true",
        help="with --repair, also remove *-cow.img* files of the 'file' "
        "driver (only once the pool no longer uses that driver)",
    )
    fsck.add_argument(
        "--remove-subvolumes",
        action="store_true",
        help="also list (with --repair, remove) every btrfs subvolume this "
        "driver keeps (snapshot bases, images of running snapshot "
        "volumes): before switching the pool to the 'file' or the core's "
        "file-reflink driver, which know none",
    )
    fsck.add_argument(
        "--force",
        action="store_true",
        help="repair even though qubesd seems to be running",
    )


def _add_revisions(subparsers):
    for name, help_text, func in (
        ("pin", "keep a revision whatever revisions_to_keep says", cmd_pin),
        ("unpin", "make a pinned revision ordinary again", cmd_unpin),
    ):
        parser = _subparser(subparsers, name, help_text, func)
        _volume_arguments(parser)
        parser.add_argument(
            "revision", help="revision id, as 'qvm-volume info' lists it"
        )
    cancel = _subparser(
        subparsers,
        "cancel-revert",
        "drop the revert a running volume would carry out at its stop",
        cmd_cancel_revert,
    )
    _volume_arguments(cancel)
    setting = _subparser(
        subparsers,
        "set",
        "change a pool setting while qubesd runs: keep_revision_older_than "
        "(seconds; pruning keeps the newest revision at least that old), "
        "auto_defrag (True/False), defrag_threshold (extents), "
        "defrag_interval (seconds)",
        cmd_set,
    )
    setting.add_argument("pool_dir", help="the pool's dir_path")
    setting.add_argument("setting", metavar="KEY=VALUE")


def _volume_arguments(parser):
    parser.add_argument("pool_dir", help="the pool's dir_path")
    parser.add_argument("vid", metavar="VID", help="appvms/VM/VOLUME, ...")
    parser.add_argument(
        "--qubes-xml",
        default=migrate.DEFAULT_QUBES_XML,
        metavar="PATH",
        help="qubes.xml to read the volume's settings from "
        "(default: %(default)s)",
    )


def _add_migrate(subparsers):
    mig = _subparser(
        subparsers,
        "migrate",
        f"switch 'file' pools in qubes.xml to the {driver_name()} driver",
        cmd_migrate,
    )
    mig.add_argument(
        "--qubes-xml",
        default=migrate.DEFAULT_QUBES_XML,
        metavar="PATH",
        help="qubes.xml to edit (default: %(default)s)",
    )
    mig.add_argument(
        "--pool",
        action="append",
        metavar="NAME",
        help="migrate only this pool (repeatable; default: every 'file' pool)",
    )
    mig.add_argument(
        "--apply",
        action="store_true",
        help="do it (without it: only print what would be done)",
    )
    mig.add_argument(
        "--revert",
        action="store_true",
        help="restore the newest backup of qubes.xml made by migrate "
        "(with --apply)",
    )
    mig.add_argument(
        "--no-setup-check",
        action="store_true",
        help="don't refuse pools whose filesystem can't reflink",
    )
    mig.add_argument(
        "--force",
        action="store_true",
        help="go ahead although qubesd or VMs of the pools seem to run",
    )
    mig.add_argument(
        "--run-dir",
        default=migrate.DEFAULT_RUN_DIR,
        help=argparse.SUPPRESS,  # where the host keeps volume state files
    )


def _configure_logging(args):
    level = logging.WARNING
    if args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    if args.quiet:
        level = logging.ERROR
    logging.basicConfig(
        level=level, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("qubes.storage.reflink").setLevel(level)


def main(argv=None):
    """Entry point of the qubes-reflink console script; returns the exit
    code (see EXIT_CODES)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    out = Output(args)
    try:
        return args.func(args, out)
    except (
        OSError,
        LookupError,
        ValueError,
        RuntimeError,
        migrate.MigrateError,
    ) as err:
        print(f"qubes-reflink: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
