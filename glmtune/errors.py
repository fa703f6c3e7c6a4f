"""The one error type for mistakes a user can fix (bad data, bad config, missing files).

The CLI prints its message without a traceback and exits with status 2; everything else is a bug
and keeps its traceback.
"""


# How the CLI starts each line of such a message (the studio reads it back from a run's output)
ERROR_PREFIX = "glmtune: error: "


class GlmtuneError(Exception):
    """A problem the user caused and can fix; the message says what to do."""


def one_line(text: object, limit: int = 300) -> str:
    """`text` (an exception, a library's message) as one line of at most `limit` characters, for error
    messages that must stay a single readable line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def shown(value: object, limit: int = 60) -> str:
    """repr() of a value from the user's data, shortened: a 10 MB string must not become a 10 MB message,
    and a list or mapping is drawn only to a few items and levels, never whole (a YAML alias bomb is
    gigabytes when drawn whole)."""
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        text = repr(value)
        return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text):,} characters)"
    import reprlib

    drawer = reprlib.Repr()
    drawer.maxlevel, drawer.maxstring, drawer.maxother = 3, max(limit // 2, 10), max(limit // 2, 10)
    for attribute in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
        setattr(drawer, attribute, max(4, limit // 10))
    text = drawer.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
