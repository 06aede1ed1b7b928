"""``python -m deepclean``: the command-line tool (also what ``torchrun -m deepclean`` starts)."""

import sys

from deepclean.cli import main

if __name__ == "__main__":
    sys.exit(main())
