"""``python -m quantmoe`` (and ``torchrun -m quantmoe``): the command line."""

import sys

from quantmoe.cli import main

sys.exit(main())
