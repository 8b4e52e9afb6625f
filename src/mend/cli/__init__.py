"""The `mend` command: `commands.py` runs each command, `parser.py` holds their flags."""

from mend.cli.commands import main

__all__ = ["main"]
