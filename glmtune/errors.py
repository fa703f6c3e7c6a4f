"""The one error type for mistakes a user can fix (bad data, bad config, missing files).

The CLI prints its message without a traceback and exits with status 2; everything else is a bug
and keeps its traceback.
"""


class GlmtuneError(Exception):
    """A problem the user caused and can fix; the message says what to do."""
