"""The one error type for input a user can fix."""


class UserError(ValueError):
    """A setting, file or folder given by the user is wrong; the message names the problem and the
    fix. train.py and sample.py print it as one line (`script: error: ...`) and exit with code 2;
    any other exception is a bug or a machine failure and keeps its traceback."""
