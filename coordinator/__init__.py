"""heald coordinator: fleet state, live dashboard, JSON API and fleet-wide safety for heald agents.

It imports only :mod:`agent.wire`, :mod:`agent.errors` and :mod:`agent.cli.base` from the agent
(checked by tests/test_architecture.py), so it can be installed and run on a host that never runs
the agent.
"""

__version__ = "0.1.0"
