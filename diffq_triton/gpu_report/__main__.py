"""``python -m diffq_triton.gpu_report``: run the report's command line."""

import sys

from .report import main

# Guarded: compile workers are spawned, and spawn re-imports this module as ``__mp_main__``.
if __name__ == "__main__":
    sys.exit(main())
