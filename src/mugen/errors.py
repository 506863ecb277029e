"""User-facing errors.

`MugenError` is raised for mistakes a user can fix (a missing path, a corrupt video, a size the
model cannot take). The CLI prints its message on one line and exits with status 2, without a
traceback. Messages name the input, say what is wrong, and say how to fix it.
"""


class MugenError(Exception):
    """An error in user input, reported without a traceback by the `mugen` command."""
