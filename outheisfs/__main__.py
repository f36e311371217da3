"""`python -m outheisfs` is the `outheisfs` command."""

import sys

from .cli import main

sys.exit(main())
