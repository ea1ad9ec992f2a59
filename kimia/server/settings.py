"""Server settings: one pydantic-settings object, from arguments or `KIMIA_SERVE_*` environment variables.

Everything a deployment may want to bound lives here: upload size, audio duration, request time, the queue of
waiting requests (beyond it: 429) and the batch the engine decodes together. CORS is off unless origins are
listed; the API key is optional (when set, every /v1 route needs `Authorization: Bearer <key>`).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Configuration of one `kimia serve` process (env prefix `KIMIA_SERVE_`, e.g. KIMIA_SERVE_API_KEY)."""

    model_config = SettingsConfigDict(env_prefix="KIMIA_SERVE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    model_name: str = "kimi-audio"
    max_upload_bytes: int = Field(25 * 1024 * 1024, gt=0)
    max_audio_seconds: float = Field(120.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    max_queue: int = Field(64, ge=0, description="requests waiting for the engine; beyond it: 429")
    batch_size: int = Field(8, ge=1, description="most requests decoded together in one engine batch")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the first request of a batch waits for company")
    default_max_tokens: int | None = Field(None, gt=0, description="generation steps when a request sets none "
                                           "(None: the model's context budget)")
    max_tokens_limit: int | None = Field(None, gt=0, description="largest max_tokens a request may ask for")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; empty = CORS off")
    warmup: bool = True
    realtime_max_items: int = Field(32, ge=2, description="conversation items kept per realtime session")
    vad_threshold_db: float = -45.0
    vad_silence_ms: int = Field(500, gt=0)
    vad_prefix_ms: int = Field(300, ge=0)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v
