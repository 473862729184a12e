"""The storage interface: every backend has its shape, the registry loads a backend only for
its scheme, and no module imports another that imports it back."""

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

from storage import Storage, storage_from_url


def top_level_imports(path, modules):
    """The project's top-level modules that the file at path imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in modules)
    return found


def import_cycle(graph):
    """One loop of imports in graph (module -> modules it imports) as a list, or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        path.append(module)
        cycle = next(filter(None, map(visit, sorted(graph[module]))), None)
        path.pop()
        done.add(module)
        return cycle

    return next(filter(None, map(visit, sorted(graph))), None)


def test_no_top_level_module_imports_itself_back():
    """An import inside a function counts too: a lazy import is still a loop of modules."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    graph = {name: top_level_imports(path, files) - {name} for name, path in files.items()}
    assert {"access", "queries", "image_changes", "recovery", "representations"} <= set(graph)
    assert import_cycle(graph) is None


def test_recovery_knows_the_store_and_no_model():
    """What recovery needs of the rows is handed to it, so it imports storage.py alone."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    assert top_level_imports(files["recovery"], files) == {"storage"}


def test_the_registry_imports_a_backend_only_for_its_scheme(tmp_path):
    code = ("import sys, storage, errors\n"
            "assert not {'localstore', 's3storage', 'boto3'} & set(sys.modules)\n"
            f"store = storage.storage_from_url('file://{tmp_path / 'images'}')\n"
            "assert 'localstore' in sys.modules\n"
            "assert not {'s3storage', 'boto3'} & set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://host/images", "unsupported STORAGE_URL scheme 'ftp' (use file:// or s3://)"),
    ("s3:///images", "STORAGE_URL s3:// needs a bucket: s3://bucket/prefix"),
])
def test_a_bad_storage_url_is_refused_by_name(url, message):
    with pytest.raises(ValueError) as refused:
        storage_from_url(url)
    assert str(refused.value) == message


def test_the_local_backend_is_a_storage(app):
    assert isinstance(app.extensions["storage"], Storage)


def test_the_s3_backend_is_a_storage(s3_app):
    assert isinstance(s3_app.extensions["storage"], Storage)


def test_a_backend_lacking_a_method_is_no_storage(app):
    """The check above would notice a backend that drops part of the interface."""
    store = app.extensions["storage"]
    shape = type("Partial", (), {name: getattr(store, name) for name in dir(store)
                                 if name != "download_url" and not name.startswith("__")})
    assert not isinstance(shape(), Storage)
