"""``python -m calibration``: the same command as ``cascade-calibrate``."""

import sys

from calibration.cli import main

sys.exit(main())
