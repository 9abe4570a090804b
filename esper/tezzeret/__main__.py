"""`python -m esper.tezzeret`: the compile Job's entrypoint (see esper.tezzeret.entrypoint)."""

import sys

from esper.tezzeret.entrypoint import main

sys.exit(main())
