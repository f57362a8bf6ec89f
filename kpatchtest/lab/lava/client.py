"""LAVA's XML-RPC API, the calls the backend needs: submit, show, logs, results, cancel.

Credentials: a lavacli identity (~/.config/lavacli.yaml: uri, username, token), or a
user and a token from the environment (LavaRef.token_env, default LAVA_TOKEN; the user
from LavaRef.user or $LAVA_USER). The token never appears in a message or a log.
"""

from __future__ import annotations

import http.client
import os
import urllib.parse
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kpatchtest.errors import InputError
from kpatchtest.lab.ssh.connection import LabError
from kpatchtest.spec import LavaRef

LAVACLI_CONFIG = Path("~/.config/lavacli.yaml")


class LavaError(LabError):
    """The LAVA server cannot be reached or refused a call."""


@dataclass(frozen=True)
class Credentials:
    url: str            # the server's base URL, no credentials in it
    user: str
    token: str

    def rpc_url(self) -> str:
        u = urllib.parse.urlsplit(self.url.rstrip("/"))
        auth = f"{urllib.parse.quote(self.user, safe='')}:{urllib.parse.quote(self.token, safe='')}@"
        path = u.path if u.path.endswith("/RPC2") else u.path + "/RPC2"
        return urllib.parse.urlunsplit((u.scheme, auth + u.netloc, path, "", ""))


def credentials(ref: LavaRef, env: dict[str, str] | None = None, home: Path | None = None) -> Credentials:
    """Where the spec says the credentials are; a one-line InputError when they are not there."""
    env = os.environ if env is None else env
    if ref.identity:
        path = (home / ".config/lavacli.yaml") if home else LAVACLI_CONFIG.expanduser()
        try:
            ids = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"lab.lava.identity {ref.identity!r}: cannot read {path}: {e}") from None
        ident = ids.get(ref.identity) if isinstance(ids, dict) else None
        if not isinstance(ident, dict) or not ident.get("username") or not ident.get("token"):
            raise InputError(f"lab.lava.identity {ref.identity!r}: no such identity with username and token in {path}",
                             hint="add it with `lavacli identities add`")
        return Credentials(ident.get("uri") or ref.url, str(ident["username"]), str(ident["token"]))
    user = ref.user or env.get("LAVA_USER")
    token = env.get(ref.token_env)
    if not user or not token:
        missing = " and ".join(n for n, v in (("lab.lava.user or $LAVA_USER", user), (f"${ref.token_env}", token)) if not v)
        raise InputError(f"lab.lava: no credentials for {ref.url}: {missing} not set",
                         hint="export the user and API token, or name a lavacli identity in lab.lava.identity")
    return Credentials(ref.url, user, token)


class LavaClient:
    """One server. Every call's failure is a LavaError naming the call, never the token."""

    def __init__(self, creds: Credentials, timeout_s: float = 60.0):
        self.creds = creds
        self.timeout_s = timeout_s
        transport = (_SafeTransport if creds.url.startswith("https:") else _Transport)(timeout_s)
        self._proxy = xmlrpc.client.ServerProxy(creds.rpc_url(), allow_none=True, transport=transport)

    def _call(self, name: str, *args: Any) -> Any:
        fn = self._proxy
        for part in name.split("."):
            fn = getattr(fn, part)
        try:
            return fn(*args)
        except xmlrpc.client.Fault as e:
            raise LavaError(f"LAVA {self.creds.url}: {name} refused: {e.faultString.strip()[:300]}") from None
        except xmlrpc.client.ProtocolError as e:
            raise LavaError(f"LAVA {self.creds.url}: {name}: HTTP {e.errcode} {e.errmsg}") from None
        except (OSError, http.client.HTTPException) as e:
            raise LavaError(f"LAVA {self.creds.url}: {name}: {e}",
                            hint="is the server up? (tests/lava/bringup.sh starts one here)") from None

    def version(self) -> str:
        return str(self._call("system.version"))

    def submit(self, definition: str) -> int:
        ids = self._call("scheduler.jobs.submit", definition)
        return int(ids[0] if isinstance(ids, list) else ids)

    def show(self, job_id: int) -> dict[str, Any]:
        return dict(self._call("scheduler.jobs.show", job_id))

    def logs(self, job_id: int, line: int = 0) -> tuple[bool, list[dict[str, Any]]]:
        """(finished, the log lines from `line` on) as LAVA's dicts {dt, lvl, msg}."""
        finished, data = self._call("scheduler.jobs.logs", job_id, line)
        text = data.data.decode("utf-8", "replace") if isinstance(data, xmlrpc.client.Binary) else str(data)
        try:
            lines = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or []
        except yaml.YAMLError:      # a chunk cut mid-line: drop the broken tail, ask again later
            text = text[: text.rfind("\n- ") + 1] if "\n- " in text else ""
            lines = yaml.safe_load(text) or []
        return bool(finished), list(lines)

    def results_yaml(self, job_id: int) -> str:
        return str(self._call("results.get_testjob_results_yaml", job_id))

    def cancel(self, job_id: int) -> None:
        self._call("scheduler.jobs.cancel", job_id)


class _Timeout:
    """A socket timeout on every call: a server that hangs must not hang the run."""

    timeout_s: float

    def __init__(self, timeout_s: float):
        super().__init__()
        self.timeout_s = timeout_s

    def make_connection(self, host):  # type: ignore[no-untyped-def]
        conn = super().make_connection(host)  # type: ignore[misc]
        conn.timeout = self.timeout_s
        return conn


class _Transport(_Timeout, xmlrpc.client.Transport):
    pass


class _SafeTransport(_Timeout, xmlrpc.client.SafeTransport):
    pass

