"""The one base class of every error a user can cause; the CLI turns these into exit code 2."""


class NegpromptError(ValueError):
    """Bad input: the message names the problem and what would be accepted."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its class name if it has none): what the command line
    prints after ``negprompt: error:`` and the web page shows."""
    text = str(error)
    return text.splitlines()[0] if text else error.__class__.__name__
