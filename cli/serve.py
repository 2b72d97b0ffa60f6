"""`probe serve`: the HTTP service (embed, classify, search, few-shot) and its search page."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, handles_errors


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
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default: the service has no "
                                                         "authentication)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    state_dir: Path = typer.Option(Path("cache/serve"), "--state-dir", help="Where few-shot sets are kept."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Images per forward pass (1: no micro-batching)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="How long a request waits for others to "
                                                                         "share its forward pass."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Larger uploads get 413."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Larger images get 413 before decoding."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug."),
) -> None:
    """Serve embed / classify / search / few-shot over HTTP with a search page at / (OpenAPI docs at /docs)."""
    import uvicorn

    from probe.serve import ServeConfig, create_app
    from probe.serve.service import LOOPBACK

    cfg = ServeConfig(stores=tuple(store), heads=tuple(head), indexes=tuple(index), backbone=backbone,
                      weights=weights, dtype=dtype, device=device, engine=engine, state_dir=str(state_dir),
                      max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb, max_pixels=max_pixels)
    application = create_app(cfg)
    if host not in LOOPBACK:
        typer.echo(f"warning: binding to {host}: anyone who can reach this address can use the service "
                   "(it has no authentication)", err=True)
    typer.echo(f"probe serve: http://{host}:{port}/ (docs at /docs)", err=True)
    uvicorn.run(application, host=host, port=port, log_level=log_level)
