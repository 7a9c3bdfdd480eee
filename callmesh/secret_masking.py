"""Masking the credentials of URLs: in a value known to be a URL (a setting, a sink's
address) and anywhere in free text (a log line, an error message).

The two differ on purpose: a URL setting shows its query string masked whole, since any
of it may be a credential; free text keeps a URL's query readable except for parameters
named like secrets, since it is read to diagnose a failure.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

SECRET_MASK = "***"


def mask_url(url: str) -> str:
    """``url`` with the password of its user info and its query string replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return SECRET_MASK
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{SECRET_MASK}@{host}"
    query = SECRET_MASK if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]{0,15}://)(?P<user>[^/\s:@?#]*)"
    r"(?::(?P<password>[^/\s@?#]*))?@"
)
_SECRET_WORDS = r"(?:token|secret|passw(?:or)?d|pwd|api[_\-]?key|key|sig|signature|auth|credential)"
_URL_SECRET_PARAM = re.compile(rf"(?P<name>[?&][^=&\s#]*{_SECRET_WORDS}[^=&\s#]*=)[^&\s#]+", re.I)


def _userinfo(m: re.Match[str]) -> str:
    if m.group("password") is not None:
        return f"{m.group('scheme')}{m.group('user')}:{SECRET_MASK}@"
    # A bare user part is often the credential itself (https://TOKEN@host).
    return f"{m.group('scheme')}{SECRET_MASK}@"


def mask_secrets(text: str) -> str:
    """``text`` with the credentials of every URL in it masked (user info and secret
    query parameters)."""
    if "://" not in text and "=" not in text:
        return text
    text = _URL_USERINFO.sub(_userinfo, text)
    return _URL_SECRET_PARAM.sub(lambda m: m.group("name") + SECRET_MASK, text)
