"""The one error type for bad user input."""


class UsageError(ValueError):
    """A flag, file or checkpoint the user gave is wrong. The message names it and says what to do; the entry
    scripts print it without a traceback and exit with status 2, as argparse does, before any model loads."""
