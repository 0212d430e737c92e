"""The ``store`` params section: where the results store lives, and where its password may not.

Params are recorded with every run (``runs.params_json``, the run id's hash) and committed with
``params.yaml``, so a password is never written in them. It comes from the environment or the
client's own files: libpq's ``PGPASSWORD`` or ``~/.pgpass`` (read by psycopg when the URL has
none), or ``$GRIT_STORE_URL``, a whole URL kept in the environment that serves in place of
``store.url``. A run records that URL without its password.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import quote

from pydantic import model_validator
from sqlalchemy import URL
from sqlalchemy.engine import make_url

from core.errors import UserError
from core.section import Section

STORE_URL_VARIABLE = "GRIT_STORE_URL"
WHERE_PASSWORDS_GO = f"give it with PGPASSWORD, ~/.pgpass or {STORE_URL_VARIABLE} (docs/store.md)"
# userinfo's password and a query's password=..., for a URL SQLAlchemy cannot parse
_INLINE_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]+@|(password=)[^&]+")


def _parsed(url: str) -> URL | None:
    try:
        return make_url(url)
    except Exception:  # noqa: BLE001 - ArgumentError and friends: not a URL SQLAlchemy reads
        return None


def has_password(url: str) -> bool:
    """Does ``url`` carry a password, as ``user:password@`` or as ``?password=`` (psycopg passes
    query keys to libpq)? The empty password of ``user:@`` is none."""
    parsed = _parsed(url)
    if parsed is None:
        return bool(_INLINE_PASSWORD.search(url))
    return bool(parsed.password) or bool(parsed.query.get("password"))


def without_password(url: str) -> str:
    """``url`` as a run records it: unchanged (so its hash too) when it carries no password."""
    parsed = _parsed(url)
    if not has_password(url) or parsed is None:
        return url
    # URL.set(password=None) keeps the password (None means "unchanged" there).
    query = {key: value for key, value in parsed.query.items() if key != "password"}
    return URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database,
                      query).render_as_string(hide_password=False)


def shown(url: str) -> str:
    """``url`` for a message or a log line: any password replaced by ``***``."""
    if not has_password(url):
        return url
    parsed = _parsed(url)
    text = url if parsed is None else parsed.render_as_string(hide_password=True)
    return _INLINE_PASSWORD.sub(lambda m: f"{m[1]}***@" if m[1] else f"{m[2]}***", text)


def scrubbed(message: str, url: str) -> str:
    """``message`` (a driver's error, say) with the password of ``url`` replaced by ``***``."""
    parsed = _parsed(url)
    secrets = [parsed.password, parsed.query.get("password")] if parsed is not None else []
    for secret in filter(None, secrets):
        for form in {str(secret), quote(str(secret), safe="")}:
            message = message.replace(form, "***")
    return message


class StoreParams(Section):
    """Results store. Any SQLAlchemy URL works; SQLite paths are relative to the repo root."""

    url: str = "sqlite:///outputs/centralized.db"

    @model_validator(mode="after")
    def _has_scheme(self) -> StoreParams:
        if "://" not in self.url:
            raise ValueError("url must be a SQLAlchemy URL such as sqlite:///outputs/centralized.db")
        if has_password(self.url):
            # Refused, not stripped: params.yaml is the user's file, and a stripped copy would
            # leave the password there, committed, for DVC to carry into every experiment.
            raise ValueError(f"url holds a password, which params would record with every run; remove it "
                             f"from the URL and {WHERE_PASSWORDS_GO}")
        return self


def store_url(store: StoreParams, environ: Mapping[str, str] = os.environ) -> str:
    """The URL the store is opened at: ``$GRIT_STORE_URL`` when set (the one place a URL may
    carry its password), else ``store.url``."""
    url = environ.get(STORE_URL_VARIABLE)
    if not url:
        return store.url
    if "://" not in url or _parsed(url) is None:
        raise UserError(f"{STORE_URL_VARIABLE} must be a SQLAlchemy URL such as "
                        "postgresql+psycopg://grit@db.lab.example/grit_results; fix or unset it")
    return url


def recorded_store(url: str) -> StoreParams:
    """The ``store`` section a run opened at ``url`` records (and hashes): ``url`` less its
    password, so a URL without one records, and its run id hashes, as it always did."""
    return StoreParams(url=without_password(url))
