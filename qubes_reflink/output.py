"""How the qubes-reflink tool prints: human text or JSON, sizes, and a
progress meter on a terminal."""

import json
import sys
import time


class Output:
    """Where results go: human text, raw numbers or JSON, and how much."""

    def __init__(self, args):
        self.json = args.json
        self.raw = args.raw
        self.quiet = args.quiet > 0
        self.tty = sys.stdout.isatty()

    def line(self, text=""):
        """A line of human output (silent with -q or --json)."""
        if not self.quiet and not self.json:
            print(text)

    def data(self, value):
        """The JSON document of --json."""
        if self.json:
            json.dump(value, sys.stdout, indent=2, sort_keys=True)
            print()

    def size(self, number):
        """Bytes, in binary units unless --raw."""
        if self.raw:
            return str(number)
        return human_size(number)

    def progress(self, total, label):
        """A progress meter on stderr, only when stdout is a terminal."""
        enabled = self.tty and not self.quiet and total > 1
        return Progress(total, label, enabled)


def human_size(number):
    """1536 -> '1.5 KiB'; exact bytes below 1 KiB."""
    if number < 1024:
        return f"{number} B"
    value = float(number)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


class Progress:
    """`[#####     ] 5/10 label` on stderr, drawn only once work has taken
    more than half a second, so short runs stay quiet."""

    DELAY = 0.5

    def __init__(self, total, label, enabled):
        self.total, self.label, self.enabled = total, label, enabled
        self.started = time.monotonic()
        self.drawn = False

    def update(self, done):
        """Show that `done` of `total` steps are finished."""
        if not self.enabled or time.monotonic() - self.started < self.DELAY:
            return
        filled = 30 * done // max(self.total, 1)
        meter = "#" * filled + " " * (30 - filled)
        sys.stderr.write(f"\r[{meter}] {done}/{self.total} {self.label}")
        sys.stderr.flush()
        self.drawn = True

    def close(self):
        """Erase the meter."""
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
