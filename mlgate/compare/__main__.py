"""``python -m mlgate.compare``."""

import sys

from mlgate.compare import main

sys.exit(main())
