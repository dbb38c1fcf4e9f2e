"""nginx.conf: valid for real nginx (`nginx -t`), streaming-safe, body limit = MAX_BODY_BYTES, routes both doors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploy_helpers import NGINX_CONF, nginx_files, require_tool, run_tool

from agent.config import Settings

pytestmark = pytest.mark.deploy

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _directive(name: str) -> str:
    found = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), re.M)
    assert len(found) == 1, f"expected one `{name}` in nginx.conf, found {found}"
    return found[0].strip()


def _seconds(value: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    # Upstream host names only resolve inside compose's network; everything else is the file as shipped.
    _, args = nginx_files(tmp_path, "127.0.0.1:8080", "127.0.0.1:8000", "127.0.0.1:8001")
    proc = run_tool([require_tool("nginx"), "-t", *args])
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


def test_nginx_rejects_a_broken_config(tmp_path: Path) -> None:
    conf, args = nginx_files(tmp_path, "127.0.0.1:8080", "127.0.0.1:8000", "127.0.0.1:8001")
    conf.write_text(conf.read_text().replace("proxy_buffering off;", "proxy_buffering maybe;"))
    assert run_tool([require_tool("nginx"), "-t", *args]).returncode != 0


def test_body_limit_matches_max_body_bytes() -> None:
    m = re.fullmatch(r"(\d+)([kmg]?)", _directive("client_max_body_size").lower())
    assert m
    assert int(m.group(1)) * _UNITS[m.group(2)] == Settings.model_fields["max_body_bytes"].default


def test_streaming_safe_and_long_timeouts() -> None:
    assert _directive("proxy_buffering") == "off"  # SSE events pass as they are sent
    assert _directive("proxy_http_version") == "1.1"
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert _seconds(_directive(name)) >= 300, f"{name} would cut long generations"


def test_routes_both_doors() -> None:
    text = NGINX_CONF.read_text()
    assert re.search(r"location /v2/ \{\s*proxy_pass http://triton_http;", text)
    assert re.search(r"location / \{\s*proxy_pass http://fastapi;", text)
    assert re.search(r"upstream triton_http \{\s*server triton-server:8001;", text)
    assert re.search(r"upstream fastapi \{\s*server fastapi-server:8000;", text)
