"""gunicorn's threaded worker with a bounded time for the request head, and JSON errors.

gunicorn 27's gthread worker hands every new connection to a thread at once: the thread
waits up to 5 s for a first byte, and once one has come it reads the rest of the head
(request line and headers) with no time limit at all. A client that sends its headers a
byte at a time holds a thread for as long as it likes, and silent connections tie up
threads and connection slots that real requests then queue behind.

This worker reads request heads in its main loop, with non-blocking reads and no thread:
only a connection whose head is complete goes to a thread, and one whose head has not
come within `head_timeout` seconds is closed (with a `408` when part of a head came). The
worker accepts new connections only while a thread is free (or about to be), so that one
busy with slow bodies leaves new connections to the other workers, and it may hold many
connections that cost no thread.

gunicorn also answers requests it cannot parse (a bad Content-Length, a request line or
headers over the limits) with an HTML page; this worker's processes answer them with
`{"message": ...}` JSON and the same status, as the API answers every error.
"""

import contextlib
import json
import selectors
import socket
import time
from collections import deque
from functools import partial

from gunicorn import util
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import ThreadWorker

# One non-blocking read of a head: a head is far smaller; body bytes read with it are
# handed to the parser with the head.
HEAD_READ_SIZE = 65536
# Bytes of unfinished heads a worker holds at most, all connections together: a head may
# be ~800 KiB under gunicorn's default limits, and a worker may hold 1000 connections.
HEAD_BYTES_BUDGET = 64 * 1024 * 1024
# After an answer written from the main loop, how long what the client still sends is
# read and dropped before the close: closing with unread bytes would send a reset, and
# the client could lose the answer (gunicorn's close_graceful waits as long).
LINGER_SECONDS = 2.0


