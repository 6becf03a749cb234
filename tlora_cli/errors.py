"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class TloraError(Exception):
    """A problem with the user's inputs or environment: say what was wrong and what to do."""
