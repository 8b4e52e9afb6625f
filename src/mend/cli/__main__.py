"""`python -m mend.cli ...`: the `mend` command."""

import sys

from mend.cli import main

sys.exit(main())
