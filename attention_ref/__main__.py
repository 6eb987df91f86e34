"""``python -m attention_ref``: the command line of :mod:`attention_ref.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
