"""What can go wrong, each kind with the exit code a shell script can test for."""

import http

OK = 0
REFUSED = 1  # the server answered with an error status (other than 404/410)
USAGE = 2  # bad arguments or configuration (argparse uses 2 as well)
NETWORK = 3  # the server could not be reached, the connection broke, or a local file failed
NOT_FOUND = 4  # no such image (or name), or the server answered 404/410
INTEGRITY = 5  # what was downloaded does not match the image's sha256
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class ClientError(Exception):
    """An error to report in one line and exit with exit_code."""

    exit_code = REFUSED


class UsageError(ClientError):
    exit_code = USAGE


class NetworkError(ClientError):
    exit_code = NETWORK


class NotFoundError(ClientError):
    exit_code = NOT_FOUND


class IntegrityError(ClientError):
    exit_code = INTEGRITY


def server_message(body):
    """The server's error body as one line: its message, or each field with its messages."""
    if isinstance(body, dict):
        if isinstance(body.get("message"), str):
            return body["message"]
        return "; ".join(f"{field}: {' '.join(map(str, messages))}"
                         if isinstance(messages, list) else f"{field}: {messages}"
                         for field, messages in body.items())
    return ""


def reason_phrase(status, reason=""):
    """The standard phrase of a status (the server's own for ones Python does not know)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return {460: "Checksum Mismatch"}.get(status, reason or "")


class ServerError(ClientError):
    """An error answer: `404 Not Found: <the server's message>`."""

    def __init__(self, status, body=None, reason=""):
        self.status = status
        phrase = reason_phrase(status, reason)
        message = server_message(body)
        text = f"{status} {phrase}".strip()
        if message and message != phrase:
            text = f"{text}: {message}"
        super().__init__(text)
        if status in (404, 410):
            self.exit_code = NOT_FOUND
