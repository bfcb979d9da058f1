"""``python -m samedge.cli``: the same as the ``samedge`` command."""

import sys

from samedge.cli import main

sys.exit(main())
