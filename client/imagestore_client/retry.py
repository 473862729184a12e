"""Trying again after a broken connection: a limited number of failures in a row, the
first retried at once, then after 1, 2, 4 ... seconds (at most 30)."""

import time

MAX_PAUSE = 30


def pause(failures):
    """Seconds to wait before the next try after this many failures in a row."""
    return 0 if failures <= 1 else min(MAX_PAUSE, 2 ** (failures - 2))


class Retries:
    """Counts failures in a row; `ok()` after progress starts the count again."""

    def __init__(self, limit, progress=None, pauses=pause):
        self.limit, self.failures, self.progress, self.pauses = limit, 0, progress, pauses

    def ok(self):
        self.failures = 0

    def failed(self, error):
        """Wait before the next try, or raise error when the limit is reached."""
        self.failures += 1
        if self.failures > self.limit:
            raise error
        if self.progress is not None:
            self.progress.resumed()
        time.sleep(self.pauses(self.failures))
