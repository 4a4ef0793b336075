"""``python -m jpeft`` runs the ``jpeft`` command."""

import sys

from jpeft.cli import main

sys.exit(main())
