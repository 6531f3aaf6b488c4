"""Command-line entry points, installed as `jaxyolo.tools`."""
