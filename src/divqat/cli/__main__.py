"""`python -m divqat.cli`: the divqat command."""

import sys

from divqat.cli import main

if __name__ == "__main__":  # importing it (a docs generator walking the package) runs nothing
    sys.exit(main())
