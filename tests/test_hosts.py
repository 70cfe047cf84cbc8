"""tests/hosts.py: where the host trees and the Pythons come from.

Fetching runs real git against repositories made here (the public one is
out of reach in CI): a pinned commit and the tag that must name it are
checked, and what can't be had fails with one message saying how to get
it.  The Pythons: each release's is found, its virtual environment first.
"""

import os
import shutil
import subprocess
import sys

import pytest

import hosts


def git(repo, *args):
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        },
    ).stdout.strip()


@pytest.fixture
def upstream(tmp_path):
    """A repository with a host-like tree, tagged v9.9.9, and a later
    commit: (path, tagged commit id, later commit id)."""
    repo = tmp_path / "upstream"
    (repo / "qubes" / "storage").mkdir(parents=True)
    (repo / "qubes" / "storage" / "__init__.py").write_text("# host\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    tagged = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "-a", "v9.9.9", "-m", "release")
    (repo / "later").write_text("later\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "two")
    return repo, tagged, git(repo, "rev-parse", "HEAD")


def release(commit, tag="v9.9.9"):
    return hosts.Release("T", tag, "3.11", commit)


def test_fetches_the_pinned_commit_of_its_tag(upstream, tmp_path):
    repo, tagged, _later = upstream
    cache = tmp_path / "cache"
    hosts.fetch_tree(release(tagged), str(cache), url=f"file://{repo}")
    assert hosts.has_tree(str(cache), "v9.9.9")
    assert not (cache / "v9.9.9" / "later").exists()  # that commit, no other
    assert sorted(os.listdir(cache)) == ["v9.9.9"]  # no work left behind


def test_refuses_a_tag_that_names_another_commit(upstream, tmp_path):
    repo, _tagged, later = upstream
    cache = tmp_path / "cache"
    with pytest.raises(hosts.HostUnavailable, match="tag v9.9.9 names"):
        hosts.fetch_tree(release(later), str(cache), url=f"file://{repo}")
    assert os.listdir(cache) == []


def test_unreachable_source_says_how_to_get_the_trees(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(hosts.HostUnavailable) as info:
        hosts.fetch_tree(
            release("0" * 40), str(cache), url="file:///nonexistent"
        )
    message = str(info.value)
    assert "QUBES_CORE_ADMIN_TREES" in message and "git archive" in message
    assert os.listdir(cache) == []


def test_make_test_stops_with_one_message_offline(tmp_path):
    """A checkout with no ../shared beside it, offline: `hosts.py --trees`
    (what make test runs first) exits 1 naming what is missing."""
    copy = tmp_path / "clone" / "tests"
    copy.mkdir(parents=True)
    shutil.copy(hosts.__file__, copy / "hosts.py")
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "QUBES_CORE_ADMIN_TREES"
    }
    env.update(
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        QUBES_CORE_ADMIN_URL="file:///nonexistent",
    )
    result = subprocess.run(
        [sys.executable, str(copy / "hosts.py"), "--trees"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    errors = [
        line for line in result.stderr.splitlines() if "hosts.py:" in line
    ]
    assert len(errors) == 1
    for release_ in hosts.RELEASES:
        assert release_.tag in result.stderr


@pytest.mark.parametrize("release_", hosts.RELEASES, ids=lambda r: r.id)
def test_each_release_python_is_found(release_):
    python = hosts.find_python(release_.python)
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == release_.python
    base = hosts.find_python(release_.python, base=True)
    assert not base.startswith(hosts.VENVS)  # a venv is made from another
