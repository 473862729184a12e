"""Progress of a transfer: a bar with speed and ETA on standard error (tqdm, drawn only on a
terminal), then one summary line, so that a CI log shows what moved."""

import sys
import time

from tqdm import tqdm

UNITS = ["B", "KiB", "MiB", "GiB", "TiB"]


def human(size):
    """A byte count in binary units: 197632 -> '193.0 KiB'."""
    value = float(size)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class Progress:
    """One transfer: what it moved (bytes sent again after a break included) and how often
    it resumed; a bar while it runs, a summary when it ends well (unless quiet)."""

    def __init__(self, verb, total, initial=0, quiet=False, summary=True):
        self.verb, self.quiet, self.summary = verb, quiet, summary
        self.moved, self.resumes, self.started = 0, 0, time.monotonic()
        self.bar = tqdm(total=total, initial=initial, desc=verb, unit="B", unit_scale=True,
                        unit_divisor=1024, file=sys.stderr, dynamic_ncols=True,
                        disable=True if quiet else None)

    def advance(self, count):
        """count more bytes moved."""
        self.moved += count
        self.bar.update(count)

    def rewind(self, position):
        """The transfer goes on from position (after a break: what the other side has)."""
        self.bar.n = position
        self.bar.refresh()

    def resumed(self):
        self.resumes += 1

    def line(self):
        """The summary: what moved, how long it took, how often it resumed."""
        seconds = max(time.monotonic() - self.started, 1e-6)
        rate = human(self.moved / seconds)
        text = f"{self.verb} {human(self.moved)} in {seconds:.1f} s ({rate}/s)"
        if self.resumes:
            text += f", resumed {self.resumes} time{'s' if self.resumes > 1 else ''}"
        return text

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.bar.close()
        if kind is None and self.summary and not self.quiet:
            print(f"imagestore: {self.line()}", file=sys.stderr)
