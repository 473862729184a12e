#!/usr/bin/env python3
"""What counting a quota's use costs on a store of 100k images (docs/api.md, "Quotas").

    .venv/bin/python bench/quota_usage.py [--images 100000] [DATABASE_URL]

Makes the images in a fresh SQLite file (or in a fresh schema of the PostgreSQL at
DATABASE_URL, dropped at the end), all of one user, half of them in a root namespace and its
ten children, then times quotas.usage() for the user's quota and the root's: the median of
21 runs (and the least), with the indexes that quotas.py counts from, and again without them.
"""

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from db_fixtures import with_search_path  # noqa: E402

from models import Image, Quota, User, create_tables, db, open_database  # noqa: E402
from namespaces import ensure_namespace  # noqa: E402
from quotas import usage  # noqa: E402

RUNS = 21
COUNTING_INDEXES = ("image_user_id_size", "image_namespace_id_size")


def fill(count):
    """count images of one user, half in the tree of the root 'team'; its two quotas."""
    alice = User.create(username="alice", email="alice@example.com")
    children = [ensure_namespace(alice, ("team", f"c{i}")) for i in range(10)]
    rows = [{"author": alice, "user": alice, "name": f"i{i}", "storage_key": f"k{i}",
             "size": 1000 + i, "virtual_size": 1, "sha256": "0" * 64,
             "namespace": children[i % 10] if i % 2 else None} for i in range(count)]
    with db.atomic():
        for start in range(0, count, 1000):
            Image.insert_many(rows[start:start + 1000]).execute()
    return (Quota.create(user=alice, max_bytes=1 << 40),
            Quota.create(namespace=children[0].root_id, max_images=1 << 30))


def timing(quota):
    """The median and the least time of usage(quota), in ms, after one warm-up run (on a
    busy machine the least is nearer what it costs on an idle one)."""
    usage(quota)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        usage(quota)
        times.append(time.perf_counter() - start)
    return f"{statistics.median(times) * 1000:.1f} ms (least {min(times) * 1000:.1f})"


def measure(quotas):
    """The times for each quota, as text."""
    return ", ".join(f"{kind} {timing(q)}" for kind, q in zip(("user", "namespace"), quotas,
                                                              strict=True))


def run(url, count):
    open_database(url)
    create_tables()
    with db.connection_context():
        quotas = fill(count)
        # Statistics, and on PostgreSQL the visibility map that index-only scans need (as
        # autovacuum keeps them on a live database).
        db.execute_sql("ANALYZE" if url.startswith("sqlite") else "VACUUM ANALYZE image")
        print(f"{count} images, with the counting indexes: {measure(quotas)}")
        for name in COUNTING_INDEXES:
            db.execute_sql(f'DROP INDEX "{name}"')
        print(f"{count} images, without them:          {measure(quotas)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url", nargs="?")
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()
    if args.database_url:
        schema = f"quota_bench_{secrets.token_hex(3)}"
        admin = open_database(args.database_url)
        admin.execute_sql(f"CREATE SCHEMA {schema}")
        try:
            run(with_search_path(args.database_url, schema), args.images)
        finally:
            open_database(args.database_url).execute_sql(f"DROP SCHEMA {schema} CASCADE")
        return
    with tempfile.TemporaryDirectory() as folder:
        run(f"sqlite:///{os.path.join(folder, 'bench.sqlite3')}", args.images)


if __name__ == "__main__":
    main()
