"""heald's command line: one module per command group, one shared base.

``heald`` is :func:`agent.cli.main.main`. :mod:`agent.cli.base` (exit codes, error reporting,
logging setup, tables) is shared with ``heald-coordinator``. This package is the front end of
the agent: it may import every stage, and nothing in ``agent/`` imports it.

Importing this package (or any module in it) is light: handlers import what they need (numpy,
the daemon, the model code) when they run, so ``heald --help`` and ``heald check`` stay fast.

Importing it marks the optional imports heald never uses as absent (``agent.cli.base.NEVER_IMPORT``:
rich alone is ~14 MiB of the daemon's RSS), before any command module imports structlog, which
would otherwise load them: ``main()`` doing it is too late, its imports have run by then.
"""

from agent.cli.base import block_optional_imports

block_optional_imports()
