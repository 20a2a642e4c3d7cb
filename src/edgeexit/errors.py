"""The one exception a user can cause; the CLI prints it as a single line and exits non-zero."""


class UserError(ValueError):
    """Bad input from the user (unknown name, bad path, malformed value); the message says what is accepted."""
