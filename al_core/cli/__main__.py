"""``python -m al_core.cli``: the ``slideloop`` command line; exits with its status."""

import sys

from al_core.cli import main

sys.exit(main())
