"""The app's JSON answers are orjson's bytes only where those are Flask's own provider's."""

import dataclasses
import enum
import uuid
from datetime import date, datetime
from decimal import Decimal

import pytest
from flask.json.provider import DefaultJSONProvider
from markupsafe import Markup

from json_provider import OrjsonProvider


@dataclasses.dataclass
class Point:
    x: int
    label: str


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


VALUES = [
    {"b": 1, "a": [None, True, False, 0, -1, (2, 3)], "": {}},
    "plain ASCII with / and <script> & 'quotes' \"double\" \\ back",
    "control \x00 \x1f \b \f \n \r \t and DEL \x7f",
    "non-ASCII é ✓ \u2028 \U0001f600",
    "lone surrogate \ud800",
    2**63 - 1, -(2**63), 2**64, 10**30,
    {1: "int key"}, {None: "none key"},
    datetime(2024, 1, 2, 3, 4, 5), date(2024, 1, 2),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), Decimal("1.50"),
    Point(1, "p"), Markup("<b>bold</b>"), Colour.RED, Name("sub"), [Name("in a list")],
]


@pytest.fixture
def providers(app):
    """The app's provider and Flask's own, set up alike (compact, keys in order)."""
    flask_own = DefaultJSONProvider(app)
    flask_own.sort_keys = app.json.sort_keys
    return app.json, flask_own


def test_the_app_uses_the_orjson_provider_with_keys_in_order(app):
    assert isinstance(app.json, OrjsonProvider)
    assert app.json.sort_keys is False


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_answer_bytes_are_flasks_own(app, providers, value):
    ours, flask_own = providers
    with app.app_context():
        assert ours.response(value).get_data() == flask_own.response(value).get_data()


def test_list_of_image_like_objects_is_encoded_by_orjson(app, providers):
    ours, flask_own = providers
    body = [{"id": n, "name": f"img{n}", "namespace": None, "user": {"id": 1}}
            for n in range(25)]
    assert ours.orjson_body(body) is not None
    with app.app_context():
        assert ours.response(body).get_data() == flask_own.response(body).get_data()


@pytest.mark.parametrize("setting", ["sort_keys", "indent", "ascii"])
def test_sorted_indented_or_unicode_answers_are_flasks_own(app, providers, setting):
    ours, flask_own = providers
    for provider in providers:
        if setting == "sort_keys":
            provider.sort_keys = True
        elif setting == "indent":
            provider.compact = False
        else:
            provider.ensure_ascii = False
    value = {"b": "é", "a": [1, 2]}
    with app.app_context():
        assert ours.response(value).get_data() == flask_own.response(value).get_data()


def test_keyword_and_several_arguments_as_in_flask(app, providers):
    ours, flask_own = providers
    with app.app_context():
        assert ours.response(1, "two").get_data() == flask_own.response(1, "two").get_data()
        assert ours.response(b=1, a=2).get_data() == flask_own.response(b=1, a=2).get_data()
        assert ours.response().get_data() == flask_own.response().get_data()
        assert ours.response().mimetype == "application/json"
