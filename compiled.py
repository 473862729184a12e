"""Queries compiled to SQL once, run many times with new values.

peewee compiles a query to SQL anew each time it runs: for the list page and the token
check that was most of their CPU, far more than SQLite's own work (docs/benchmarks.md,
"The list page"). A query here is built by a function of its shape alone, with slot()
for every value that changes from one run to the next; its SQL is compiled once per kind
of database and shape, and each run binds the values by slot name.
"""

import functools

from peewee import DateTimeField, Value

from models import db


class _Slot:
    """A placeholder compiled into the SQL's parameters, filled in by name at each run."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


def slot(name):
    """A query value bound at each run (converter=False: the slot itself is the parameter,
    so the value must be as the database takes it: an id, not a model)."""
    return Value(_Slot(name), converter=False)


@functools.lru_cache(maxsize=256)
def _compiled(build, database_kind, shape):
    """build(*shape) with its SQL, its parameters (slots and constants) and the readers of
    its datetime columns by position. database_kind keys the cache: SQLite's SQL is not
    PostgreSQL's (placeholders, quoting), and the tests run both in one process."""
    query = build(*shape)
    sql, params = query.sql()
    datetimes = tuple((i, column.python_value) for i, column in enumerate(query._returning)
                      if isinstance(column, DateTimeField))
    return query, sql, tuple(params), datetimes


@functools.lru_cache(maxsize=64)
def _model_columns(build, database_kind, shape):
    """(model, field name) of each column of build(*shape), which selects whole models."""
    query = _compiled(build, database_kind, shape)[0]
    return tuple((column.model, column.name) for column in query._returning)


def _execute(build, shape, values):
    """The compiled query and the cursor of a run with values bound to its slots."""
    query, sql, params, datetimes = _compiled(build, type(db.obj), tuple(shape))
    bound = [values[p.name] if isinstance(p, _Slot) else p for p in params]
    return query, db.execute_sql(sql, bound), datetimes


def rows(build, values, shape=(), stored_datetimes=False):
    """The rows of build(*shape) as sequences of plain values, without model objects;
    datetime columns read as their fields read them (SQLite keeps them as text), or, with
    stored_datetimes, as the database hands them, for a reader that takes both
    (representations.rfc3339): parsing them was a tenth of a list page's CPU."""
    _, cursor, datetimes = _execute(build, shape, values)
    if stored_datetimes or not datetimes:
        return cursor.fetchall()
    return _read_datetimes(cursor.fetchall(), datetimes)


def _read_datetimes(found, datetimes):
    """found's rows as lists, their datetime columns read by their fields."""
    result = []
    for row in found:
        row_values = list(row)
        for i, read in datetimes:
            row_values[i] = read(row_values[i])
        result.append(row_values)
    return result


def models(build, values, shape=()):
    """The model objects of build(*shape), which selects whole models: one of its first
    model a row, each joined model set on the foreign key that refers to it.

    Made here from the plain rows: peewee's own reader sets itself up again at every run,
    which took more of the token check's time than the query (docs/benchmarks.md).
    """
    query, cursor, datetimes = _execute(build, shape, values)
    columns = _model_columns(build, type(db.obj), tuple(shape))
    found = []
    for row in _read_datetimes(cursor.fetchall(), datetimes):
        fields = {}
        for (model, name), value in zip(columns, row, strict=True):
            fields.setdefault(model, {})[name] = value
        objects = {model: _loaded(model, data) for model, data in fields.items()}
        first = objects[query.model]
        for foreign_key, model in query.model._meta.refs.items():
            if model in objects:
                setattr(first, foreign_key.name, objects[model])
        first._dirty.clear()
        found.append(first)
    return found


def _loaded(model, data):
    """A model object of a row's values, as peewee makes one (nothing marked changed)."""
    instance = model(__no_default__=True, **data)
    instance._dirty.clear()
    return instance
