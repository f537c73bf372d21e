"""`python -m ldm_nodes COMMAND`: the pack's command line, one module per command.

Each module has `add_parser(commands)`, which declares its flags (with their ranges as argparse types),
and `run(args) -> exit status`. Heavy imports happen inside `run`, so `--help` and a refused flag cost
no torch import."""
import argparse
import sys

from . import classify, errors, nll, run, train

COMMANDS = {"train": train, "run": run, "nll": nll, "classify": classify}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm_nodes", description=__doc__.splitlines()[0],
                                     exit_on_error=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(commands)
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as error:  # a flag's type refused its value: one line, as any refusal
        return errors.fail(f"{error.argument_name}: {error.message}")
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that resumes an interrupted run
    from ..core import gc_pause, threads

    gc_pause.resume()  # the imports are done: freeze what they made, collect again
    threads.configure()  # torch's threads for this process (never under a host), said before the first progress
    try:
        return COMMANDS[args.command].run(args)
    finally:
        threads.command_done()
