"""`python -m firmad` (and `torchrun ... -m firmad train ...`): the firmad command."""

import sys

if __name__ == "__main__":
    from firmad.cellproc import die_with_parent

    die_with_parent()  # a benchmark cell: end with the grid that started it
    from firmad.cli import main

    sys.exit(main())
