"""The one error type for input a user can fix.

The library raises UserError (or a subclass naming where it came from) when a setting, a file or a
folder given by the user is wrong, with a message that names the problem and the fix. train.py and
sample.py print such an error as one line, `script: error: ...`, and exit with code 2; any other
exception is a bug or a machine failure and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input the user can fix; the message says how."""
