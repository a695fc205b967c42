"""``python -m fusedlayers``: the same command line as ``fusedlayers``."""

import sys

from .cli import main

sys.exit(main())
