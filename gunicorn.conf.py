"""gunicorn settings, read from the environment as Heroku sets it."""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threaded workers keep sending heartbeats while a thread moves a long upload or
# download, so a slow client is neither killed by the timeout nor blocks the worker.
worker_class = "gthread"
# Each upload or download holds a thread for its whole transfer, so a worker has many;
# they wait on sockets, not on the CPU. 50 clients sending a few bytes a second hold 50
# threads until BODY_READ_TIMEOUT (the app's) cuts them off.
threads = int(os.environ.get("GUNICORN_THREADS", "64"))
# A worker accepts at most this many connections: its threads, plus room for idle
# kept-alive ones (gunicorn keeps a connection alive only while it has such room). A
# connection it cannot serve at once is left to the other workers or the listen backlog
# instead of queueing inside this worker behind slow bodies (reliability/run.py, slow).
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", str(threads + 16)))
# Only a worker that stops answering its heartbeat for this long is restarted.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
# Seconds an idle connection is kept for the client's next request; it holds a slot but
# no thread meanwhile. QEMU reading a signed link opens a new connection when it finds
# its idle one closed. qemu-img's hangs over HTTP come from QEMU itself, not from this
# close, and were the same with 0, 5 and 75 here (docs/downloads.md).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
accesslog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn 27's control socket has one default path per user; several instances on
# one machine (tests, or two services side by side) would take it from each other.
control_socket_disable = True
