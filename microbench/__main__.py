"""``python -m microbench``: the whole campaign (see :mod:`microbench.harness.campaign`)."""
import sys

from microbench.harness.campaign import main

if __name__ == "__main__":
    sys.exit(main())
