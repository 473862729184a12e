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


def _execute(build, shape, values):
    """The compiled query and the cursor of a run with values bound to its slots."""
    query, sql, params, datetimes = _compiled(build, type(db.obj), tuple(shape))
    bound = [values[p.name] if isinstance(p, _Slot) else p for p in params]
    return query, db.execute_sql(sql, bound), datetimes


def rows(build, values, shape=()):
    """The rows of build(*shape) as lists of plain values, without model objects; datetime
    columns read as their fields read them (SQLite keeps them as text)."""
    _, cursor, datetimes = _execute(build, shape, values)
    result = []
    for row in cursor.fetchall():
        row_values = list(row)
        for i, read in datetimes:
            row_values[i] = read(row_values[i])
        result.append(row_values)
    return result


def models(build, values, shape=()):
    """The model objects of build(*shape), joined ones included, as peewee makes them."""
    query, cursor, _ = _execute(build, shape, values)
    return list(query._get_cursor_wrapper(cursor))
