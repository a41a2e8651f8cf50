"""One exception type for every mistake a user can make, so entry points can report it in one line."""


class InputError(ValueError):
    """Bad user input: the message names the file or parameter, what was expected and what was found."""
