"""Rate-limit errors: telling an LM's "429 Too Many Requests" from other errors, and its Retry-After.

A rate-limit error is one of the LM clients' ``RateLimitError`` classes (litellm, openai,
anthropic: matched by class name, so no library is imported here), or any error carrying HTTP
status 429 (``status_code``, ``status`` or ``response.status_code``), or one raised from such an
error. Its Retry-After comes from a ``retry_after`` attribute (seconds) or the ``Retry-After`` /
``retry-after-ms`` header of its ``response`` or ``headers`` (seconds or an HTTP date).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator, Mapping
from typing import Any

#: HTTP status of "Too Many Requests".
TOO_MANY_REQUESTS = 429
#: Class names the LM client libraries give their rate-limit errors.
RATE_LIMIT_CLASS_NAMES = frozenset({"RateLimitError", "RateLimitExceeded", "TooManyRequests"})


def is_rate_limit(error: BaseException) -> bool:
    """True when ``error`` (or an error it was raised from) is a rate-limit error."""
    return rate_limit_error(error) is not None


def rate_limit_error(error: BaseException) -> BaseException | None:
    """The rate-limit error in ``error``'s chain of causes, if any."""
    return next((exc for exc in causes(error) if _says_429(exc)), None)


def retry_after_s(error: BaseException) -> float | None:
    """Seconds the LM asked to wait (Retry-After) before the next request; None if it did not say."""
    found = rate_limit_error(error)
    if found is None:
        return None
    own = getattr(found, "retry_after", None)
    if isinstance(own, int | float) and not isinstance(own, bool) and own >= 0:
        return float(own)
    return _from_headers(_headers_of(found))


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it was raised from (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _says_429(error: BaseException) -> bool:
    if any(cls.__name__ in RATE_LIMIT_CLASS_NAMES for cls in type(error).__mro__):
        return True
    response = getattr(error, "response", None)
    statuses = (getattr(error, "status_code", None), getattr(error, "status", None),
                getattr(response, "status_code", None))
    return TOO_MANY_REQUESTS in statuses


def _headers_of(error: BaseException) -> Mapping[str, Any]:
    headers: Any = getattr(getattr(error, "response", None), "headers", None) or getattr(error, "headers", None)
    if not callable(getattr(headers, "items", None)):  # a Mapping, or httpx's Headers
        return {}
    return {str(key).lower(): value for key, value in headers.items()}


def _from_headers(headers: Mapping[str, Any]) -> float | None:
    """``retry-after-ms`` (OpenAI), else ``retry-after`` in seconds or as an HTTP date."""
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after")
    seconds = _number(value)
    if seconds is not None or value is None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None
