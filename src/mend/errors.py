"""The one exception type users see for bad input; the CLI turns it into exit code 2."""


class MendError(ValueError):
    """Bad input or an unusable file: the message names the problem in one line."""
