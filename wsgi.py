"""The WSGI entry point for gunicorn: `gunicorn wsgi:app`."""

from app import create_app
from config import prepared_by_master
from qcow2 import require_qemu_img

# Refuse to start on a qemu-img that the upload checks cannot rely on.
require_qemu_img()
# Workers of a master that prepared the instance leave that alone; without one (gunicorn
# run with another config, another server) each worker prepares it for itself.
app = create_app(prepare=not prepared_by_master())
