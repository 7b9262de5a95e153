"""`python -m mountd` is the `mountd` command."""

import sys

from mountd.cli import main

sys.exit(main())
