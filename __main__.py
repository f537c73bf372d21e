"""`python -m ldm_nodes ...`: the pack's command line."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm_nodes", description=__doc__)
    parser.add_subparsers(dest="command", metavar="COMMAND")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
