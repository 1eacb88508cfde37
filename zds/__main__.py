"""``python -m zds`` and the ``zds`` program (pyproject.toml's ``[project.scripts]``): this
module and no more is loaded before a Ctrl-C is ``main``'s to take (every import here is
every command's start-up)."""

import sys


def run() -> int:
    """``zds.cli.main``; a Ctrl-C that comes while it is loaded (the first ~20 ms of every
    command) ends it as one in ``main`` does: exit 130 (128 + SIGINT), no traceback."""
    try:
        from zds.cli import main

        return main()
    except KeyboardInterrupt:  # (raised before main's try, or as it returns)
        return 130
    except RuntimeError as exc:  # (Python 3.11's, around one raised in a __set_name__: see main)
        if not isinstance(exc.__cause__, KeyboardInterrupt):
            raise
        return 130


if __name__ == "__main__":
    sys.exit(run())
