"""The one exception type that means "the user gave us something we cannot use"."""


class UserError(Exception):
    """Bad input: the CLI prints the message as one line and exits with status 2.

    The message must say what was wrong, where (file, key, path) and what to do about it.
    """
