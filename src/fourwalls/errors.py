"""One exception hierarchy: the CLI prints the message and exits 2; the server maps it to an OpenAI error."""


class FourwallsError(Exception):
    """Base class: a problem the user can fix, with a message that says how. ``param`` names the request field at
    fault and ``code`` is a machine-readable reason (the OpenAI error object's fields; the CLI prints the message)."""

    http_status = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class UsageError(FourwallsError):
    """Contradictory or invalid options."""


class NotFoundError(FourwallsError):
    """A model, file or other named thing does not exist."""

    http_status = 404


class FormatError(FourwallsError):
    """A file is truncated, malformed or of an unsupported kind."""


class UnsupportedError(FourwallsError):
    """A valid input fourwalls does not support (architecture, quantization type, ...)."""


class ContextLengthError(FourwallsError):
    """A prompt (plus the tokens to generate) does not fit the model's context window."""


class OverloadedError(FourwallsError):
    """The server cannot take the request now (queue full, draining); retry later or elsewhere."""

    http_status = 503


class RequestTimeoutError(FourwallsError):
    """A request ran past its time limit."""

    http_status = 504


class DiskFullError(FourwallsError):
    """A write found its disk (or the user's quota) full; nothing was left half-written."""

    http_status = 507

    def __init__(self, message: str) -> None:
        super().__init__(message, code="disk_full")


class InternalError(FourwallsError):
    """A bug in fourwalls, not the user's doing (the server answers 500)."""

    http_status = 500


class AuthError(FourwallsError):
    """No API key, or an unknown one."""

    http_status = 401


class ForbiddenError(FourwallsError):
    """The API key may not do this (another model, or an admin route)."""

    http_status = 403


class RateLimitError(FourwallsError):
    """A per-key budget is spent; ``retry_after`` says in how many seconds it frees up."""

    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
