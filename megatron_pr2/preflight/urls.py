"""The ``--sglang-urls`` list: well-formed, distinct ``http(s)://host:port`` addresses."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlsplit

from megatron_pr2.preflight.problems import ValidationError


def parse_sglang_urls(text: str) -> list[str]:
    """Split ``--sglang-urls`` into ``http(s)://host:port`` addresses.

    Raises:
        ValidationError: naming each malformed or repeated address.
    """
    urls = [u.strip() for u in text.split(",")]
    if not any(urls):
        raise ValidationError(["--sglang-urls is empty; expected http://host:port[,...]"])
    problems = []
    for url in urls:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if (parts.scheme not in ("http", "https") or not parts.hostname or port is None
                or parts.path not in ("", "/") or parts.query):
            problems.append(f"--sglang-urls entry {url!r} is not of the form http://host:port")
    if len(set(urls)) != len(urls):
        problems.append("--sglang-urls lists a server more than once")
    if problems:
        raise ValidationError(problems)
    return urls


REACH_TIMEOUT_S = 5.0


def answers_http(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """None when ``url``'s ``/health`` answers at all (any HTTP status), else why not."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: reachable (the pool judges its health later)
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def unreachable_servers(urls: list[str], timeout: float = REACH_TIMEOUT_S) -> list[str]:
    """One problem per server of ``--sglang-urls`` that does not answer HTTP."""
    problems = []
    for url in urls:
        reason = answers_http(url, timeout)
        if reason is not None:
            problems.append(f"--sglang-urls {url}: no answer on /health ({reason}); start the "
                            "server first (tools/launch_sglang.py) or fix the address")
    return problems
