"""
User errors: mistakes a user can fix (an unknown config key, a missing file, a keep fraction out of range,
a checkpoint of another shape...). nanoEMO raises them as UserError, with a message that says what is wrong
and how to fix it; every command line (train.py, prune.py, eval.py, sample.py, checkpoint.py,
data/prepare.py) prints such an error as one line `error: ...` and exits with status 2. Anything else is a
bug and keeps its traceback.
"""

import sys


class UserError(Exception):
    """A mistake in what the user asked for."""


def run_command(main, argv=None):
    """Run a command line's main(argv); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
