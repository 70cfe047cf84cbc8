"""The power-cut harness catches each mutant of tests/mutants.py.

`make mutants` hunts each through every operation and filesystem; here
each is run against the campaign listed for it (the fast subset), split
between the two Pythons of `make test` as the power-cut sample is.
"""

import sys

import pytest

import mutants

SHARE = mutants.MUTANTS[0 if sys.version_info < (3, 12) else 1 :: 2]


@pytest.mark.parametrize("mutant", SHARE, ids=lambda m: m.name)
def test_power_cut_checks_catch_the_mutant(mutant):
    by, _count = mutants.hunt(mutant, fast=True)
    assert by is not None, f"{mutant.name} ({mutant.claim}) was missed"


def test_every_mutant_still_applies(tmp_path):
    """A mutant whose text the driver no longer has would test nothing."""
    for mutant in mutants.MUTANTS:
        copy = mutants.mutated_copy(mutant, str(tmp_path / mutant.name))
        assert copy
