"""``python -m sarl.cli``: the ``sarl`` command."""

import sys

from . import main

sys.exit(main())
