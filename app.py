"""The application factory."""

import os

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from api import bp
from cli import register_cli
from config import load_config
from errors import register_error_handlers
from json_provider import OrjsonProvider
from models import create_tables, db, open_database
from queries import has_image_with_key
from recovery import recover
from storage import storage_from_url


def create_app(test_config=None, instance_path=None):
    """Build the app: settings, database, storage, routes, error handlers, CLI."""
    app = Flask(__name__, instance_path=instance_path or os.environ.get("IMAGESTORE_INSTANCE"))
    app.config.from_mapping(load_config(app.instance_path))
    app.config.update(test_config or {})
    # Werkzeug's own cap, for what it reads itself: a multipart form is parsed (spooled to
    # disk) before the upload code sees it, and a chunked one has no length to check first.
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_IMAGE_SIZE"]
    app.json = OrjsonProvider(app)
    app.json.sort_keys = False

    open_database(app.config["DATABASE_URL"])
    create_tables()
    store = storage_from_url(app.config["STORAGE_URL"], app.config["STAGING_DIR"],
                             app.config["S3_REDIRECT_DOWNLOADS"])
    with db.connection_context():
        # what a killed worker left: temporary files, half-done keys
        recover(store, has_image_with_key)
    app.extensions["storage"] = store

    # Peewee connects on the first query of a request; this hands it back after.
    @app.teardown_request
    def close_db(exc):
        if not db.is_closed():
            db.close()

    if app.config["TRUST_PROXY_HEADERS"]:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)
    register_error_handlers(app)
    register_cli(app)
    app.register_blueprint(bp)
    return app
