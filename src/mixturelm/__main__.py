"""`python -m mixturelm` (and `torchrun -m mixturelm`) runs the command line."""

import sys

from .cli import main

sys.exit(main())
