"""heald: a self-healing infrastructure agent."""

__version__ = "0.1.0"
