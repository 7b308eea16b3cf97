"""The one exception type a user's mistake raises.

Every command catches `FedanomError` at the top and prints its message, one sentence naming the file, row,
column and reason, with a non-zero exit and no traceback. Anything else escaping is a bug and keeps its
traceback.
"""


class FedanomError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


class BudgetExhausted(FedanomError):
    """A merchant's privacy budget cannot pay for the requested training (`detector.privacy` plans it)."""
