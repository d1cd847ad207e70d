"""`python -m sdbatch serve --model SRC [--host H] [--port P] [--replicas N|auto]`."""

from __future__ import annotations

import argparse
import sys

from sdbatch.safeguards import add_arguments as add_safeguard_arguments


def _replicas(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError("must be a positive integer or 'auto'")
    return value


def add_serve_parser(sub) -> None:
    """The `serve` subcommand on `python -m sdbatch`'s subparsers."""
    serve = sub.add_parser("serve", help="serve the AUTOMATIC1111 web API and a web page on Ray Serve")
    serve.add_argument("--model", required=True, help=".safetensors / .ckpt / diffusers folder, local path or fsspec URI, "
                       "or builtin:shapes (sdbatch's small built-in demo model: 64x64)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=7860, help="HTTP port (default: %(default)s, A1111's)")
    serve.add_argument("--replicas", type=_replicas, default=None,
                       help="model replicas: N, or 'auto' to autoscale (default: one per GPU, or 1 on CPU)")
    serve.add_argument("--max-batch-size", type=int, default=None,
                       help="images per model call, across requests (default: 8 on GPU, 4 on CPU)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    serve.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_safeguard_arguments(serve)
    serve.set_defaults(handler=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Starts Ray Serve's HTTP proxy on host:port, deploys the app and serves until Ctrl-C or
    SIGTERM (e.g. `ray job stop`), which shut the app down; exit 0."""
    import signal
    import threading

    import ray
    from ray import serve

    from sdbatch.serve.app import SAFEGUARD_ARGS, build

    if not ray.is_initialized():
        ray.init(address=args.address, logging_level="WARNING")
    # built first: bad arguments and safeguard files fail before Serve starts
    app = build({"model": args.model, "replicas": args.replicas, "max_batch_size": args.max_batch_size,
                 "dtype": args.dtype, **{k: getattr(args, k) for k in SAFEGUARD_ARGS}})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="sdbatch", route_prefix="/")
    print(f"serving on http://{args.host}:{args.port}/ (API: /sdapi/v1/, docs: /docs); Ctrl-C stops",
          file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping", file=sys.stderr)
    serve.delete("sdbatch")
    return 0
