"""The one exception type users see: its message is a single line naming the problem."""


class PoisonlabError(Exception):
    """A user-facing error (bad input, bad config, missing file). The CLI prints it on one line."""
