"""`probe serve`: the HTTP service (embed, classify, search, few-shot) and its search page."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from urllib.parse import quote

import typer

from .app import app, handles_errors


def _check_port(host: str, port: int) -> None:
    """A ProbeError when ``port`` on ``host`` cannot be bound (another server holds it), before probe says it serves
    there: bound the way uvicorn binds (SO_REUSEADDR) and closed at once, so uvicorn can take it."""
    from probe.errors import ProbeError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ProbeError(f"port {port} on {host} is already in use: choose another --port") from None
            raise ProbeError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None


@app.command()
@handles_errors
def serve(
    store: list[str] = typer.Option([], "--store", "-s", help="Feature store to search, as PATH or NAME=PATH "
                                                              "(repeatable; indexed in memory, exact search)."),
    head: list[str] = typer.Option([], "--head", help="Head from probe fit-head, as NAME=PATH or PATH (repeatable)."),
    index: list[str] = typer.Option([], "--index", "-i", help="Index from probe index, as NAME=PATH or PATH "
                                                              "(repeatable)."),
    backbone: str | None = typer.Option(None, "--backbone", "-b", help="Backbone when no store/head/index gives "
                                                                       "one (default efficientnet_lite0)."),
    weights: str | None = typer.Option(None, "--weights", "-w", help="With --backbone: weights tag, 'random' or "
                                                                     "a checkpoint path."),
    dtype: str = typer.Option("auto", "--dtype", help="With --backbone: auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    engine: str = typer.Option("auto", "--engine", help="auto (ONNX Runtime for float32 on the CPU, else torch), "
                                                         "torch or onnxruntime."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Beyond loopback (e.g. 0.0.0.0) it needs "
                                                         "--token, or --insecure."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    state_dir: Path = typer.Option(Path("cache/serve"), "--state-dir", help="Where few-shot sets are kept."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Images per forward pass (1: no micro-batching)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="How long a request waits for others to "
                                                                         "share its forward pass."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Larger uploads get 413."),
    max_pixels: int = typer.Option(
        40_000_000, "--max-pixels",
        help="Images larger than this, or whose resize for the backbone would be, get 413 before decoding."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug."),
    token: str | None = typer.Option(None, "--token", envvar="PROBE_TOKEN", show_default=False,
                                     help="Every request but GET /health must carry it: 'Authorization: Bearer "
                                          "TOKEN', or open /?token=TOKEN in a browser. Prefer PROBE_TOKEN: "
                                          "command lines are visible to other users."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow binding beyond loopback without a token."),
    allow_host: list[str] = typer.Option([], "--allow-host", help="Also answer to this Host name (repeatable; "
                                                                  "'*.example.com', '*'). Loopback names, IP "
                                                                  "addresses and --host are always served."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a request body may stall before 408."),
) -> None:
    """Serve embed / classify / search / few-shot over HTTP with a search page at / (OpenAPI docs at /docs)."""
    import uvicorn

    from probe.serve import ServeConfig, create_app
    from probe.serve.security import is_loopback

    cfg = ServeConfig(stores=tuple(store), heads=tuple(head), indexes=tuple(index), backbone=backbone,
                      weights=weights, dtype=dtype, device=device, engine=engine, state_dir=str(state_dir),
                      max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
                      body_timeout=body_timeout, host=host, token=token, insecure=insecure,
                      allow_hosts=tuple(allow_host))
    application = create_app(cfg)  # a bad file fails first, with its own message
    _check_port(host, port)
    if cfg.token is None and not is_loopback(host):
        typer.echo(f"warning: --insecure: anyone who can reach {host} can use the service (it has no token)",
                   err=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    login = f"?token={quote(cfg.token, safe='')}" if cfg.token else ""
    typer.echo(f"probe serve: http://{shown}:{port}/{login} (docs at /docs)", err=True)
    uvicorn.run(application, host=host, port=port, log_level=log_level)
