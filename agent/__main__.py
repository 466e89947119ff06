"""``python -m agent`` is ``heald``."""

import sys

from agent.cli.main import main

sys.exit(main())
