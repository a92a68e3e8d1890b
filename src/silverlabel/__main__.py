"""``python -m silverlabel``: the same command as ``silverlabel``."""

import sys

from silverlabel.cli import main

if __name__ == "__main__":
    sys.exit(main())
