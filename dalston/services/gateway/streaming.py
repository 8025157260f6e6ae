"""OpenAI's streamed transcription (`stream=true`): Server-Sent Events while the job runs.

A `transcript.text.delta` for each segment as an engine decodes it (the deltas joined are the
text), then `transcript.text.done` with the job's final text and usage; a job that fails or
outlasts the request's timeout ends the stream with an error in OpenAI's shape, which the
`openai` client raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from dalston.contracts import FAILURE_STATUS, TranscriptDelta
from dalston.services.intake.jobs import FollowedJob, TranscriptGone

# Whisper's encoder turns each 30 s window into 1500 positions: the audio's input tokens.
AUDIO_TOKENS_PER_SECOND = 50


def _event(body: dict[str, Any]) -> str:
    return msgspec.json.encode(body).decode()


def _error(status: int, message: str, code: str) -> str:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _event({"error": {"message": message, "type": kind, "param": None, "code": code}})


async def transcript_events(followed: FollowedJob, timeout: float) -> AsyncIterator[str]:
    """The SSE data of a followed job, one JSON event each."""
    said_anything = False
    try:
        async for item in followed.events(timeout):
            if isinstance(item, TranscriptDelta):
                if text := item.segment.text.strip():
                    # The final text joins segments with one space.
                    yield _event({"type": "transcript.text.delta",
                                  "delta": f" {text}" if said_anything else text})
                    said_anything = True
            elif item.status == "completed":
                try:
                    transcript = await followed.jobs.transcript(item)
                except TranscriptGone as exc:
                    yield _error(exc.status_code, exc.detail, exc.code)
                    return
                audio_tokens = round(transcript.duration * AUDIO_TOKENS_PER_SECOND)
                text_tokens = sum(len(s.tokens) for s in transcript.segments)
                yield _event({"type": "transcript.text.done", "text": transcript.text, "usage": {
                    "type": "tokens", "input_tokens": audio_tokens, "output_tokens": text_tokens,
                    "total_tokens": audio_tokens + text_tokens,
                    "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0}}})
            else:
                code = item.failure.code if item.failure else "internal"
                message = item.failure.message if item.failure else f"job ended {item.status}"
                yield _error(FAILURE_STATUS[code], message, code)
    except TimeoutError:
        yield _error(504, f"transcription did not finish within {timeout:g} s "
                          "(DALSTON_REQUEST_TIMEOUT); use /v1/jobs for long files", "timeout")
