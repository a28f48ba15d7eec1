"""``python -m backdoorlab``: the same as the ``backdoorlab`` command."""

import sys

from .cli import main

sys.exit(main())
