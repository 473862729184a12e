"""Putting the store right after a crash: files of killed workers, and orphan files.

It knows the store (storage.Storage) and nothing of the database: what it needs to know
about image rows comes in as a function, so that it imports no model.
"""

import logging
from collections.abc import Callable

from storage import Storage

log = logging.getLogger(__name__)


def recover(storage: Storage, has_row: Callable[[str], bool]) -> tuple[int, int]:
    """Finish what killed processes left half done; return (temporary files, orphan files)
    removed. A key with an unsettled intent keeps its file only if has_row(key)."""
    temporary = storage.sweep()
    orphans = 0
    for key, pid in storage.intents.unsettled():
        if not has_row(key):
            try:
                storage.delete(key)
            except OSError as error:  # a store that is down: keep the intent for next time
                log.warning("could not remove orphan %s yet: %s", key, error)
                continue
            orphans += 1
        storage.intents.settle(key, pid)
    return temporary, orphans


def orphan_keys(storage: Storage, older_than: float,
                keys_with_rows: Callable[[], set[str]]) -> list[str]:
    """Stored files with no row (left by a crash between put and commit, or delete and unlink).

    An upload holds an intent on its key from before the file appears until after its row
    is committed. So the keys are listed first, then the intents, then the rows (only
    then is keys_with_rows called): a file listed is either still under its intent, or its
    row was committed before the rows are read. Listing rows first lost files whose row
    came in between, and a file under a live upload's intent was removed whenever it was
    older than `older_than`.
    """
    listed = storage.keys(older_than=older_than)
    pending = storage.intents.intended_keys()
    known = keys_with_rows()
    return [key for key in listed if key not in pending and key not in known]
