"""MongoDB URIs: read by PyMongo's own parser, without network I/O, shown without secrets.

A URI is shown only as what PyMongo reads in it, rebuilt from its hosts, ports
and database (``mongodb://db1.example.com:27017,db2.example.com:27017/zoo``):
no user name, no password, no options. What PyMongo cannot read is shown as
:data:`UNPARSABLE_URI`. Nothing here looks for a password in the text: a
password with an unescaped ``/`` or ``@``, or an upper-case scheme, defeats any
pattern, and the parser is the one authority on where a password ends.
"""

from __future__ import annotations

import warnings
from typing import Any
from urllib.parse import quote

from pymongo.errors import ConfigurationError

from .. import _driver
from ..errors import CLIError

__all__ = ["UNPARSABLE_URI", "describe_uri", "parse_uri", "reason_for"]

#: How a URI that PyMongo cannot parse is shown.
UNPARSABLE_URI = "<unparsable URI>"

_SRV_SCHEME = "mongodb+srv://"
_HINT = (
    "write it as mongodb://HOST[:PORT]/DB or mongodb+srv://HOST/DB, with the user name "
    "and password escaped by urllib.parse.quote_plus"
)


def parse_uri(uri: str) -> dict[str, Any]:
    """PyMongo's reading of ``uri`` (``nodelist``, ``database``, ``username``...).

    No network I/O: a ``mongodb+srv://`` URI is checked as PyMongo checks it,
    but its DNS records are looked up only by the client, when it connects.

    :raises CLIError: PyMongo cannot parse ``uri``, or reads an ``@`` in it as
        part of a host, database or option, which is what an unescaped ``/``,
        ``?`` or ``@`` in a password does. The message never quotes the URI.
    """
    try:
        with warnings.catch_warnings():
            # Unknown options are warnings to the client, which accepts them; here
            # they would also be printed once more, perhaps with text of the URI.
            warnings.simplefilter("ignore")
            parsed = _driver.parse_uri(uri)
    except (ValueError, ConfigurationError) as exc:  # InvalidURI is a ValueError
        raise CLIError(f"bad URI {UNPARSABLE_URI}: {reason_for(exc, uri)}") from None
    if parsed["username"] is None and "@" in uri:
        # mongodb://user:12345/x@host reads as host "user", port 12345, database
        # "x@host": the password would be shown as a host, a port and a database.
        raise CLIError(
            f"bad URI {UNPARSABLE_URI}: it has an '@' that is not the end of a user name "
            "and password (one with an unescaped '/', '?' or '@'?); escape them with "
            "urllib.parse.quote_plus, and write an '@' in a database or option as %40"
        )
    return parsed


def describe_uri(uri: str) -> str:
    """``uri`` as the command shows it: its hosts, ports and database, or :data:`UNPARSABLE_URI`.

    ``mongodb://marmot:s3cret@db1:27017,db2:27017/zoo?tls=true`` is shown as
    ``mongodb://db1:27017,db2:27017/zoo``.
    """
    try:
        parsed = parse_uri(uri)
    except CLIError:
        return UNPARSABLE_URI
    if uri.startswith(_SRV_SCHEME):
        hosts = [str(parsed["fqdn"])]
    else:
        hosts = [_show_host(host, port) for host, port in parsed["nodelist"]]
    scheme = _SRV_SCHEME if uri.startswith(_SRV_SCHEME) else "mongodb://"
    return f"{scheme}{','.join(hosts)}/{parsed['database'] or ''}"


def _show_host(host: str, port: int | None) -> str:
    if port is None:  # a Unix domain socket: its path, percent-encoded as in a URI
        return quote(host, safe="")
    if ":" in host:  # an IPv6 address
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def reason_for(exc: BaseException, uri: str) -> str:
    """PyMongo's reason for refusing ``uri``, unless it quotes where a password may be."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    # A password, if any, lies between the first ':' after the scheme and the last
    # '@'. A reason that repeats four characters in a row of it is not shown.
    start = uri.find("://") + 3 if "://" in uri else 0
    userinfo = uri[start:uri.rfind("@")] if "@" in uri[start:] else ""
    secret = userinfo.partition(":")[2]
    pieces = {secret[i:i + 4] for i in range(max(1, len(secret) - 3))} if secret else set()
    if any(piece in reason for piece in pieces):
        return _HINT
    return f"{reason.rstrip('.')}; {_HINT}" if "quote_plus" not in reason else reason
