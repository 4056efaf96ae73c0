"""``python -m vaestream.cli``."""

import sys

from vaestream.cli import main

sys.exit(main())
