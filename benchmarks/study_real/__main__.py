"""``python -m benchmarks.study_real``: run the quality study from the command line."""

from __future__ import annotations

import sys

from benchmarks.study_real.run import main

if __name__ == "__main__":
    sys.exit(main())
