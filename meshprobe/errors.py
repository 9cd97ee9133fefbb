"""One exception type for bad user input: the CLI prints its message on one line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user (a path, a flag, a config value). The message says what to change."""
