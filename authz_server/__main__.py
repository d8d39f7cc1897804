"""``python -m authz_server``: the same as the ``authz-server`` command."""

import sys

from authz_server.cli import main

sys.exit(main())
