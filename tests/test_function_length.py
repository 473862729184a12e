"""No function of the service is over 50 lines: a longer one does more than one thing."""

import ast

from conftest import ROOT

MAX_LINES = 50


def long_functions(source, limit=MAX_LINES):
    """(qualified name, lines) of each function in source longer than limit lines, counted
    from its `def` to its last line (decorators aside, docstring and comments in)."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}."
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append((name[:-1], lines))
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def service_modules():
    """The service's modules: the top-level .py files (tests/, bench/, reliability/ aside)."""
    return sorted(ROOT.glob("*.py"))


def test_no_service_function_is_over_50_lines():
    too_long = [f"{path.name}: {name} ({lines} lines)"
                for path in service_modules() for name, lines in long_functions(path.read_text())]
    assert not too_long, f"over {MAX_LINES} lines: {', '.join(too_long)}"


def function(name, lines, indent=""):
    """The source of a function of exactly `lines` lines."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}():\n{body}"


def test_the_check_names_each_function_over_the_limit():
    source = (function("short", MAX_LINES) + "class Store:\n"
              + function("put", MAX_LINES + 1, indent="    ")
              + "def outer():\n" + function("inner", MAX_LINES + 1, indent="    "))
    assert long_functions(source) == [("Store.put", 51), ("outer", 52), ("outer.inner", 51)]


def test_the_service_modules_include_the_split_of_images():
    names = {path.stem for path in service_modules()}
    assert {"api", "access", "queries", "image_changes", "recovery", "representations",
            "urls"} <= names
