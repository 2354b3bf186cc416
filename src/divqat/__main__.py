"""`python -m divqat`: the divqat command, where the console script is not on PATH."""

import sys

from divqat.cli import main

if __name__ == "__main__":  # importing it (a docs generator walking the package) runs nothing
    sys.exit(main())
