"""Where the remote cache is: an fsspec URL from `--remote` or SDBUILD_REMOTE, never one holding secrets."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from builder.errors import UserError

REMOTE_VARIABLE = "SDBUILD_REMOTE"
_CREDENTIALS_HINT = (
    "remove them from the URL and give credentials the usual way: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "or AWS_PROFILE (~/.aws/credentials) for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://"
)


def remote_url(given: str | None) -> str | None:
    """The URL given on the command line, else SDBUILD_REMOTE, else None (no remote)."""
    url = given if given is not None else os.environ.get(REMOTE_VARIABLE)
    if not url:
        return None
    check_url(url, "--remote" if given is not None else REMOTE_VARIABLE)
    return url.rstrip("/")


def check_url(url: str, origin: str) -> None:
    """Refuse a URL carrying a user, password or query string: it would be echoed in logs and
    error messages. The refusal itself never repeats the URL."""
    for part in url.split("::"):  # fsspec chains protocols, e.g. simplecache::s3://bucket
        parts = urlsplit(part)
        if parts.username is not None or parts.password is not None:
            raise UserError(f"the remote cache URL in {origin} carries credentials (user:secret@)", _CREDENTIALS_HINT)
        if parts.query:
            raise UserError(
                f"the remote cache URL in {origin} has a query string, which may carry secrets",
                "remove it; fsspec options and credentials come from the environment",
            )
