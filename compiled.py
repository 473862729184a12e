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
    datetimes = tuple((i, column.python_value)
                      for i, column in enumerate(query._returning or ())  # none: a write
                      if isinstance(column, DateTimeField))
    return query, sql, tuple(params), datetimes


@functools.lru_cache(maxsize=64)
def _sources(build, database_kind, shape):
    """What build(*shape), which selects whole models or aliases of them, selects: for each,
    in the order selected, (its model class, its primary key's name, [(column index, field
    name)])."""
    query = _compiled(build, database_kind, shape)[0]
    grouped = {}  # by id(): peewee's == on an alias builds an expression, not a comparison
    for i, column in enumerate(query._returning):
        source = getattr(column, "source", column.model)  # a field of an alias: the alias
        grouped.setdefault(id(source), (column.model, []))[1].append((i, column.name))
    return tuple((model, model._meta.primary_key.name, columns)
                 for model, columns in grouped.values())


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


def changed(build, values, shape=()):
    """Run build(*shape), an UPDATE or DELETE, with values bound; how many rows it changed."""
    return _execute(build, shape, values)[1].rowcount


def _read_datetimes(found, datetimes):
    """found's rows as lists, their datetime columns read by their fields."""
    result = []
    for row in found:
        row_values = list(row)
        for i, read in datetimes:
            row_values[i] = read(row_values[i])
        result.append(row_values)
    return result


def graph(build, values, paths, shape=()):
    """The model objects of build(*shape), which selects whole models or aliases: one a
    row, of the first selected, with each other set at its path in paths (one a source, in
    the order selected; "" the first, "namespace.user" the user of its namespace). A source
    that an outer join left empty is not set.

    Made here from the plain rows: peewee's own reader sets itself up again at every run,
    which (with the compiling) took find_image 900 µs against SQLite's 11 (docs/benchmarks.md).
    """
    _, cursor, datetimes = _execute(build, shape, values)
    sources = _sources(build, type(db.obj), tuple(shape))
    found = []
    for row in _read_datetimes(cursor.fetchall(), datetimes):
        made = {}
        for path, (model, key, columns) in zip(paths, sources, strict=True):
            data = {name: row[i] for i, name in columns}
            if data[key] is None:  # no row on this side of an outer join
                continue
            made[path] = _loaded(model, data)
            if path:
                owner_path, _, attr = path.rpartition(".")
                owner = made.get(owner_path)
                if owner is not None:
                    setattr(owner, attr, made[path])
                    owner._dirty.clear()
        found.append(made[""])
    return found


def _loaded(model, data):
    """A model object of a row's values, as peewee makes one (nothing marked changed)."""
    instance = model(__no_default__=True, **data)
    instance._dirty.clear()
    return instance
