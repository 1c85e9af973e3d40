"""The ``switchbank`` command: the library's commands (build, inspect, bank) plus ``serve``, which
runs this service. The library's own parser knows nothing of the service."""

from __future__ import annotations

import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="run the HTTP server (settings also from SWITCHBANK_* variables)")
    s.add_argument("--bank", help="bank directory")
    s.add_argument("--arch", help="open_clip architecture of the backbone")
    s.add_argument("--weights", help="pretrained backbone weights")
    s.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    s.add_argument("--dtype", help="float32, float16 or bfloat16")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=serve)


def serve(args) -> int:
    for key in ("bank", "arch", "weights", "device", "dtype"):
        val = getattr(args, key)
        if val is not None:
            os.environ[f"SWITCHBANK_{key.upper()}"] = str(val)
    gc.disable()  # until the server is ready, when it freezes what start-up loaded (app/serve.py)
    try:
        from .logs import setup
        setup()  # before the imports below, so that what they log comes out as JSON lines too
        from .threads import engine_thread, import_on
        engine = _engine_thread or engine_thread()
        import_on(engine, "app.main")  # on the engine's thread too (see app/threads.py)
        from .main import create_app
        from .serve import server
        from .settings import Settings
        settings = Settings()
        app = create_app(settings, configure_logging=False, engine_thread=engine)
        server(app, settings, args.host, args.port).run()
    finally:
        gc.enable()
    return 0


_engine_thread: ThreadPoolExecutor | None = None  # made by main() for `serve`, before torch is imported


def main(argv: list[str] | None = None) -> int:
    # Importing torch here, and open_clip and the rest in `serve`, creates about half a million
    # objects that live as long as the process: with the cyclic collector walking them again and
    # again as they piled up, importing the server took 0.6 s longer (3.2 s in all on a 2-core CPU).
    global _engine_thread
    gc.disable()
    try:
        if (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
            from .threads import engine_thread  # imports no torch itself
            _engine_thread = engine_thread()  # before the import below brings torch in on this thread
        from switchbank import cli
    finally:
        gc.enable()
    return cli.main(argv, extend=add_serve)


if __name__ == "__main__":
    sys.exit(main())
