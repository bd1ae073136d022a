"""`python -m retinaops.cli`: the same as the `retinaops` command."""

import sys

from retinaops.cli import main

sys.exit(main())
