"""The WSGI entry point for gunicorn: `gunicorn wsgi:app`."""

from app import create_app
from qcow2 import require_qemu_img

# Refuse to start on a qemu-img that the upload checks cannot rely on.
require_qemu_img()
app = create_app()
