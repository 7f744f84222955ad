"""The one user-facing error type, printed by the CLI without a traceback, and the one progress line."""

import sys


class SlimEdgeError(Exception):
    """What was wrong, the value seen, and what to do — in one message."""


def note(msg: str, prefix: str = "") -> None:
    """A progress line on stderr (results go to stdout), flushed so that it keeps its place among a
    subprocess's output."""
    print(prefix + msg, file=sys.stderr, flush=True)


def run_main(entry, prog: str = "slim-edge") -> None:
    """Run a command's entry point as every slim-edge command runs: a SlimEdgeError is one line on stderr and exit
    status 2 (no traceback), Ctrl-C is exit status 130. `slim-edge` and each `python -m slim_edge....` script."""
    try:
        entry()
    except SlimEdgeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
