"""Writing an upload's whole blocks around the page cache (O_DIRECT), where the disk allows.

On the VMs this store is measured on, the kernel's cost of taking fresh page-cache pages
was most of an upload's CPU: about 2.5 s of system time per GiB written the usual way,
0.2 s with O_DIRECT (docs/platform.md). The store fsyncs every upload anyway, so keeping
its bytes in the page cache bought nothing but that cost. Direct I/O wants the file's
offset, the length and the buffer's address in whole blocks: the ring's buffers are
page-aligned maps and their pieces whole blocks, and what is not (a body's last piece, a
tus piece at an odd offset, a file system that refuses) goes through the page cache.
"""

import errno
import fcntl
import mmap
import os

# A multiple of every logical block size in use (512 and 4096 bytes).
BLOCK = 4096


def aligned_buffer(size):
    """A writable buffer of size bytes that starts on a page boundary (an anonymous map)."""
    return mmap.mmap(-1, size)


class DirectWrites:
    """Direct I/O on an open file for as long as its writes are whole blocks at whole-block
    offsets; off for good after the first one that is not, and at close()."""

    def __init__(self, out):
        self._fd = out.fileno()
        self.on = out.tell() % BLOCK == 0 and self._set(True)

    def _set(self, direct):
        """Turn O_DIRECT on or off on the file; whether that worked."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        flags = flags | os.O_DIRECT if direct else flags & ~os.O_DIRECT
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                raise
            return False
        return True

    def close(self):
        """Back to ordinary writes (the file's last piece, its fsync, anyone after us)."""
        if self.on:
            self.on = not self._set(False)

    def write_blocks(self, view):
        """Write the whole blocks at view's start directly; return what is left to write the
        ordinary way (after which direct I/O is off)."""
        whole = len(view) - len(view) % BLOCK if self.on else 0
        written = 0
        if whole:
            try:
                written = os.write(self._fd, view[:whole])
            except OSError as error:
                if error.errno != errno.EINVAL:  # a full disk is the caller's to answer
                    raise
        rest = view[written:]
        if rest:
            self.close()
        return rest
