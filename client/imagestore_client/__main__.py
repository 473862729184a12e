"""`python -m imagestore_client` runs the `imagestore` command."""

import sys

from imagestore_client.cli import main

sys.exit(main())
