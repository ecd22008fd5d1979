"""The web server's own errors."""

from core.errors import FieldlineError


class WebError(FieldlineError):
    """The web server or its tokens: the message says what was wrong and what to do."""
