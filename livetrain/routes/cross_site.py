"""Refusing what a web page can make a browser send to the training routes.

A page the user visits can make their browser send a request to any address, loopback
included, without the user seeing it. Three kinds reach a server without a CORS
preflight or with the attacker in control of the reply:

* a "simple" cross-site request: ``POST`` with ``Content-Type`` ``text/plain``,
  ``application/x-www-form-urlencoded`` or ``multipart/form-data`` (an HTML form, or
  ``fetch`` in ``no-cors`` mode). The page cannot read the reply, but the request runs.
  Every body-carrying request must therefore say ``application/json``, which a browser
  sends cross-site only after a preflight that vLLM's CORS settings answer.
* a request whose ``Origin`` names another site. Browsers send ``Origin`` on every
  cross-site request that may change state; an origin that is neither the server's
  own nor one listed in vLLM's ``--allowed-origins`` is refused.
* DNS rebinding: the attacker's host name is made to resolve to 127.0.0.1, so the page
  is same-origin with the server and can read the replies too. Its requests carry the
  attacker's name in ``Host``; without an admin token (a loopback-only server) ``Host``
  must name a loopback address.

With an admin token the browser cannot send the ``Authorization`` header cross-site
without a preflight, and a rebinding page does not know the token, so ``Host`` is not
checked (a deployment behind a proxy sees the proxy's names), and ``--allowed-origins
'["*"]'`` means what it says. Without a token a wildcard does not open these routes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

JSON_MEDIA_TYPE = "application/json"
_DEFAULT_PORTS = {"http": "80", "https": "443"}


@dataclasses.dataclass(frozen=True)
class CrossSiteRefusal:
    """Why a request was refused: its HTTP status, a message a person can act on, and
    OpenAI's error ``code``."""

    status: int
    message: str
    code: str


def split_host(authority: str) -> tuple[str, str | None]:
    """``host[:port]`` (``[v6]:port`` for IPv6) -> (host lowercased, without brackets; port or None)."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") and rest[1:] else None
    host, colon, port = authority.rpartition(":")
    if colon and port.isdigit():
        return host, port
    return authority, None


def is_loopback_host(host: str) -> bool:
    """``localhost`` (or a name under it, which browsers resolve to loopback themselves)
    or a loopback IP literal; any other name could be rebound to 127.0.0.1."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin_parts(origin: str) -> tuple[str, str] | None:
    """``scheme://host[:port]`` -> (scheme, ``host:port`` with the scheme's default port
    filled in); None for anything that is not an http(s) origin (e.g. ``null``)."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return parts.scheme, _authority(parts.hostname, str(port) if port else None, parts.scheme)


def _authority(host: str, port: str | None, scheme: str) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port or _DEFAULT_PORTS.get(scheme, '80')}"


@dataclasses.dataclass(frozen=True)
class CrossSitePolicy:
    """What the training routes accept from a browser (see the module).

    ``token_required``: the routes need the admin token. ``allowed_origins``: vLLM's
    ``--allowed-origins`` (origins such as ``http://localhost:3000``; ``*`` counts only
    with a token).
    """

    token_required: bool = False
    allowed_origins: frozenset[str] = frozenset()

    @classmethod
    def create(cls, token_required: bool, allowed_origins: Iterable[str] = ()) -> "CrossSitePolicy":
        origins = frozenset(origin.strip().lower().rstrip("/") for origin in allowed_origins)
        if "*" in origins and not token_required:
            log.warning("vLLM's --allowed-origins lists '*', but livetrain's training routes have no admin "
                        "token: they accept only the origins listed by name (set an admin token to let every "
                        "origin through)")
        return cls(token_required, origins)

    def refusal(self, method: str, headers: Mapping[str, str], scheme: str = "http") -> CrossSiteRefusal | None:
        """Why this request must be refused, or None. ``headers``: lower-case names."""
        host_header = headers.get("host", "")
        if not self.token_required and not is_loopback_host(split_host(host_header)[0]):
            return CrossSiteRefusal(
                403, f"this server has no admin token, so it answers only requests addressed to a loopback "
                     f"name (localhost, 127.0.0.1, [::1]), not to Host {host_header or '(none)'!r}; use "
                     "http://127.0.0.1:PORT, or serve with an admin token to reach it under another name",
                "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host_header, scheme):
            return CrossSiteRefusal(
                403, f"requests from the web origin {origin!r} may not use the training routes; list it in "
                     "vLLM's --allowed-origins (livetrain serve -- --allowed-origins '[\"ORIGIN\"]')"
                     + ("" if self.token_required else " and serve with an admin token for pages on other hosts"),
                "origin_not_allowed")
        if method not in ("GET", "HEAD", "OPTIONS"):
            content_type = headers.get("content-type", "")
            if content_type.split(";", 1)[0].strip().lower() != JSON_MEDIA_TYPE:
                return CrossSiteRefusal(
                    415, f"the training routes take JSON bodies only: send 'Content-Type: {JSON_MEDIA_TYPE}' "
                         f"(got {content_type or 'none'!r}); an empty body is '{{}}'",
                    "unsupported_media_type")
        return None

    def _origin_allowed(self, origin: str, host_header: str, scheme: str) -> bool:
        parts = _origin_parts(origin)
        if parts is None:
            return False  # "null" (sandboxed frames, file: pages) and other non-web origins
        if parts[1] == _authority(*split_host(host_header), scheme):
            return True  # the server's own pages (behind a TLS proxy the schemes may differ)
        if self.token_required and "*" in self.allowed_origins:
            return True
        return parts in {_origin_parts(allowed) for allowed in self.allowed_origins}
