"""``python -m pyrovae``: the command line, also as torchrun's module (``torchrun ... -m pyrovae train EXP.toml``)."""

import sys

from pyrovae.cli import main

if __name__ == "__main__":
    sys.exit(main())
