"""`llmtune serve`: a run or model over HTTP - OpenAI-compatible for causal LMs, `/v1/classify` for classifiers.

Built on FastAPI + uvicorn rather than `transformers serve`: that server loads Hub models by id, while a run here is
often an adapter on its base with the run's own chat template, stop tokens and evaluation precision (loaded by the
CLI exactly as `llmtune generate` loads it, so greedy replies match), classifiers need an endpoint of their own, and
the server needs an API key and bounds on what one request may ask for.

One worker thread owns the model: requests wait their turn in arrival order (none is dropped while fewer than
`max_waiting` wait; beyond that the answer is 503, retry later) and each generation runs alone, so a seed gives the
same sample every time. Errors use OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`, with 4xx codes
for what the client sent, naming the field; every field is checked before work starts, so a stream only begins for a
valid request, and a failure after it has begun ends it with an error event and `[DONE]`. The server keeps serving
after any of them. The API key is compared in constant time and never logged.

Here: `make_app`, `serve` and `check_port_free`. serve_engines.py: what is served, and the limits; serve_requests.py:
the request bodies and their errors; serve_generation.py: generation and streaming; serve_routes.py: the guard, the
error handlers and the endpoints.
"""

from __future__ import annotations

import errno
import logging
import socket

from fastapi import FastAPI

from llmtune.errors import LlmtuneError
from llmtune.inference.loading import LanguageModel
from llmtune.ship.serve_engines import Limits, TextClassifier
from llmtune.ship.serve_routes import (
    Generator,
    ModelQueue,
    add_error_handlers,
    add_guard,
    chat_router,
    classify_router,
    completion_router,
    info_router,
)

__all__ = ["LOCAL_HOSTS", "LanguageModel", "Limits", "TextClassifier", "check_port_free", "make_app", "serve"]

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # addresses only this machine reaches


def make_app(engine: LanguageModel | TextClassifier, name: str, api_key: str | None = None,
             limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `name`."""
    limits = limits or Limits()
    app = FastAPI(title=f"llmtune: {name}", docs_url=None, redoc_url=None)
    queue = ModelQueue(limits.max_waiting)
    routers = [info_router(name)]
    if isinstance(engine, TextClassifier):
        routers.append(classify_router(engine, name, limits, queue))
    else:
        generator = Generator(engine, name, limits, queue)
        routers += [chat_router(generator), completion_router(generator)]
    for router in routers:
        app.include_router(router)
    add_guard(app, api_key, limits)
    add_error_handlers(app, [route.path for router in routers for route in router.routes])
    return app


def check_port_free(host: str, port: int) -> None:
    """Raise LlmtuneError if the server could not listen on host:port - checked before a model takes minutes to load.

    Binds as uvicorn does (SO_REUSEADDR, so a port left in TIME_WAIT by a server that just stopped counts as free)
    and lets go at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise LlmtuneError(f"port {port} on {host} is already in use (by another server?); pick another with "
                                   "--port or stop the other process.") from None
            raise LlmtuneError(f"Cannot listen on port {port} on {host} ({error.strerror or error}); pick another "
                               "--port, or a --host that is an address of this machine.") from None
        except OverflowError:
            raise LlmtuneError(f"--port {port} is not a port number; ports run from 1 to 65535.") from None


def serve(engine: LanguageModel | TextClassifier, name: str, host: str, port: int, api_key: str | None,
          limits: Limits) -> None:
    """Run the server until Ctrl-C."""
    import uvicorn

    kind = "classifier" if isinstance(engine, TextClassifier) else (
        "causal LM, chat template" if engine.chat else "causal LM, no chat template")
    logger.info("Serving '%s' (%s) on http://%s:%d - API key %s", name, kind, host, port,
                "required" if api_key else "not required")
    if api_key is None and host not in LOCAL_HOSTS:
        logger.warning("Listening on %s without an API key: anyone who can reach this port can use the model "
                       "(set LLMTUNE_API_KEY or --api-key).", host)
    uvicorn.run(make_app(engine, name, api_key, limits), host=host, port=port, log_level="info")
