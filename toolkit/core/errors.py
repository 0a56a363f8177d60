"""The user-error type: a one-line message for the user, reported with exit status 2."""


class UserError(Exception):
    """Bad input (a flag, a file, a path): the message names it and what was expected."""
