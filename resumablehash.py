"""A sha256 whose running state can be saved after one piece of a tus upload and taken up
again, for the next piece, by any process.

The sha256 of a whole upload is needed at its end; reading the file again then would cost
as long as hashing it (about 0.9 s a GiB here, docs/platform.md), and pieces come to any
worker, so no process can keep a hashlib object from one piece to the next (hashlib's state
cannot be saved). OpenSSL, the library behind hashlib, also has low-level SHA256 functions
that work on a plain struct of its own: the eight state words, the bit count, the partial
block and its length, SHA256_CTX. Those bytes are the whole state: saved in the upload's
row, and copied back into a struct, they go on as if never stopped. Same code, same speed
as hashlib; and ctypes lets go of the GIL during the call, as hashlib does.

The struct is checked against hashlib when this module is loaded (a hash broken off and
taken up again must give hashlib's digest); where that fails, or there is no libcrypto,
AVAILABLE is False and the caller hashes the finished file instead (file_sha256).
"""

import ctypes
import ctypes.util
import hashlib

# sizeof(SHA256_CTX) in OpenSSL 1.1 and 3.x: 8 + 2 + 16 words of 32 bits, then two ints.
CTX_SIZE = 112
READ_SIZE = 1 << 20


def _load_libcrypto():
    """OpenSSL's libcrypto with SHA256_Init/Update/Final typed, or None."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
        functions = lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final
    except (OSError, AttributeError):
        return None
    for function in functions:
        function.restype = ctypes.c_int
    lib.SHA256_Init.argtypes = (ctypes.c_void_p,)
    lib.SHA256_Update.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    lib.SHA256_Final.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
    return lib


_LIB = _load_libcrypto()


class ResumableSha256:
    """sha256 with update() and hexdigest() as hashlib's, plus state(): bytes that
    ResumableSha256(state) takes up again."""

    def __init__(self, state=None):
        self._ctx = ctypes.create_string_buffer(CTX_SIZE)
        if state is None:
            _LIB.SHA256_Init(self._ctx)
        elif len(state) != CTX_SIZE:
            raise ValueError(f"a saved sha256 state is {CTX_SIZE} bytes, not {len(state)}")
        else:
            ctypes.memmove(self._ctx, bytes(state), CTX_SIZE)

    def update(self, data):
        """Hash data (bytes, bytearray or a memoryview of either), without copying a
        writable buffer."""
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        array_type = ctypes.c_char * view.nbytes
        make = array_type.from_buffer_copy if view.readonly else array_type.from_buffer
        buffer = make(view)
        _LIB.SHA256_Update(self._ctx, buffer, view.nbytes)

    def state(self):
        """The running state, to be saved and handed to ResumableSha256 again."""
        return self._ctx.raw

    def hexdigest(self):
        """The digest of everything so far, as hex; the state goes on unchanged."""
        ctx = ctypes.create_string_buffer(self._ctx.raw, CTX_SIZE)  # Final spends its ctx
        out = ctypes.create_string_buffer(32)
        _LIB.SHA256_Final(out, ctx)
        return out.raw.hex()


def _works():
    """Whether a hash saved halfway and taken up again gives hashlib's digest."""
    if _LIB is None:
        return False
    data = bytes(range(256)) * 5  # pieces that end inside a 64-byte block
    first = ResumableSha256()
    first.update(data[:333])
    second = ResumableSha256(first.state())
    second.update(bytearray(data[333:]))
    return second.hexdigest() == hashlib.sha256(data).hexdigest()


AVAILABLE = _works()


def file_sha256(path):
    """The sha256 of a whole file, as hex: where no state could be kept (AVAILABLE false)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(READ_SIZE):
            digest.update(block)
    return digest.hexdigest()
