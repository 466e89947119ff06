"""heald stage package."""
