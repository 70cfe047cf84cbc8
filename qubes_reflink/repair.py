"""Carrying out the repairs `fsck` offers, and nothing else.

`inspect.find_problems` decides what is garbage (through `judgement`) and
which repair each problem allows; this module only carries them out,
through `fileops` and `btrfs`, logging each.  A committed image's data, a
running image or a revision is never offered, so never touched.
"""

import logging

from . import btrfs, fileops, inspect

log = logging.getLogger("qubes.storage.reflink")


def chosen(problems, remove_cow):
    """The problems a repair takes on (the 'file' driver's cow files only
    with `remove_cow`)."""
    actions = {inspect.REMOVE, inspect.CHMOD, inspect.REMOVE_SUBVOLUME}
    if remove_cow:
        actions.add(inspect.REMOVE_COW)
    return [problem for problem in problems if problem.repair in actions]


def carry_out(problems):
    """Repair each of `problems` in turn; yields (problem, what was done)
    after each, so that the caller can show progress."""
    for problem in problems:
        if problem.repair == inspect.CHMOD:
            old = fileops.set_image_mode(problem.path)
            action = f"changed mode {old:04o} to 0600"
        elif btrfs.is_subvolume(problem.path):
            btrfs.destroy(problem.path)
            action = "removed"
        else:
            fileops.remove_files([problem.path])
            action = "removed"
        log.info("fsck: %s %s (%s)", action, problem.path, problem.message)
        yield problem, action
