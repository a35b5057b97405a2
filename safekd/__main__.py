"""``python -m safekd`` = the ``safekd`` console script."""
import sys

from safekd.cli import main

sys.exit(main())
