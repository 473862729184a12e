"""The application factory, and the preparation of an instance before it serves."""

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

import audit
import image_stats
import imports
import jobs
import webhooks
from api import bp
from cli import register_cli
from config import instance_folder, load_config
from errors import register_error_handlers
from json_provider import OrjsonProvider
from models import create_tables, db, keep_wal, open_database, upgrade_schema, use_wal
from queries import has_image_with_key
from recovery import recover
from storage import storage_from_url
from tus import bp as tus_bp
from tusuploads import sweep_expired
from ui import register_ui


def create_app(test_config=None, instance_path=None, prepare=True):
    """Build the app: settings, database, storage, routes, error handlers, CLI.

    With prepare (the default) it also prepares the instance (prepare_instance); gunicorn's
    workers pass prepare=False when their master has done that already (wsgi.py), and only
    clear up after a killed worker they may be replacing (recover_leftovers).
    """
    # static/ is the web UI's, served under /ui/static/ by its blueprint (ui.py), not at /static.
    app = Flask(__name__, instance_path=instance_folder(instance_path), static_folder=None)
    app.config.from_mapping(load_config(app.instance_path))
    app.config.update(test_config or {})
    # Werkzeug's own cap, for what it reads itself: a multipart form is parsed (spooled to
    # disk) before the upload code sees it, and a chunked one has no length to check first.
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_IMAGE_SIZE"]
    app.json = OrjsonProvider(app)
    app.json.sort_keys = False
    audit.configure(app.config["AUDIT_LOG"])

    open_database(app.config["DATABASE_URL"])
    app.extensions["storage"] = storage_from_url(
        app.config["STORAGE_URL"], app.config["STAGING_DIR"], app.config["S3_REDIRECT_DOWNLOADS"],
        app.config["UPLOAD_EXPIRY"])
    # Job kinds and settings only: the threads start in serving processes alone
    # (gunicorn.conf.py's post_worker_init), never in CLI commands or tests. Before the
    # preparation: an import it fails queues its `downloaded` webhook events.
    jobs.configure(app.config)
    webhooks.register_job(app.config)
    imports.register_job(app.extensions["storage"], app.config)
    if prepare:
        prepare_instance(app)
    else:
        recover_leftovers(app)
    keep_wal(db.obj)  # every serving process holds the WAL open: a full disk (models.py)

    # Peewee connects on the first query of a request; this hands it back after.
    @app.teardown_request
    def close_db(exc):
        if not db.is_closed():
            db.close()

    if app.config["TRUST_PROXY_HEADERS"]:
        # X-Forwarded-For too: the audit log's client address, not the proxy's.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)
    register_error_handlers(app)
    register_cli(app)
    app.register_blueprint(bp)
    app.register_blueprint(tus_bp)
    register_ui(app)
    return app


def prepare_instance(app):
    """Make app's instance ready to serve: once per start, before any worker serves.

    The SQLite file goes to WAL mode, a database of an earlier version is upgraded, missing
    tables and indexes are made, and what killed processes left (temporary files, half-done
    keys, imports that nothing will finish) is put right; the secret key was made
    by load_config. It is safe to repeat and to run in several processes at once, but it
    belongs before the workers: `flask --app app init-db` does it, which is the Procfile's
    release step and what gunicorn's master runs before it forks (on_starting in
    gunicorn.conf.py), and then the workers skip it. create_app runs it wherever no master
    did: tests, `flask run`, admin commands.
    """
    use_wal()
    upgrade_schema()  # a database of an earlier version first (models.py)
    create_tables()
    with db.connection_context():
        recover(app.extensions["storage"], has_image_with_key)
        sweep_expired(app.extensions["storage"])
        jobs.prune_failed()
        webhooks.prune_deliveries()
        # None left pending for ever (imports.py); their events need PUBLIC_URL.
        imports.recover_imports(base_url=app.config["PUBLIC_URL"])
        image_stats.recount()  # the totals /metrics shows, right again at every start


def recover_leftovers(app):
    """A worker's own pass at boot: put right what a killed worker it replaces left.

    At the first start it finds nothing (the master's preparation came first). It only
    reads the database, and a failure is logged, not fatal: one worker must not stop the
    service over it, and the next start or `flask --app app sweep` does the same work.
    """
    try:
        with db.connection_context():
            recover(app.extensions["storage"], has_image_with_key)
            sweep_expired(app.extensions["storage"])
    except Exception:  # logged with its traceback; the worker serves on
        app.logger.exception("recovery at worker start failed; the next start or "
                             "`flask --app app sweep` will do it")