def json_error(status, reason, message):
    """The bytes of a complete answer {"message": message} that closes the connection."""
    body = json.dumps({"message": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def write_json_error(sock, status_int, reason, mesg):
    """gunicorn's util.write_error, answering JSON instead of an HTML page."""
    util.write_nonblock(sock, json_error(status_int, reason, f"{reason}: {mesg}" if mesg
                                         else reason))


class HeadLimits:
    """How much of a head gunicorn's parser takes, from its settings, as it counts them."""

    def __init__(self, cfg):
        line = cfg.limit_request_line
        self.line = MAX_REQUEST_LINE if line < 0 or line > MAX_REQUEST_LINE else line
        fields = cfg.limit_request_fields
        fields = MAX_HEADERS if fields <= 0 or fields > MAX_HEADERS else fields
        field_size = cfg.limit_request_field_size
        field_size = field_size if field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE
        # The parser's own cap on the header block, plus the request line before it.
        self.total = (self.line or MAX_REQUEST_LINE) + 2 + fields * (field_size + 2) + 4


class Head:
    """A request head as its pieces come, each byte looked at once (a client sending many
    small pieces must not make the worker rescan what came before): it tells when
    gunicorn's parser can answer without reading more, by that parser's rules."""

    def __init__(self, limits, data=b""):
        self.limits = limits
        self.data = bytearray()
        self.line_end = -1  # where the request line ends, once it does
        self.complete = False
        self.add(data)

    def add(self, piece):
        """Take piece; return whether the parser can now answer: a whole head, a bare LF
        (refused at once), or a request line already over its limit (414)."""
        seen = len(self.data)
        self.data += piece
        self.complete = self.complete or (self.data.find(b"\r\n\r\n", max(seen - 3, 0)) >= 0
                                          or self._bare_lf(seen) or self._line_too_long(seen))
        return self.complete

    def _bare_lf(self, seen):
        lf = self.data.find(b"\n", seen)
        while lf >= 0:
            if lf == 0 or self.data[lf - 1] != ord("\r"):
                return True
            lf = self.data.find(b"\n", lf + 1)
        return False

    def _line_too_long(self, seen):
        start = 2 if self.data.startswith(b"\r\n") else 0  # the parser skips one empty line
        if self.line_end < 0:
            self.line_end = self.data.find(b"\r\n", max(seen - 1, start))
        # As the parser measures it: a line not ended yet counts 2 bytes less.
        ended = self.line_end >= 0
        length = self.line_end - start if ended else len(self.data) - start - 2
        return length > self.limits.line > 0


class ImagestoreWorker(ThreadWorker):
    """gthread, with heads read in the main loop under a deadline and JSON error pages."""

    # Seconds a connection has to deliver a request head; gunicorn.conf.py sets it.
    head_timeout = 10.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_limits = HeadLimits(self.cfg)
        self.waiting_heads = deque()  # in order of deadline: each gets the same timeout
        self.lingering = deque()  # answered, closing: in order of deadline too
        self.head_bytes = 0  # held in the heads awaited
        self.in_threads = 0  # connections handed to the thread pool, not yet back

    def init_process(self):
        """Answer gunicorn's own errors as JSON in this process, then run."""
        # gunicorn has no setting or hook for its error page: Worker.handle_error picks
        # the status and message, then calls this one writer, so it is replaced here.
        util.write_error = write_json_error
        super().init_process()

    def reads_heads(self, conn):
        """Whether this worker reads conn's heads itself: plain HTTP/1, no TLS, no PROXY
        line, no HTTP/2 (those keep gunicorn's own way)."""
        return not (self.cfg.is_ssl or conn.is_http2 or self.cfg.proxy_protocol != "off"
                    or negotiation.prior_knowledge_allowed(self.cfg, conn.client))

    def enqueue_req(self, conn):
        """Give conn to a thread once its request head is complete; wait for it till then.

        Every path into the thread pool comes here: a new connection, a kept-alive one
        that became readable, and one whose next request was read ahead."""
        if not self.reads_heads(conn):
            self.to_thread(conn)
            return
        conn.init()  # plain HTTP/1: this only makes the parser, once
        head = Head(self.head_limits, conn.parser.unreader.take_buffered())
        if head.complete:
            conn.parser.unreader.unread(bytes(head.data))
            self.to_thread(conn)
        else:
            self.await_head(conn, head)

    def await_head(self, conn, head):
        """Let the poller collect conn's head, without a thread, until the deadline."""
        conn.sock.setblocking(False)
        conn.head = head
        self.head_bytes += len(head.data)
        conn.head_deadline = time.monotonic() + self.head_timeout
        self.waiting_heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_head_bytes, conn))

    def on_head_bytes(self, conn, _sock):
        """Take what arrived of conn's head; pass it on once the parser can answer it."""
        try:
            piece = conn.sock.recv(HEAD_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            piece = b""
        if not piece:  # the client went away
            self.drop_waiting(conn)
            return
        self.head_bytes += len(piece)
        if conn.head.add(piece):
            conn.parser.unreader.unread(self.stop_waiting(conn))
            self.to_thread(conn)
        elif len(conn.head.data) > self.head_limits.total:
            # The parser would refuse this too, but only after one more blocking read.
            self.log.warning("Invalid request from %s: request head too large", conn.client)
            self.drop_waiting(conn, (431, "Request Header Fields Too Large",
                                     "Error parsing headers: 'max buffer headers'"))
        elif self.head_bytes > HEAD_BYTES_BUDGET:
            self.log.warning("Unfinished request heads over %d bytes: dropping one from %s",
                             HEAD_BYTES_BUDGET, conn.client)
            self.drop_waiting(conn, (503, "Service Unavailable",
                                     "Too many unfinished request heads, try again later"))

    def stop_waiting(self, conn):
        """Take conn off the poller and the heads awaited; return what came of its head."""
        self.waiting_heads.remove(conn)
        data, conn.head = bytes(conn.head.data), None
        self.head_bytes -= len(data)
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.poller.unregister(conn.sock)
        return data

    def drop_waiting(self, conn, error=None):
        """Close a connection whose head is awaited, answering error first if given."""
        self.stop_waiting(conn)
        if error:
            self.answer_and_linger(conn, error)
        else:
            self.close(conn)

    def answer_and_linger(self, conn, error):
        """Write error, end the sending side, and drop what still comes until it ends."""
        try:
            write_json_error(conn.sock, *error)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.linger_deadline = time.monotonic() + LINGER_SECONDS
        self.lingering.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_linger_bytes, conn))

    def on_linger_bytes(self, conn, _sock):
        """Drop bytes of an answered connection; close it once the client has closed."""
        try:
            if conn.sock.recv(HEAD_READ_SIZE):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.end_linger(conn)

    def end_linger(self, conn):
        self.lingering.remove(conn)
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.poller.unregister(conn.sock)
        self.close(conn)

    def close(self, conn):
        """Close a connection no thread has, and free its slot."""
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        """gunicorn's expiry of deferred connections, then of heads past their deadline
        and of lingering answers."""
        super().murder_pending()
        now = time.monotonic()
        while self.waiting_heads and self.waiting_heads[0].head_deadline <= now:
            conn = self.waiting_heads[0]
            # Nothing at all came: closed quietly, as an idle kept-alive connection is.
            timeout = (408, "Request Timeout",
                       f"Request head not received within {self.head_timeout:g} s")
            self.drop_waiting(conn, timeout if conn.head.data else None)
        while self.lingering and self.lingering[0].linger_deadline <= now:
            self.end_linger(self.lingering[0])

    def _cap_keepalive(self, deadline):
        """A stopping worker closes kept-alive connections by deadline: heads awaited too."""
        super()._cap_keepalive(deadline)
        for conn in self.waiting_heads:
            conn.head_deadline = min(conn.head_deadline, deadline)

    def to_thread(self, conn):
        """Hand conn to the thread pool; stop accepting when no thread is left."""
        self.in_threads += 1
        super().enqueue_req(conn)
        self.update_accepting()

    def finish_request(self, conn, fs):
        """A thread is done with conn: gunicorn's bookkeeping, then accept again if room."""
        self.in_threads -= 1
        super().finish_request(conn, fs)
        self.update_accepting()

    def update_accepting(self):
        self.set_accept_enabled(self.nr_conns < self.worker_connections)

    def set_accept_enabled(self, enabled):
        """Accept only while alive and a thread is free, besides gunicorn's own limit: a
        connection this worker cannot serve at once is left to the others or the backlog
        instead of queueing here behind slow requests."""
        super().set_accept_enabled(enabled and self.alive
                                   and self.in_threads < self.cfg.threads)
