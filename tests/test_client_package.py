"""The client is a package of its own (client/): pip builds it from the repository, it
declares the `imagestore` command and two dependencies, it imports nothing of the service
(not Flask), and its functions are short like the service's."""

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from client_fixtures import CLIENT
from test_function_length import MAX_LINES, long_functions

PACKAGE = CLIENT / "imagestore_client"
DEPENDENCIES = {"requests", "tqdm"}


def imported_modules(path):
    """The top-level names of the modules a file imports (relative imports aside)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_client_imports_only_the_standard_library_requests_and_tqdm():
    allowed = set(sys.stdlib_module_names) | DEPENDENCIES | {"imagestore_client"}
    for path in sorted(PACKAGE.glob("*.py")):
        assert imported_modules(path) <= allowed, path.name


def test_the_package_declares_the_command_and_loose_pins():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"imagestore": "imagestore_client.cli:main"}
    assert {requirement.split(">=")[0] for requirement in project["dependencies"]} == (
        DEPENDENCIES)
    assert all(">=" in requirement and "==" not in requirement
               for requirement in project["dependencies"])


def test_no_client_function_is_over_50_lines():
    too_long = [f"{path.name}: {name} ({lines} lines)" for path in sorted(PACKAGE.glob("*.py"))
                for name, lines in long_functions(path.read_text())]
    assert not too_long, f"over {MAX_LINES} lines: {', '.join(too_long)}"


@pytest.mark.slow  # pip and setuptools take seconds of CPU
def test_pip_builds_the_client_from_a_copy_of_the_repository(tmp_path):
    """What `pip install ./client` builds, without the network: a wheel with the command."""
    source = shutil.copytree(CLIENT, tmp_path / "client",
                             ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, timeout=300, capture_output=True)
    wheel, = (tmp_path / "dist").glob("imagestore_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        metadata = next(n for n in names if n.endswith("METADATA"))
        assert "imagestore = imagestore_client.cli:main" in archive.read(entry_points).decode()
        requires = [line for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    assert "imagestore_client/pull.py" in names
    assert sorted(requires) == ["Requires-Dist: requests>=2.28", "Requires-Dist: tqdm>=4.64"]
