"""`probe serve`: one long-running process that loads a backbone, heads, indexes and few-shot sets once and answers
HTTP requests (FastAPI + uvicorn, OpenAPI schema at /docs), with a search page at /.

    errors.py        the 4xx a caller can cause, each with the status it maps to
    images.py        uploads -> RGB images (the decoder of probe.data, from bytes), with size and pixel limits
    batching.py      dynamic micro-batching: concurrent requests share one forward pass
    fewshot_sets.py  named few-shot class sets (prototype head), persisted as .npz (no pickle)
    service.py       ServeConfig + Service: everything the endpoints do, one method each, no HTTP
    security.py      who may ask: Host allowlist (DNS rebinding), cross-origin check (CSRF), bearer token
    app.py           the FastAPI app: parse the request, call one Service method, map errors to 4xx
    process.py       run `python -m probe serve` on a free loopback port (tests, benchmarks)
    static/          the search page (plain HTML + JS, no build step)

Example:
    >>> from probe.serve import ServeConfig, create_app
    >>> app = create_app(ServeConfig(stores=("cache/demo.h5",), heads=("linear=heads/demo.safetensors",)))
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from .app import create_app
from .service import ServeConfig, Service, load_service

__all__ = ["ServeConfig", "Service", "create_app", "load_service"]
