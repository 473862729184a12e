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
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# A worker accepts only as many connections as it has threads: a connection it cannot
# serve at once is left to the other workers (or the listen backlog) instead of queueing
# inside this worker behind slow bodies. reliability/run.py's slow scenario shows it.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", str(threads)))
# Only a worker that stops answering its heartbeat for this long is restarted.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
# A kept-alive idle connection takes a slot beyond the threads; with none to spare (the
# default) every answer closes its connection, which costs a loopback or LAN client little.
keepalive = 5 if worker_connections > threads else 0
accesslog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn 27's control socket has one default path per user; several instances on
# one machine (tests, or two services side by side) would take it from each other.
control_socket_disable = True
