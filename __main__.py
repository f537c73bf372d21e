"""`python -m ldm_nodes ...`: the pack's command line (cli/)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
