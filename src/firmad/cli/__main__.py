"""`python -m firmad.cli`: the firmad command (as `python -m firmad`)."""

import sys

from firmad.cli import main

if __name__ == "__main__":
    sys.exit(main())
