"""The FastAPI application: ``create_app(settings)``; everything heavy loads in the lifespan."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from switchbank import __version__
from switchbank.allocator import use_huge_pages
from switchbank.backbone import load_backbone
from switchbank.bank import Bank
from switchbank.engine import Engine
from switchbank.errors import SwitchBankError

from . import errors, logs
from .batching import MicroBatcher
from .metrics import Metrics
from .middleware import RequestContext
from .routes import admin, health, predict, repository, switches, v2
from .settings import DEFAULT_BANK, DEMO_COPY, Settings
from .threads import engine_thread as new_engine_thread
from .threads import run_apart

log = logging.getLogger("switchbank.app")


class StartupError(RuntimeError):
    """A setting or the bank is unusable; the message says what to fix."""


def _bank_dir(settings: Settings) -> Path:
    """The bank to serve: the bundled demo bank is copied to var/demo-bank and served from there,
    so that uploads and deletes never modify the repository's tracked files. The copy is made again
    when the bundled bank changes (its manifest's hash is kept beside the copy)."""
    path = Path(settings.bank)
    if path.resolve() != DEFAULT_BANK.resolve():
        return path
    source = hashlib.sha256((DEFAULT_BANK / "manifest.json").read_bytes()).hexdigest()
    marker = DEMO_COPY.with_name(DEMO_COPY.name + ".from")
    if not (DEMO_COPY / "manifest.json").is_file() or not marker.is_file() or marker.read_text() != source:
        DEMO_COPY.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-bank-", dir=DEMO_COPY.parent))  # servers may start together
        shutil.copytree(DEFAULT_BANK, tmp / "bank", ignore=shutil.ignore_patterns(".lock", ".tmp-*"))
        old = DEMO_COPY.with_name(f".old-{os.getpid()}")
        if DEMO_COPY.exists():
            DEMO_COPY.rename(old)
        try:
            (tmp / "bank").rename(DEMO_COPY)
        except OSError:  # another server put its copy there first: use that one
            pass
        marker.write_text(source)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        log.info("serving the bundled demo bank from a copy in %s", DEMO_COPY)
    return DEMO_COPY


def _load(settings: Settings) -> tuple[Bank, Engine]:
    try:
        bank = Bank(_bank_dir(settings), create=settings.create_bank)
    except SwitchBankError as exc:
        raise StartupError(f"cannot open the bank (SWITCHBANK_BANK={settings.bank}): {exc}") from None
    try:
        backbone = load_backbone(settings.arch, settings.weights, settings.device, settings.dtype)
    except (SwitchBankError, OSError, RuntimeError) as exc:
        raise StartupError(f"cannot load the backbone (SWITCHBANK_ARCH={settings.arch}, "
                           f"SWITCHBANK_WEIGHTS={settings.weights}): {exc}") from None
    engine = Engine(backbone, k=settings.k, cache_bytes=settings.cache_bytes, router_metric=settings.router_metric,
                    hot_after=settings.hot_after, hot_mix_after=settings.hot_mix_after,
                    mixed_forward=settings.mixed_forward,
                    scratch_bytes=settings.scratch_bytes, resident_bytes=settings.resident_bytes,
                    router_exact_max=settings.router_exact_max, router_nprobe=settings.router_nprobe,
                    router_ready_exact=settings.router_ready_exact,
                    router_device_bytes=settings.router_device_bytes, head_bytes=settings.head_bytes)
    engine.sync(bank)
    if settings.pinned:
        try:
            engine.pin(settings.pinned)
        except SwitchBankError as exc:
            raise StartupError(f"SWITCHBANK_PIN={settings.pin}: {exc}") from None
    return bank, engine


async def _watch_bank(app: FastAPI) -> None:
    """Pick up changes other replicas make to a shared bank directory."""
    state = app.state
    while True:
        await asyncio.sleep(state.settings.sync_seconds)
        try:
            await run_apart(state.engine.sync, state.bank)
        except Exception:
            log.exception("bank sync failed; serving the previous set of switches")


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    s: Settings = state.settings
    engine_thread = state.engine_thread or new_engine_thread()
    try:  # loaded on the thread that will run its batches (see app/threads.py)
        state.bank, state.engine = await asyncio.get_running_loop().run_in_executor(engine_thread, _load, s)
    except BaseException:
        engine_thread.shutdown(wait=False)
        raise
    state.engine.on_materialise = state.metrics.materialise.observe
    state.engine.resident.on_load = state.metrics.switch_load.observe
    state.batcher = MicroBatcher(state.engine, max_batch=s.batch_size, max_wait_s=s.batch_wait_ms / 1000,
                                 queue_limit=s.queue_limit, timeout_s=s.request_timeout,
                                 on_batch=state.metrics.batch_size.observe, executor=engine_thread)
    state.batcher.start()
    state.decode_slots = asyncio.Semaphore(s.decode_concurrency)
    watcher = asyncio.create_task(_watch_bank(app))
    state.ready = True
    log.info("ready: %d switches, bank generation %d, device %s", len(state.engine.switches),
             state.engine.generation, state.engine.backbone.device)
    try:
        yield
    finally:
        state.ready = False
        state.not_ready_reason = "shutting down"
        watcher.cancel()
        await state.batcher.stop()


def create_app(settings: Settings | None = None, *, configure_logging: bool = True,
               engine_thread: ThreadPoolExecutor | None = None) -> FastAPI:
    """The app; ``engine_thread``: the single-thread executor that will load and run the engine, where
    the caller made it already (``switchbank serve`` imports torch on it: see app/cli.py)."""
    settings = settings or Settings()
    use_huge_pages()  # before the lifespan loads the backbone
    if configure_logging:
        logs.setup()
    app = FastAPI(title="switchbank", version=__version__, lifespan=lifespan,
                  description="Many fine-tuned vision models from one backbone, with binary task switches.")
    app.state.settings = settings
    app.state.engine_thread = engine_thread
    app.state.ready = False
    app.state.metrics = Metrics(app.state)
    errors.install(app)
    for r in (predict.router, switches.router, admin.router, health.router, v2.router, repository.router):
        app.include_router(r)
    app.add_middleware(RequestContext, settings=settings, metrics=app.state.metrics)
    return app
