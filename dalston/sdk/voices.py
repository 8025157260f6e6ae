"""Voice embeddings on an engine: the gateway asks for the embedding of a short clip (a known
speaker's reference, a voice to enroll), and one engine of the runtime answers.

The engines of a runtime whose actor is a `VoiceEmbedder` form a queue group on
`voices.embed.<runtime>`; NATS hands each `VoiceEmbedRequest` to one of them. The clip is
embedded beside the batch task under way, on the same loaded model (leased while it is used),
one clip at a time: a clip is at most MAX_VOICE_CLIP_SECONDS, so each takes milliseconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from dalston.bus.connection import Bus
from dalston.contracts import VOICE_EMBEDS, ContractError, VoiceEmbedReply, VoiceEmbedRequest, subject_token
from dalston.logs import get_logger
from dalston.pcm import SAMPLE_RATE, from_pcm16
from dalston.sdk.actor import TaskFailed
from dalston.sdk.models import ModelManager

log = get_logger("dalston.engine.voices")


class VoiceEmbedder:
    """An actor whose models embed voices (diarize): mixed into its ModelActor."""

    def embed_voice(self, handle: Any, clip: np.ndarray) -> np.ndarray:
        """The unit embedding of 16 kHz float32 `clip` by the loaded model `handle` (blocking,
        runs in a thread); TaskFailed where this model cannot."""
        raise NotImplementedError


class VoiceHost:
    """Answers the embed requests of one engine's runtime."""

    def __init__(self, runtime: str, actor: VoiceEmbedder, models: ModelManager) -> None:
        self.runtime, self.actor, self.models = runtime, actor, models
        self._subscription = None

    async def start(self, bus: Bus) -> None:
        token = subject_token(self.runtime)
        # The endpoint answers one request at a time: one clip is embedded at a time.
        self._subscription = await bus.serve(VOICE_EMBEDS, self._on_request, queue=f"voices-{token}",
                                             on_invalid=self._on_invalid, runtime=token)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def _on_invalid(self, exc: ContractError) -> VoiceEmbedReply:
        return VoiceEmbedReply(error=f"bad embed request: {exc}"[:500])

    async def _on_request(self, request: VoiceEmbedRequest) -> VoiceEmbedReply:
        try:
            clip = from_pcm16(request.pcm16, SAMPLE_RATE)
            async with self.models.use(request.model) as handle:
                embedding = await asyncio.to_thread(self.actor.embed_voice, handle, clip)
            reply = VoiceEmbedReply(embedding=[float(v) for v in embedding])
        except TaskFailed as exc:
            reply = VoiceEmbedReply(error=exc.message)
        except Exception as exc:  # noqa: BLE001 - the requester hears why, the engine goes on
            log.exception("voice not embedded", model=request.model)
            reply = VoiceEmbedReply(error=f"{type(exc).__name__}: {exc}"[:500])
        return reply
