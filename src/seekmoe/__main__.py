"""`python -m seekmoe` (what `torchrun -m seekmoe` runs): the `seekmoe` command."""

import sys

from .cli import main

sys.exit(main())
