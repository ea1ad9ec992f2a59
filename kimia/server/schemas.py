"""Request/response shapes of the OpenAI-compatible routes and the OpenAI-style error body.

Requests are validated with pydantic (unknown fields are accepted and ignored, as OpenAI clients send many);
every failure becomes an `APIError` whose body is `{"error": {"message", "type", "param", "code"}}`.
Kimi-Audio's own sampling knobs (text_/audio_ temperature, top_k, repetition penalty and window) are accepted
as extra fields next to OpenAI's `temperature` (which maps to text_temperature).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered to the client as an OpenAI-style body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class InputAudio(BaseModel):
    data: str
    format: Literal["wav", "mp3", "flac", "ogg"] = "wav"


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "input_text", "input_audio"]
    text: str | None = None
    input_audio: InputAudio | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    audio: dict[str, Any] | None = None  # an earlier assistant audio reference (its transcript is not kept)


class AudioOutput(BaseModel):
    voice: str = "default"
    format: Literal["wav", "pcm16"] = "wav"


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Kimi-Audio sampling (official names). `temperature` (OpenAI) sets text_temperature."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0, le=2)
    text_temperature: float | None = Field(None, ge=0, le=2)
    audio_temperature: float | None = Field(None, ge=0, le=2)
    text_top_k: int | None = Field(None, ge=1)
    audio_top_k: int | None = Field(None, ge=1)
    text_repetition_penalty: float | None = Field(None, gt=0)
    audio_repetition_penalty: float | None = Field(None, gt=0)
    text_repetition_window_size: int | None = Field(None, ge=1)
    audio_repetition_window_size: int | None = Field(None, ge=1)

    def sampling(self) -> dict[str, Any]:
        out = {k: v for k, v in self.model_dump(exclude={"temperature"}).items()
               if k in SamplingFields.model_fields and v is not None}
        if self.temperature is not None and "text_temperature" not in out:
            out["text_temperature"] = self.temperature
        return out


class ChatRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] = Field(default_factory=lambda: ["text"])
    audio: AudioOutput | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    user: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kimia"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
