"""`probe serve` against cross-site requests, on the real server: a cross-site form POST is refused (CSRF), a foreign
Host header is refused (DNS rebinding), the token guards everything but /health, binding beyond loopback needs a token
(or --insecure), and a body shorter than its Content-Length gets 408 instead of holding the connection forever.

The servers have no files: `--backbone timm/test_vit --weights random` embeds in milliseconds, few-shot sets need no
store."""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from probe.errors import ProbeError
from probe.serve.process import ServerProcess
from probe.serve.security import AccessPolicy, check_token, host_name, is_loopback
from probe.serve.service import ServeConfig

pytestmark = pytest.mark.slow

TOKEN = "t0ken-for-tests_0123456789"
TINY = ["--backbone", "timm/test_vit", "--weights", "random", "--log-level", "warning"]
EVIL = "http://evil.example"


def png(color: tuple[int, int, int]) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return ("x.png", buf.getvalue(), "image/png")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started side by side (start-up is most of this file's time):
    open — the default: loopback, no token; the set-up a web page in the user's browser could attack;
    token — PROBE_TOKEN set, so it may bind every interface (for the few seconds of these tests)."""
    srvs = {"open": ServerProcess([*TINY, "--state-dir", str(tmp_path_factory.mktemp("open")), "--body-timeout", "1"]),
            "token": ServerProcess([*TINY, "--state-dir", str(tmp_path_factory.mktemp("token")),
                                    "--allow-host", "probe.example"], host="0.0.0.0", env={"PROBE_TOKEN": TOKEN})}
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(ServerProcess.start, srvs.values()))
        yield srvs
    finally:
        for srv in srvs.values():
            srv.close()


@pytest.fixture
def open_server(servers):
    return servers["open"]


@pytest.fixture
def token_server(servers):
    return servers["token"]


def test_cross_site_form_post_is_refused_and_the_set_unchanged(open_server):
    url = open_server.url
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/fewshot/victim").status_code == 201  # curl-like: no Origin, not a browser
        r = c.post("/fewshot/victim/examples", files={"file": png((200, 0, 0))}, data={"label": "red"},
                   headers={"Origin": url, "Sec-Fetch-Site": "same-origin"})  # the page itself
        assert r.status_code == 200, r.text
        other_port = f"http://127.0.0.1:{int(url.rsplit(':', 1)[1]) + 1}"  # another local service: same site
        attacks = [{"Origin": EVIL}, {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
                   {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site", "Origin": other_port},
                   {"Origin": other_port}, {"Origin": "null"}, {"Referer": f"{EVIL}/cats.html"}]
        for headers in attacks:  # a multipart form POST as an <form enctype="multipart/form-data"> sends it
            r = c.post("/fewshot/victim/examples", files={"file": png((0, 0, 200))}, data={"label": "pwned"},
                       headers=headers)
            assert r.status_code == 403, (headers, r.text)
            assert "cross-origin POST refused" in r.json()["detail"]
        for method in ("DELETE", "POST"):
            r = c.request(method, "/fewshot/victim" if method == "DELETE" else "/fewshot/other",
                          headers={"Origin": EVIL})
            assert r.status_code == 403, r.text
        assert c.get("/fewshot/victim").json()["classes"] == {"red": 1}
        assert "other" not in {s["name"] for s in c.get("/fewshot").json()}
        # GETs only read: a cross-site page may load them (and cannot read the answers without CORS)
        assert c.get("/models", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_foreign_host_header_is_refused_against_dns_rebinding(open_server):
    port = open_server.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=open_server.url, timeout=30) as c:
        r = c.get("/models", headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 400 and "--allow-host evil.example" in r.json()["detail"]
        assert c.post("/fewshot/rebound", headers={"Host": "evil.example"}).status_code == 400
        assert c.get("/", headers={"Host": "Evil.Example."}).status_code == 400
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "10.1.2.3:8000"):
            assert c.get("/models", headers={"Host": host}).status_code == 200, host
        assert "rebound" not in {s["name"] for s in c.get("/fewshot").json()}


def test_allow_host_adds_a_name(token_server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=token_server.url, timeout=30, headers=auth) as c:
        assert c.get("/models", headers={"Host": "probe.example:443"}).status_code == 200
        assert c.get("/models", headers={"Host": "www.probe.example"}).status_code == 400


def test_token_guards_everything_but_health(token_server):
    url = token_server.url
    assert f"probe serve: {url}/?token={TOKEN} " in token_server.output()  # the URL to open, like Jupyter's
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json()["ready"]  # load balancers probe without the token
        for path in ("/models", "/metrics", "/", "/docs", "/openapi.json", "/static/app.js", "/fewshot"):
            r = c.get(path)
            assert r.status_code == 401, (path, r.text)
        r = c.get("/models")
        assert "needs its token" in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")
        assert c.post("/fewshot/s").status_code == 401
        for wrong in ("Bearer nope", f"Bearer {TOKEN[:-1]}", f"bearer {TOKEN}x"):
            r = c.get("/models", headers={"Authorization": wrong})
            assert r.status_code == 401 and "wrong token" in r.json()["detail"], wrong
        assert c.get("/models", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer " + TOKEN}).status_code == 200
        assert c.post("/fewshot/s", headers={"Authorization": "Bearer " + TOKEN}).status_code == 201
        assert c.get("/models", params={"token": "nope"}).status_code == 401
        assert c.get("/models", params={"token": TOKEN}).status_code == 200
        # the token still does not make a cross-site POST acceptable
        r = c.post("/fewshot/t", headers={"Authorization": "Bearer " + TOKEN, "Origin": EVIL})
        assert r.status_code == 403

    with httpx.Client(base_url=url, timeout=30) as browser:  # like Jupyter: open /?token=…, then the cookie
        r = browser.get("/", params={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/"  # the token leaves the address bar
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"probe-token-{url.rsplit(':', 1)[1]}={TOKEN};")  # one cookie per port
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        page = browser.get("/")
        assert page.status_code == 200 and "probe" in page.text
        assert browser.get("/models").status_code == 200  # the page's fetches, <img> thumbnails
        r = browser.post("/fewshot/s/examples", files={"file": png((0, 200, 0))}, data={"label": "green"},
                         headers={"Origin": url})
        assert r.status_code == 200, r.text
        browser.cookies.clear()
        assert browser.get("/models").status_code == 401


def test_short_body_gets_408_and_the_connection_closes(open_server):
    port = int(open_server.url.rsplit(":", 1)[1])
    head = (b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 1000\r\n\r\n")
    part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG'  # then nothing
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        start = time.monotonic()
        s.sendall(head + part)
        answer = b""
        while chunk := s.recv(65536):  # until the server closes the connection
            answer += chunk
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"--body-timeout" in answer and b"connection: close" in answer.lower()
    assert 0.9 < elapsed < 5, elapsed  # --body-timeout 1; uvicorn's keep-alive (5 s) would be too late
    assert httpx.get(f"{open_server.url}/health").json()["ready"]


def test_binding_beyond_loopback_needs_a_token_or_insecure(tmp_path, monkeypatch):
    """(With a token it starts: token_server binds 0.0.0.0.) Without, one line and exit 1; --insecure starts,
    with a warning — uvicorn.run is replaced here, so nothing listens on every interface without a token."""
    import uvicorn

    from cli.main import app

    args = ["serve", *TINY, "--host", "0.0.0.0", "--port", "8765", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args, env={"PROBE_TOKEN": ""})
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: --host 0.0.0.0") and \
        "--token" in result.output and "--insecure" in result.output

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: served.update(kw))
    result = CliRunner().invoke(app, [*args, "--insecure"], env={"PROBE_TOKEN": ""})
    assert result.exit_code == 0, result.output
    assert served == {"host": "0.0.0.0", "port": 8765, "log_level": "warning"}
    assert "warning: --insecure: anyone who can reach 0.0.0.0" in result.output
    assert "probe serve: http://127.0.0.1:8765/ (docs at /docs)" in result.output


def test_exposure_and_token_rules():
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
        ServeConfig(host=host)
    for host in ("0.0.0.0", "::", "192.168.1.5", "gpu-box"):
        assert not is_loopback(host), host
        with pytest.raises(ProbeError, match="--insecure"):
            ServeConfig(host=host)
        ServeConfig(host=host, token=TOKEN)
        ServeConfig(host=host, insecure=True)
    assert "token" not in repr(ServeConfig(token=TOKEN)) and TOKEN not in repr(ServeConfig(token=TOKEN))
    for bad in ("has space", "semi;colon", "quote\"", "ünï"):
        with pytest.raises(ProbeError, match="letters, digits"):
            check_token(bad)
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "example.com.", "::1")] == \
        ["localhost", "::1", "example.com", "::1"]
    policy = AccessPolicy(hosts=("gpu-box", "*.corp.example"))
    hosts = ("gpu-box:8000", "a.corp.example", "corp.example", "gpu-box.evil")
    assert [policy.host_problem(h) is None for h in hosts] == [True, True, False, False]
    assert AccessPolicy(hosts=("*",)).host_problem("anything.example") is None
