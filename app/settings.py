"""All service settings, from SWITCHBANK_* environment variables (or a .env file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BANK = Path(__file__).resolve().parent.parent / "demo" / "bank"
# the bundled demo bank is served from a copy here, so admin changes never touch tracked files
DEMO_COPY = Path(__file__).resolve().parent.parent / "var" / "demo-bank"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHBANK_", env_file=".env", extra="ignore")

    bank: Path = Field(DEFAULT_BANK, description=(
        "bank directory (created empty if missing and create_bank is set); the bundled demo bank is "
        "served from a copy in var/demo-bank, made on first use"))
    create_bank: bool = Field(False, description="create an empty bank at `bank` if there is none")
    arch: str = Field("switchbank-efficientnet-lite0", description="open_clip architecture of the backbone")
    weights: Path | None = Field(None, description="pretrained backbone weights; the demo architecture finds its own")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: str = Field("float32", description="float32, float16 or bfloat16")
    k: int = Field(10, ge=1, le=1000, description="Auto-Switch neighbours")
    router_metric: Literal["l2", "cosine"] = Field(
        "l2", description="k-NN distance: l2 (the paper's, on raw embeddings) or cosine")
    batch_size: int = Field(16, ge=1, le=1024, description="largest micro-batch")
    batch_wait_ms: float = Field(4.0, ge=0, le=1000, description=(
        "how long a micro-batch waits to fill while other requests are being read or decoded (a lone request runs at once)"))
    cache_bytes: int = Field(2 << 30, ge=1 << 20, description="delta cache budget in bytes")
    hot_after: int = Field(2, ge=0, le=1000, description=(
        "a combination of one switch gets a cached merged tower once it has appeared in this many recent "
        "batches (1: on first use; 0: never, every batch merges just in time)"))
    hot_mix_after: int = Field(8, ge=0, le=1000, description=(
        "the same for a mix of several switches (0: never cached)"))
    mixed_forward: bool = Field(True, description=(
        "run batches that need several combinations in one mixed forward (off: one forward per combination)"))
    resident_bytes: int = Field(1 << 30, ge=1 << 20, description=(
        "memory for switches' bits (2 bits per parameter each); beyond it the least recently used are "
        "unloaded and read again from their files when needed"))
    head_bytes: int = Field(128 << 20, ge=1 << 20, description=(
        "memory for the classification heads of switches read from the bank; a head is read from its switch's "
        "file when a request needs it, and beyond this the least recently used are dropped"))
    pin: str = Field("", description=(
        "comma-separated switch names whose bits and heads stay resident and whose merged weights are built at start-up"))
    router_exact_max: int | None = Field(None, ge=0, description=(
        "distinct query vectors up to which Auto-Switch searches exactly; above, an approximate (IVF) index. "
        "Unset: 200,000 where the CPU's bfloat16 products are fast (AVX512-BF16, AMX), 60,000 elsewhere"))
    router_ready_exact: bool = Field(True, description=(
        "at start-up, route a bank past the exact limit (up to 200,000 distinct query vectors) by exact search "
        "as soon as it is read, and build its IVF index in the background: ready sooner, slower Auto-Switch "
        "routing for the seconds that build takes. Off: ready once the IVF index is built"))
    router_device_bytes: int = Field(2 << 30, ge=0, description=(
        "where the backbone runs on a GPU, device memory for the router's exact index (float32 rows, "
        "searched there in one product); up to what it holds Auto-Switch searches exactly on the GPU, beyond "
        "that on the CPU as without a GPU. 0: the router stays on the CPU"))
    router_nprobe: int | None = Field(None, ge=1, le=4096, description=(
        "lists the approximate index searches per query. Unset: 16, or more on an index whose lists are "
        "small, so that a query scans at least about 9,000 vectors"))
    scratch_bytes: int = Field(256 << 20, ge=1 << 20, description=(
        "scratch memory for weights merged just in time for combinations without a cached tower"))
    queue_limit: int = Field(256, ge=1, description="requests waiting beyond this get 503 + Retry-After")
    upload_limit: int = Field(512 << 20, ge=1024, description="largest admin upload in bytes")
    body_limit: int = Field(32 << 20, ge=1024, description="largest predict request body in bytes")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest decoded image (width x height)")
    batch_items: int = Field(64, ge=1, description="most images in one batch request")
    admin_token: SecretStr | None = Field(None, description=(
        "bearer token for /v1/admin and /v2/repository; those routes are closed without it"))
    sync_seconds: float = Field(2.0, gt=0, description="how often to look for bank changes made by other replicas")
    drain_seconds: int = Field(30, ge=0, description="how long shutdown waits for in-flight requests")
    request_timeout: float = Field(60.0, gt=0, description="a request waiting longer than this gets 503")
    body_timeout: float = Field(30.0, gt=0, description="the whole request body must arrive within this many seconds (408)")
    header_timeout: float = Field(10.0, gt=0, description=(
        "a connection must send a request's complete headers within this many seconds of opening or of "
        "its previous answer, or it is closed"))
    max_connections: int = Field(512, ge=1, description="open connections and requests beyond this get 503")
    decode_concurrency: int = Field(2, ge=1, le=64, description="images decoded at once (bounds their memory)")

    @property
    def pinned(self) -> list[str]:
        return [n.strip() for n in self.pin.split(",") if n.strip()]

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("float32", "float16", "bfloat16"):
            raise ValueError("SWITCHBANK_DTYPE must be float32, float16 or bfloat16")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError("SWITCHBANK_DEVICE must be auto, cpu, cuda or cuda:N")
        return v
