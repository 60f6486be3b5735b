"""`python -m mountctl`: the command line (mountctl.cli)."""

import sys

from mountctl.cli import main

sys.exit(main())
