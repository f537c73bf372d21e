"""argparse types that hold a flag's range, so each flag is declared once with its limits. A value they
refuse is one line naming the flag (cli/__init__.main), the value shortened."""
import argparse
import math


def _shown(text, limit=40):
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def integer(low, high=None):
    """An integer in low..high (high None: no upper bound)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:  # not a number, or beyond Python's 4,300 digits
            raise argparse.ArgumentTypeError(f"{_shown(text)} is not an integer") from None
        if value < low or (high is not None and value > high):
            shown = _shown(str(value))
            raise argparse.ArgumentTypeError(f"{shown} is out of range ({low} to {high if high is not None else 'any'})")
        return value
    return parse


def learning_rate(text):
    """A finite learning rate in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"{value} must be a finite learning rate in (0, 1]")
    return value
