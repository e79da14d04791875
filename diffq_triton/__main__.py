"""``python -m diffq_triton demo|info``: the same commands as the ``diffq-triton`` script."""

import sys

from .cli import main

sys.exit(main())
