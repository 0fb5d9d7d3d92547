"""`python -m moebench` (also what `torchrun -m moebench` starts)."""

import sys

from moebench.cli import main

sys.exit(main())
