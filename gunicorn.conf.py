"""gunicorn settings, read from the environment as Heroku sets it."""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threaded workers keep sending heartbeats while a thread moves a long upload or
# download, so a slow client is neither killed by the timeout nor blocks the worker.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# Only a worker that stops answering its heartbeat for this long is restarted.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5
accesslog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn 27's control socket has one default path per user; several instances on
# one machine (tests, or two services side by side) would take it from each other.
control_socket_disable = True
