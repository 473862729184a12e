"""Bearer tokens with Djinn-style scopes: issuing, hashing, and checking them on a request."""

import functools
import hashlib
import hmac
import secrets

from flask import g, request

import audit
import compiled
from compiled import slot
from errors import ApiError, unauthorized
from models import Token, User

RESOURCES = {"image": ("read", "write", "delete")}
TOKEN_PREFIX = "ims_"


def parse_scopes(text):
    """Read 'image:read,write,delete' or 'image:read image:write' into {'image:read', ...}."""
    scopes = set()
    for item in (text or "").replace(";", " ").split():
        resource, _, perms = item.partition(":")
        allowed = RESOURCES.get(resource)
        if allowed is None or not perms:
            raise ValueError(f"unknown scope {item!r}; use e.g. image:read,write,delete")
        for perm in perms.split(","):
            if perm not in allowed:
                raise ValueError(f"unknown permission {perm!r} in {item!r}")
            scopes.add(f"{resource}:{perm}")
    if not scopes:
        raise ValueError("no scope given; use e.g. image:read,write,delete")
    return frozenset(scopes)


def format_scopes(scopes):
    """Write scopes back in Djinn's compact form, e.g. 'image:read,write'."""
    by_resource = {}
    for scope in sorted(scopes):
        resource, _, perm = scope.partition(":")
        by_resource.setdefault(resource, []).append(perm)
    return " ".join(
        f"{res}:{','.join(p for p in RESOURCES[res] if p in perms)}"
        for res, perms in by_resource.items()
    )


def hash_token(token):
    """Tokens are long random strings, so one round of SHA-256 is enough to keep them secret."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(user, scopes, name=""):
    """Make a token for user; return the secret, which is shown once and never stored."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    Token.create(user=user, name=name, token_hash=hash_token(secret), scopes=format_scopes(scopes))
    return secret


def _token_query():
    """The token whose hash is in slot "hash", with its user; compiled once (compiled.py):
    compiling it anew took most of the check's time."""
    return Token.select(Token, User).join(User).where(Token.token_hash == slot("hash")).limit(1)


def authenticate(credentials):
    """Find the token of a request's parsed Authorization header, with its user, in one query.

    credentials is Werkzeug's request.authorization: None without a header, else its
    scheme (lowercased) in .type and a bearer token in .token, stripped.
    """
    if credentials is None or credentials.type != "bearer" or credentials.token == "":
        raise unauthorized()
    # No .token: Werkzeug read the value as parameters (an "=" inside it), which no token
    # of ours has.
    found = credentials.token and compiled.graph(
        _token_query, {"hash": hash_token(credentials.token)}, ("", "user"))
    token = found[0] if found else None
    if token is None:
        raise unauthorized("Invalid token")
    return token


def bearer_matches(header, secret):
    """Whether an Authorization header is `Bearer <secret>`, compared in constant time."""
    scheme, _, value = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              secret.encode())


def who(token=None):
    """The audit fields of who makes this request: user, token id and client address."""
    token = token or g.get("token")
    return {"user": token and token.user, "token_id": token and token.id,
            "client": request.remote_addr}


def audit_failure(status, reason, token=None):
    """An audit line for a refused credential (never the credential itself)."""
    rule = request.url_rule
    audit.record("auth.failure", status=status, reason=reason, method=request.method,
                 route=rule and rule.rule, **who(token))


def require_scope(scope, anonymous=False):
    """Decorate a view so that it runs only for a token holding scope; sets g.user and
    g.token.

    anonymous: a request without an Authorization header runs too, with g.user None, and
    the view's rules (access.py) decide what it may read. A header that is sent is checked
    as on every route, so that a client's bad token is not hidden behind public access.
    """

    def decorator(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            if anonymous and "Authorization" not in request.headers:
                g.user = None
                return view(*args, **kwargs)
            try:
                token = authenticate(request.authorization)
            except ApiError as error:
                audit_failure(error.status, error.message)
                raise
            if scope not in parse_scopes(token.scopes):
                error = ApiError(
                    403,
                    f"Token lacks the {scope} scope",
                    {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
                )
                audit_failure(error.status, error.message, token)
                raise error
            g.user, g.token = token.user, token
            return view(*args, **kwargs)

        return wrapped

    return decorator
