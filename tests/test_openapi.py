"""The OpenAPI document: well-formed, served without a token, and in step with the routes."""

import json
import re

from openapi_spec_validator import validate

from api import OPENAPI_PATH

METHODS = {"get", "head", "post", "put", "patch", "delete"}


def load_document():
    with open(OPENAPI_PATH) as f:
        return json.load(f)


def _shape(path):
    """A path with its parameters blanked: /images/<int:image_id> and /images/{id} agree."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def route_operations(app):
    """(path, method) of every route the app answers, without static files, OPTIONS and
    the HEAD that Flask adds to every GET (the document lists HEAD where the API promises it)."""
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods - {"OPTIONS", "HEAD"}:
            found.add((_shape(rule.rule), method.lower()))
    return found


def document_operations(document, methods=METHODS - {"head"}):
    return {(_shape(path), method) for path, item in document["paths"].items()
            for method in item if method in methods}


def test_document_is_valid_openapi_3_1():
    document = load_document()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_is_documented_and_every_documented_route_exists(app):
    routes = route_operations(app)
    documented = document_operations(load_document())
    assert routes - documented == set(), "routes missing from openapi.json"
    assert documented - routes == set(), "openapi.json describes routes the app lacks"


def test_documented_head_operations_exist(app):
    """HEAD is documented only where the app answers it: a GET (Flask adds HEAD to each),
    or a HEAD route of its own (tus' HEAD /uploads/:id)."""
    answered = {_shape(rule.rule) for rule in app.url_map.iter_rules() if "HEAD" in rule.methods}
    heads = {path for path, _ in document_operations(load_document(), {"head"})}
    assert heads and heads <= answered


def test_a_new_undocumented_route_is_caught(app):
    """The comparison above really sees a route the document lacks."""
    app.add_url_rule("/images/<int:image_id>/tags", "tags", lambda image_id: "",
                     methods=["PUT"])
    missing = route_operations(app) - document_operations(load_document())
    assert missing == {("/images/{}/tags", "put")}


def test_document_is_served_without_a_token(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.json == load_document()


def _statuses(document, path, method):
    return set(document["paths"][path][method]["responses"])


def test_error_statuses_of_the_contract_are_documented():
    document = load_document()
    assert {"201", "400", "401", "403", "411", "413", "415", "500", "507"} <= _statuses(
        document, "/images", "post")
    assert {"200", "206", "302", "304", "401", "403", "404", "406", "416"} <= _statuses(
        document, "/images/{id}", "get")
    assert {"200", "503"} <= _statuses(document, "/healthz", "get")
    assert {"204", "404"} <= _statuses(document, "/images/{id}", "delete")
    assert {"MethodNotAllowed", "NotFound"} <= set(document["components"]["responses"])


def test_operations_need_the_scopes_of_the_contract():
    paths = load_document()["paths"]
    scopes = {(path, method): op.get("security") for path, item in paths.items()
              for method, op in item.items()}
    assert scopes[("/images", "get")] == [{"bearer": ["image:read"]}]
    assert scopes[("/images", "post")] == [{"bearer": ["image:write"]}]
    assert scopes[("/images/{id}", "delete")] == [{"bearer": ["image:delete"]}]
    assert scopes[("/images/{id}/links", "post")] == [{"bearer": ["image:read"]}]
    for open_path in ("/healthz", "/openapi.json", "/links/{token}/{filename}"):
        assert scopes[(open_path, "get")] == []
