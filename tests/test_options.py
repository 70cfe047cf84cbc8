"""Pool and volume options as they arrive from qvm-pool and qubes.xml:
strings, parsed with clear errors naming the option."""

import inspect

import pytest

from helpers import FakeVM
from qubes_reflink import ReflinkPool
from qubes_reflink.host import StoragePoolException

TRUE_WORDS = ["True", "true", "TRUE", "yes", "Yes", "YES", "on", "On", "1"]
FALSE_WORDS = ["False", "false", "FALSE", "no", "No", "NO", "off", "OFF", "0"]
GARBAGE = ["", "maybe", "2", "-1", "tru", "y", "n", "none", "yes please"]


def make_pool(**options):
    options.setdefault("name", "p")
    options.setdefault("dir_path", "/var/lib/qubes-reflink-test")
    return ReflinkPool(**options)


@pytest.mark.parametrize("option", ["setup_check", "ephemeral_volatile"])
@pytest.mark.parametrize("word", TRUE_WORDS)
def test_bool_true_words(option, word):
    assert getattr(make_pool(**{option: word}), option) is True


@pytest.mark.parametrize("option", ["setup_check", "ephemeral_volatile"])
@pytest.mark.parametrize("word", FALSE_WORDS)
def test_bool_false_words(option, word):
    assert getattr(make_pool(**{option: word}), option) is False


@pytest.mark.parametrize("option", ["setup_check", "ephemeral_volatile"])
def test_bool_real_bools(option):
    assert getattr(make_pool(**{option: True}), option) is True
    assert getattr(make_pool(**{option: False}), option) is False


@pytest.mark.parametrize("option", ["setup_check", "ephemeral_volatile"])
@pytest.mark.parametrize("word", GARBAGE)
def test_bool_garbage_names_option(option, word):
    with pytest.raises(StoragePoolException, match=option):
        make_pool(**{option: word})


def test_defaults():
    pool = make_pool()
    assert pool.revisions_to_keep == 1
    assert pool.setup_check is True
    assert pool.ephemeral_volatile is False


@pytest.mark.parametrize(
    "text, expected", [("1", 1), ("-1", -1), ("0", 0), ("3", 3), (" 2 ", 2)]
)
def test_revisions_to_keep_valid(text, expected):
    assert make_pool(revisions_to_keep=text).revisions_to_keep == expected


@pytest.mark.parametrize("text", ["abc", "1.5", "-5", "", "-2", "1e3", None])
def test_revisions_to_keep_invalid(text):
    with pytest.raises(StoragePoolException, match="revisions_to_keep"):
        make_pool(revisions_to_keep=text)


@pytest.mark.parametrize("value", ["", "   ", "relative/dir", "pool", None])
def test_dir_path_invalid(value):
    with pytest.raises(StoragePoolException, match="dir_path"):
        make_pool(dir_path=value)


def test_dir_path_required():
    """qvm-pool reads the options from __init__'s signature: dir_path has
    no default there, so it is listed as required."""
    dir_path = inspect.signature(ReflinkPool.__init__).parameters["dir_path"]
    assert dir_path.default is inspect.Parameter.empty


def test_dir_path_normalised():
    assert make_pool(dir_path="/var/lib//x/./y/").dir_path == "/var/lib/x/y"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"revisions_to_keep": "3", "setup_check": "no"},
        {"revisions_to_keep": "-1", "ephemeral_volatile": "on"},
        {"revisions_to_keep": 0, "setup_check": False},
    ],
)
def test_config_round_trips_through_strings(options):
    """qubes.xml stores str() of every value and passes them back."""
    pool = make_pool(**options)
    config = pool.config
    assert config["driver"] == "file-reflink"
    assert config["name"] == "p"
    stored = {key: str(value) for key, value in config.items()}
    assert stored["setup_check"] in ("True", "False")
    assert stored["ephemeral_volatile"] in ("True", "False")
    del stored["driver"]
    again = ReflinkPool(**stored)
    assert again.config == config
    # and once more, through strings again: a fixed point
    stored2 = {k: str(v) for k, v in again.config.items() if k != "driver"}
    assert ReflinkPool(**stored2).config == config


@pytest.mark.parametrize("value", ["no", "False", False])
def test_setup_check_off_survives_r42_serialisation(value):
    """R4.2 writes a bool to qubes.xml only when it is True (and R4.3 writes
    "False"): an option turned off must not come back on after a restart."""

    def r42_sanitize(config):
        return {
            key: (
                ("True" if value else None)
                if isinstance(value, bool)
                else str(value)
            )
            for key, value in config.items()
            if value is not False
        }

    pool = make_pool(setup_check=value, ephemeral_volatile="yes")
    stored = r42_sanitize(pool.config)
    assert stored["setup_check"] == "False"
    del stored["driver"]
    again = ReflinkPool(**stored)
    assert again.setup_check is False
    assert again.ephemeral_volatile is True


def test_config_has_every_option():
    config = make_pool().config
    assert set(config) == {
        "name",
        "driver",
        "dir_path",
        "revisions_to_keep",
        "setup_check",
        "ephemeral_volatile",
        "keep_revision_older_than",
        "auto_defrag",
        "defrag_threshold",
        "defrag_interval",
    }


def test_volume_options_from_xml_strings():
    """Volume options loaded from qubes.xml are strings."""
    pool = make_pool()
    vm = FakeVM("work")
    volume = pool.init_volume(
        vm,
        {
            "name": "private",
            "rw": "True",
            "save_on_stop": "True",
            "snap_on_start": "False",
            "revisions_to_keep": "2",
            "size": "1048576",
        },
    )
    assert volume.rw is True
    assert volume.save_on_stop is True
    assert volume.snap_on_start is False
    assert volume.revisions_to_keep == 2
    assert volume.size == 1048576
    assert volume.vid == "appvms/work/private"
    assert volume.config["revisions_to_keep"] == 2


def test_volume_options_false_strings():
    pool = make_pool()
    volume = pool.init_volume(
        FakeVM("work"),
        {"name": "volatile", "rw": "False", "save_on_stop": "False"},
    )
    assert volume.rw is False
    assert volume.save_on_stop is False


def test_volume_inherits_pool_revisions_to_keep():
    pool = make_pool(revisions_to_keep="3")
    volume = pool.init_volume(FakeVM("work"), {"name": "private"})
    assert volume.revisions_to_keep == 3


@pytest.mark.parametrize(
    "option, value",
    [
        ("rw", "maybe"),
        ("save_on_stop", "2"),
        ("snap_on_start", ""),
        ("revisions_to_keep", "abc"),
        ("revisions_to_keep", "-5"),
        ("size", "1.5"),
        ("size", "-1"),
        ("ephemeral", "sometimes"),
    ],
)
def test_volume_option_garbage(option, value):
    pool = make_pool()
    with pytest.raises(StoragePoolException) as info:
        pool.init_volume(FakeVM("work"), {"name": "private", option: value})
    assert option in str(info.value) or "size" in str(info.value)


def test_missing_dir_path_says_what_to_give():
    """R4.2's admin.pool.Add passes only the options given: a pool without
    dir_path is refused with the command to use, not a TypeError."""
    with pytest.raises(StoragePoolException, match="-o dir_path="):
        # pylint: disable-next=missing-kwoa
        ReflinkPool(name="mypool", revisions_to_keep="1")
