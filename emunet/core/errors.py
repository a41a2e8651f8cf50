"""One exception type for every mistake a user can make, so entry points can report it in one line.

Only `InputError` (with an OSError about the user's files and MLflow's not-found / invalid-parameter
errors) becomes `error: <message>` and exit code 2 (`emunet.registry.cli.user_error`). A plain `ValueError`
is a bug, ours or a library's, and keeps its traceback: raise `InputError` for anything the user can fix
(a parameter, a file, a configuration), and `ValueError` only for what a caller inside the project got wrong.

`InputError` stays a `ValueError` on purpose: a bad value from the user is what `ValueError` means, and
code that catches `ValueError` to wrap a library's complaint about the user's file (Keras loading an
`init_model`, NumPy parsing a number) or to fall back to another choice treats our own checks the same way.
The entry points tell the two apart by the exact type, so the base class does not blur them.
"""


class InputError(ValueError):
    """Bad user input: the message names the file or parameter, what was expected and what was found."""
