"""The one user-facing error type: printed by the CLI without a traceback."""


class SlimEdgeError(Exception):
    """What was wrong, the value seen, and what to do — in one message."""
