"""The ``--sglang-urls`` list: well-formed, distinct ``http(s)://host:port`` addresses."""

from __future__ import annotations

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
