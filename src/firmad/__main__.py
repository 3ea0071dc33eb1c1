"""`python -m firmad` (and `torchrun ... -m firmad train ...`): the firmad command."""

import sys

from firmad.cli import main

sys.exit(main())
