"""`python -m mountctl`: the command line (mountctl.cli)."""

from mountctl.cli import entry

entry()
