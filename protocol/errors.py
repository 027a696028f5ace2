"""One exception type whose message is the one line a user sees."""


class CommonsError(Exception):
    """A failure the user can fix; str(e) is a single line that names the fix."""


class VerifyError(CommonsError):
    """Content or a signature did not check out; nothing was accepted."""
