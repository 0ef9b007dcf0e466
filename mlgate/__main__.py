"""``python -m mlgate`` = the ``mlgate`` console script."""

import sys

from mlgate.cli import main

sys.exit(main())
