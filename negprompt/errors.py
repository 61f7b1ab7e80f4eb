"""The one base class of every error a user can cause; the CLI turns these into exit code 2."""


class NegpromptError(ValueError):
    """Bad input: the message names the problem and what would be accepted."""
