"""imagestore's own WSGI app plus one trivial JSON route: the reference for the list page.

The benchmark serves this module instead of `wsgi:app`, under the same gunicorn.conf.py, so
the trivial route pays exactly what every route pays (gunicorn, Flask, the access log) and
nothing else; the difference to the list page is the cost of the list page itself.
"""

from flask import jsonify

from wsgi import app


@app.get("/_bench/trivial")
def trivial():
    """The cheapest JSON answer the app can give: no token, no database."""
    return jsonify(ok=True)
