"""``python -m antipure run WORKFLOW --images DIR --out DIR [--set NODE.INPUT=VALUE ...]``."""

import sys

from antipure.runner import main

if __name__ == "__main__":
    sys.exit(main())
