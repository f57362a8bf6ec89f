"""Repository strings and ref names from a spec, checked before git ever sees them.

A spec, a Jenkins parameter or a branch name comes from other people. Git takes an
argument starting with `-` as an option (`--upload-pack=CMD` runs CMD) and a
`transport::address` as a remote helper (`ext::CMD` runs CMD), so one function decides,
the way git itself does, whether a string is a URL or a local path, and refuses what
git must not be handed. Callers still put `--` before such arguments, and every git we
run carries GIT_ALLOW_PROTOCOL: the allow-list holds even where a URL is rewritten
(`url.*.insteadOf`) or redirected.

Every other question of "is this a URL" is answered here too: `is_web_url` (a lore link
given as a message-id), `find_origin` (the mirror named in a tool's error).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("https", "http", "git", "ssh", "file")

# git's own allow-list (git help config, protocol.allow): when set it overrides every
# protocol.* setting, so a user's `protocol.ext.allow=always` cannot reopen ext::.
GIT_PROTOCOL_ENV = {"GIT_ALLOW_PROTOCOL": ":".join(ALLOWED_SCHEMES)}

_SCHEME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9+.-]*)://")     # git's is_url
_HELPER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+.-]*::")     # git's transport::address
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ORIGIN = re.compile(r"https?://[^/\s:]+(:\d+)?")


def _scp_like(s: str) -> bool:
    """git's rule (connect.c url_is_local_not_ssh): a colon before any slash is host:path."""
    colon, slash = s.find(":"), s.find("/")
    return colon > 0 and (slash < 0 or colon < slash)


def is_url(s: str) -> bool:
    """Would git take `s` as a remote rather than a local path?"""
    return bool(_SCHEME.match(s) or _HELPER.match(s) or _scp_like(s))


def scheme(s: str) -> str | None:
    """The scheme of a `scheme://...` string, lowercased ("https" for "HTTPS://x"), else None."""
    m = _SCHEME.match(s)
    return m.group(1).lower() if m else None


def is_web_url(s: str) -> bool:
    """Is `s` an http:// or https:// URL (a lore link, say), whatever the case of its scheme?"""
    return scheme(s) in ("http", "https")


def find_origin(text: str) -> str | None:
    """The first `http(s)://host[:port]` in free text (a tool's log line), or None."""
    m = _ORIGIN.search(text)
    return m.group(0) if m else None


def repo_problem(s: str) -> str | None:
    """Why `s` must not reach git as a repository (URL or path), or None if it may."""
    allowed = ", ".join(f"{x}://" for x in ALLOWED_SCHEMES) + " or host:path"
    if not s.strip():
        return "must not be empty"
    if s.startswith("-"):
        return "must not start with '-' (git would take it as an option)"
    if not is_url(s):
        return None
    if _CONTROL.search(s):
        return "a URL must not contain control characters"
    m = _SCHEME.match(s)
    if m is None:
        if _HELPER.match(s):
            return f"git remote helpers ({s.split('::', 1)[0]}::) are not allowed; use {allowed}"
        host = s.split(":", 1)[0].rpartition("@")[2]
        return "the host of host:path must not start with '-'" if host.startswith("-") else None
    if m.group(1) not in ALLOWED_SCHEMES:
        return f"URL scheme {m.group(1)}:// is not allowed; use {allowed}"
    try:
        parts = urlsplit(s)
        parts.port              # a port that is not a number (`:-oProxyCommand=...`) raises
    except ValueError as e:
        return f"not a valid URL ({e})"
    user, _, host = parts.netloc.rpartition("@")
    if parts.scheme != "file" and not host:
        return "the URL names no host"
    if host.startswith("-") or user.startswith("-"):
        return "the host of a URL must not start with '-' (ssh would take it as an option)"
    return None


def ref_problem(s: str) -> str | None:
    """Why `s` must not reach git as a branch, tag or revision, or None if it may."""
    if not s.strip():
        return "must not be empty"
    if s.startswith("-"):
        return "must not start with '-' (git would take it as an option)"
    if _CONTROL.search(s):
        return "must not contain control characters"
    return None


def check_repo(s: str | None) -> str | None:
    """A pydantic validator: the value, or ValueError with repo_problem's reason."""
    if s is not None and (why := repo_problem(s)):
        raise ValueError(why)
    return s


def check_ref(s: str | None) -> str | None:
    """A pydantic validator: the value, or ValueError with ref_problem's reason."""
    if s is not None and (why := ref_problem(s)):
        raise ValueError(why)
    return s
