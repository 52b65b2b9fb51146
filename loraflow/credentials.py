"""Credentials in URL-valued settings: hidden wherever loraflow writes or prints, kept where they belong.

A tracking URI, database URL or webhook may carry a credential (``http://USER:PASSWORD@host``, a
``?token=`` query parameter). :func:`redact` is the one function every writer goes through: config
and record dumps (run files, MLflow params, Prefect flow-run parameters), MLflow params and tags,
Prefect artifacts, log records and the CLI's terminal output. It renders ``http://USER:***@host``.

Credentials live outside the config file: MLflow reads ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` from the environment, deployments get them from Prefect Secret blocks,
the local PostgreSQL's password is a file under LORAFLOW_HOME. A URL that carries one still works:
the entry point takes it out (:func:`move_tracking_credentials`) and hands it to MLflow through its
environment variables, so that it never travels further inside a URL.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from loraflow.errors import UsageError

REDACTED = "***"
USERNAME_VAR = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VAR = "MLFLOW_TRACKING_PASSWORD"

# scheme://userinfo@ — userinfo runs to the last "@" before the host ends, as urllib and requests read
# it: any character but whitespace and "/?#", so that no password a client would accept stays visible.
_C = r"[^\s/?#@]"  # a character of userinfo
_USERINFO = re.compile(rf"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>{_C}*(?:@{_C}*)*)@")
# ?name=value / &name=value; the value ends where a URL or the surrounding text would.
_QUERY = re.compile(r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#;\s\"'<>`)\]]+)")
_SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "sig", "signature", "credential", "credentials"}
_SECRET_WORDS |= {"key", "apikey", "auth", "sas"}
_SECRET_SUFFIXES = ("token", "secret", "password", "accesskeyid")

T = TypeVar("T")


def _secret_param(name: str) -> bool:
    """A query parameter that carries a credential: token, access_key, X-Amz-Signature, client_secret, ..."""
    parts = [p for p in re.split(r"[^a-z0-9]+", name.lower()) if p]
    return any(p in _SECRET_WORDS or p.endswith(_SECRET_SUFFIXES) for p in parts)


def _hide_userinfo(m: re.Match[str]) -> str:
    user, colon, _ = m["userinfo"].partition(":")
    # With a password the user name stays readable; alone, a "user" is often the token itself.
    return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"


def _hide_query(m: re.Match[str]) -> str:
    return f"{m['lead']}{m['name']}={REDACTED}" if _secret_param(m["name"]) else m[0]


def redact(value: T) -> T:
    """``value`` with the credential of every URL in it replaced by ``***``.

    Strings (free text included: log lines, Markdown, error messages) and dicts, lists and tuples of
    them, recursively; any other value comes back as it was. ``http://USER:PASSWORD@host`` becomes
    ``http://USER:***@host``, ``https://TOKEN@host`` becomes ``https://***@host``, and query
    parameters named like a credential (``token``, ``access_key``, ``X-Amz-Signature``, ...) keep
    their name with the value hidden. Percent-encoded characters need no decoding to be hidden.
    """
    if isinstance(value, str):
        if "@" in value:
            value = _USERINFO.sub(_hide_userinfo, value)
        if "=" in value:
            value = _QUERY.sub(_hide_query, value)
        return value  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list):
        return [redact(v) for v in value]  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)  # type: ignore[return-value]
    return value


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its ``user:password@`` part, and the user and password it carried (percent-decoded).

    ``(url, None, None)`` when it carries none; the password is ``""`` for ``https://USER@host``.
    """
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    clean = urlunsplit(parts._replace(netloc=host))
    return clean, unquote(parts.username or ""), unquote(parts.password or "")


def credential_warning(setting: str) -> str:
    """The one-line warning for a credential found in ``setting``, saying where it should live."""
    return (
        f"warning: {setting} carries a credential; loraflow hides it everywhere and hands it to MLflow as "
        f"{USERNAME_VAR}/{PASSWORD_VAR}: keep it there (deployments: Prefect Secret blocks; README "
        '"Credentials"), not in the URL'
    )


def move_tracking_credentials(url: str, setting: str, environ: MutableMapping[str, str]) -> tuple[str, str | None]:
    """At an entry point: the MLflow URI without its credential, which goes into MLflow's variables in ``environ``.

    Variables already set win, as they do in MLflow itself (which sends them only when both are set:
    a URL with a user and no password authenticates with neither). Returns the clean URI and the
    warning to show (None when the URI carried no credential). Past the entry point the credential
    never travels in a URL: not in flow-run parameters, MLflow error messages or links.
    """
    clean, user, password = split_credentials(url)
    if user is None:
        return url, None
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        # MLflow's login variables are HTTP basic auth: a database's password cannot travel in them, and the
        # flows run in other processes (workers), which would need it in their parameters.
        raise UsageError(
            f"{setting} is a {scheme} database URL with a password; loraflow's flows run in other processes and "
            f"must not carry it. Serve that database with an MLflow tracking server (`mlflow server "
            f"--backend-store-uri <that URL>`) and set {setting} to the server's http(s) address"
        )
    environ.setdefault(USERNAME_VAR, user)
    environ.setdefault(PASSWORD_VAR, password or "")
    return clean, credential_warning(setting)


# --- the edges: log records and terminal output -------------------------------------------------


def install_log_redaction() -> None:
    """Redact every log record of this process as it is made (message, arguments and traceback).

    A record factory rather than a handler filter: it also covers handlers that libraries add later
    (Prefect's API handler, which ships flow-run logs to the server). Entry points call it; calling it
    again does nothing.
    """
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is emitted
            return record
        if (hidden := redact(message)) != message:
            record.msg, record.args = hidden, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if (hidden := redact(text)) != text:
                record.exc_text = hidden
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class RedactingStream:
    """A text stream that passes on whole lines with :func:`redact` applied (the rest on flush)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        lines, sep, self._pending = self._pending.rpartition("\n")
        if sep:
            self.stream.write(redact(lines + sep))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.stream.write(redact(self._pending))
            self._pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextmanager
def redacted_output() -> Iterator[None]:
    """sys.stdout and sys.stderr redacted for the block (the CLI's whole run)."""
    saved = sys.stdout, sys.stderr
    wrapped = RedactingStream(saved[0]), RedactingStream(saved[1])
    sys.stdout, sys.stderr = wrapped
    try:
        yield
    finally:
        for stream in wrapped:
            stream.flush()
        sys.stdout, sys.stderr = saved
