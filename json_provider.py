"""JSON answers encoded by orjson, with the bytes that Flask's own provider writes.

A list page's 25 image objects cost Flask's encoder (the standard json module) about
0.2 ms, a tenth of the request's CPU; orjson takes a tenth of that (docs/benchmarks.md,
"The list page"). Flask's provider writes compact ASCII. Where orjson would write other
bytes (non-ASCII text as UTF-8, DEL unescaped) or cannot encode a value (an integer past
64 bits, a key that is not a string, a lone surrogate, a type it leaves to `default`),
the answer goes to Flask's provider instead. Floats are the one difference left: orjson
writes 1e-05 as 0.00001 and NaN as null; the API sends no floats.
"""

import orjson
from flask.json.provider import DefaultJSONProvider

# Dates, dataclasses and subclasses of str, int, dict or list go to Flask's `default`, as
# in the json module (orjson would write dates in ISO 8601, not as HTTP dates); a type
# that `default` refuses ends the attempt. The newline ends the body as in Flask's own.
ORJSON_OPTIONS = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
                  | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_APPEND_NEWLINE)


class OrjsonProvider(DefaultJSONProvider):
    """Flask's default provider, with compact responses encoded by orjson."""

    def response(self, *args, **kwargs):
        """The response DefaultJSONProvider.response makes, orjson-encoded where that
        gives the same bytes (its indented and sorted forms are left to it)."""
        indented = self.compact is False or (self.compact is None and self._app.debug)
        if indented or self.sort_keys or not self.ensure_ascii:
            return super().response(*args, **kwargs)
        body = self.orjson_body(self._prepare_response_obj(args, kwargs))
        if body is None:
            return super().response(*args, **kwargs)
        return self._app.response_class(body, mimetype=self.mimetype)

    def orjson_body(self, obj):
        """obj encoded by orjson, or None where json.dumps would write other bytes."""
        try:
            body = orjson.dumps(obj, default=self.default, option=ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            return None
        if not body.isascii() or b"\x7f" in body:
            return None
        return body
