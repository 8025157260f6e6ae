"""Known speakers: OpenAI's `known_speaker_names[]` and `known_speaker_references[]` on a
transcription form, and the voices an API key enrolls (`/v1/voices`).

The gateway runs no model: it decodes a clip (at most MAX_VOICE_CLIP_SECONDS) to 16 kHz PCM and
asks a diarize engine for its embedding (`voices.embed.<runtime>`). A job carries its known
speakers' names and embeddings, never their audio, and a stored voice is its name and embedding
alone, in the `voices` bucket, which only the gateway reads: a voice belongs to the key that
enrolled it, as a job does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import tempfile
import unicodedata
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from litestar import Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import NotFoundException

from dalston.audio import AudioTooLong, InvalidAudio, decode
from dalston.bus.buckets import Bucket
from dalston.catalog import ModelSpec
from dalston.config import Settings
from dalston.contracts import (
    MAX_KNOWN_SPEAKERS,
    MAX_SPEAKER_NAME_CHARS,
    MAX_VOICE_CLIP_SECONDS,
    MIN_VOICE_CLIP_SECONDS,
    VOICE_EMBEDS,
    VOICES_BUCKET,
    ContractError,
    Voice,
    VoiceEmbedReply,
    VoiceEmbedRequest,
    encode,
    now,
    subject_token,
)
from dalston.contracts import decode as decode_message
from dalston.engines import EngineWatch, how_to_start
from dalston.pcm import SAMPLE_RATE, to_pcm16
from dalston.services.gateway.auth import job_owner, visible_owner
from dalston.services.gateway.form import BadForm, list_values, read_form
from dalston.services.gateway.intake import ApiError

NAMES = "known_speaker_names[]"
REFERENCES = "known_speaker_references[]"
# An engine loads its model on first use: an embedding may wait for that.
EMBED_TIMEOUT_SECONDS = 60.0
# Voices one key may keep.
MAX_VOICES_PER_KEY = 100


_VOICE_ID = re.compile(r"voice_[0-9a-f]{32}")
# The labels of speakers no voice names: a known speaker called so would be taken for one.
_ANONYMOUS = re.compile(r"(?:CH\d+_)?SPEAKER_\d+")


def asks_known_speakers(form) -> bool:
    return bool(list_values(form, NAMES) or list_values(form, REFERENCES))


async def known_speakers(request: Request, form) -> list[dict[str, Any]]:
    """The form's known speakers as `KnownSpeaker` fields: each name with the embedding of its
    reference clip, or with no references, of the calling key's stored voice of that name."""
    names = [checked_name(name, NAMES) for name in list_values(form, NAMES)]
    references = list_values(form, REFERENCES)
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise ApiError(400, f"at most {MAX_KNOWN_SPEAKERS} known speakers may be named", param=NAMES)
    if len(set(names)) < len(names):
        raise ApiError(400, "each known speaker name may be given once", param=NAMES)
    if references and len(references) != len(names):
        raise ApiError(400, f"{len(names)} known_speaker_names and {len(references)} "
                            "known_speaker_references were sent: give one reference per name", param=REFERENCES)
    if not references:
        book = await voice_book(request)
        stored = {v.name: v for v in await book.owned(job_owner(request))}
        missing = [name for name in names if name not in stored]
        if missing:
            raise ApiError(400, f"no voice named {missing[0]!r} is enrolled for this key (POST /v1/voices), "
                                "and no known_speaker_references were sent", param=NAMES)
        model = diarize_model(request)
        stale = [n for n in names if stored[n].model != model.id]
        if stale:
            # Another model's embeddings are not comparable with this one's.
            raise ApiError(400, f"the voice {stale[0]!r} was enrolled with {stored[stale[0]].model}, and "
                                f"speakers are now told apart by {model.id}: enroll it again", param=NAMES)
        return [{"name": n, "embedding": stored[n].embedding, "model": stored[n].model} for n in names]
    clips = [await clip_samples(reference_bytes(ref, i), f"known_speaker_references ({i})")
             for i, ref in enumerate(references)]
    model = diarize_model(request)
    embeddings = [await embed(request, model, clip) for clip in clips]
    return [{"name": n, "embedding": e, "model": model.id} for n, e in zip(names, embeddings)]


def checked_name(name: str, param: str) -> str:
    if not name:
        raise ApiError(400, "a speaker name may not be empty", param=param)
    if len(name) > MAX_SPEAKER_NAME_CHARS:
        raise ApiError(400, f"a speaker name may be at most {MAX_SPEAKER_NAME_CHARS} characters; "
                            f"one has {len(name)}", param=param)
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ApiError(400, "a speaker name may not hold control characters", param=param)
    if _ANONYMOUS.fullmatch(name):
        raise ApiError(400, f"{name!r} is how unnamed speakers are labelled; pick another name", param=param)
    return name


def reference_bytes(reference: str, index: int) -> bytes:
    """The audio of a data URL (`data:audio/wav;base64,...`), as OpenAI's clients send it."""
    head, comma, payload = reference.partition(",")
    if not (head.startswith("data:") and comma and head.endswith(";base64")):
        raise ApiError(400, f"known_speaker_references ({index}) must be a base64 data URL of audio "
                            "(data:audio/wav;base64,...)", param=REFERENCES)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"known_speaker_references ({index}) is not valid base64",
                       param=REFERENCES) from None


async def clip_samples(audio: bytes | io.IOBase, what: str, param: str = REFERENCES) -> np.ndarray:
    """A voice clip decoded to 16 kHz mono float32; 400 for what is not audio, or not
    MIN..MAX_VOICE_CLIP_SECONDS long."""
    def run() -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="dalston-voice-") as directory:
            source = io.BytesIO(audio) if isinstance(audio, bytes) else audio
            prepared = decode(source, Path(directory), max_duration=MAX_VOICE_CLIP_SECONDS, max_channels=1)
            if not prepared.channels:
                return np.zeros(0, np.float32)
            return np.fromfile(prepared.channels[0], dtype=np.float32)

    try:
        samples = await asyncio.to_thread(run)
    except AudioTooLong:
        raise ApiError(400, f"{what}: a voice clip may last at most {MAX_VOICE_CLIP_SECONDS:g} s",
                       code="invalid_audio", param=param) from None
    except InvalidAudio as exc:
        raise ApiError(400, f"{what} is not audio: {exc}", code="invalid_audio", param=param) from None
    seconds = len(samples) / SAMPLE_RATE
    if seconds < MIN_VOICE_CLIP_SECONDS:
        raise ApiError(400, f"{what} lasts {seconds:.2f} s; a voice clip needs at least "
                            f"{MIN_VOICE_CLIP_SECONDS:g} s", code="invalid_audio", param=param)
    if seconds > MAX_VOICE_CLIP_SECONDS:
        raise ApiError(400, f"{what}: a voice clip may last at most {MAX_VOICE_CLIP_SECONDS:g} s",
                       code="invalid_audio", param=param)
    return samples


def diarize_model(request: Request) -> ModelSpec:
    settings: Settings = request.app.state.settings
    return request.app.state.catalog.model(settings.diarize_model)


async def embed(request: Request, model: ModelSpec, clip: np.ndarray) -> list[float]:
    """The embedding of `clip` by `model`, from one of its runtime's engines."""
    bus = request.app.state.bus
    pcm16 = to_pcm16(clip[:int(MAX_VOICE_CLIP_SECONDS * SAMPLE_RATE)])
    try:
        reply = await bus.request(VOICE_EMBEDS, VoiceEmbedRequest(model=model.runtime_model_id, pcm16=pcm16),
                                  timeout=EMBED_TIMEOUT_SECONDS, runtime=subject_token(model.runtime))
    except ContractError:
        reply = VoiceEmbedReply(error="the engine's answer could not be read")
    if reply is None:
        watch: EngineWatch = request.app.state.engines
        if not watch.live(model.runtime):
            raise ApiError(503, f"no {model.runtime} engine is running to embed the voice: "
                                f"{how_to_start(model.runtime)}", code="no_engine")
        raise ApiError(504, f"no {model.runtime} engine embedded the voice within {EMBED_TIMEOUT_SECONDS:g} s",
                       code="timeout")
    if reply.error is not None or not reply.embedding:
        raise ApiError(500, f"the voice could not be embedded: {reply.error}", code="internal")
    return reply.embedding


class VoiceBook:
    """The `voices` bucket: enrolled voices by id, each with the key that owns it."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket

    async def owned(self, owner: str | None, *, everyone: bool = False) -> list[Voice]:
        """`owner`'s voices (every voice with `everyone`), oldest first."""
        voices = []
        for key in await self._bucket.keys():
            entry = await self._bucket.get(key)
            if entry is not None:
                voice = decode_message(entry[0], Voice)
                if everyone or voice.owner == owner:
                    voices.append(voice)
        return sorted(voices, key=lambda v: v.created_at)

    async def get(self, voice_id: str, owner: str | None, *, everyone: bool = False) -> Voice | None:
        entry = await self._bucket.get(voice_id) if _VOICE_ID.fullmatch(voice_id) else None
        voice = decode_message(entry[0], Voice) if entry else None
        return voice if voice is not None and (everyone or voice.owner == owner) else None

    async def add(self, voice: Voice) -> None:
        await self._bucket.create(voice.id, encode(voice))

    async def remove(self, voice_id: str) -> None:
        await self._bucket.purge(voice_id)


async def voice_book(request: Request) -> VoiceBook:
    # Opened on first use: the NATS connection comes up in the app's lifespan.
    state = request.app.state
    if "voices" not in state:
        state.voices = VoiceBook(await state.bus.bucket(VOICES_BUCKET))
    return state.voices


def _shown(voice: Voice) -> dict[str, Any]:
    return {"id": voice.id, "object": "voice", "name": voice.name, "model": voice.model,
            "created_at": int(voice.created_at)}


def _everyone(request: Request) -> bool:
    """An admin key (or a gateway that demands none) sees every key's voices, as it sees their jobs."""
    return visible_owner(request) is None


@post("/v1/voices", status_code=201,
      summary="Enroll a voice: its name and a 1.5-10 s clip (only its embedding is kept)")
async def enroll_voice(request: Request) -> dict[str, Any]:
    try:
        form = await read_form(request)
    except BadForm as exc:
        raise ApiError(exc.status, str(exc), param=exc.param) from None
    try:
        name = checked_name(str(form.get("name") or ""), "name")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the multipart field `file` (a clip of the voice) is missing", param="file")
        clip = await clip_samples(upload.file, "the clip", param="file")
    finally:
        for value in form.values():
            if isinstance(value, UploadFile):
                await value.close()
    owner = job_owner(request)
    book = await voice_book(request)
    voices = await book.owned(owner)
    if any(v.name == name for v in voices):
        raise ApiError(409, f"a voice named {name!r} is enrolled already; delete it first", code="voice_exists",
                       param="name")
    if len(voices) >= MAX_VOICES_PER_KEY:
        raise ApiError(400, f"a key may keep at most {MAX_VOICES_PER_KEY} voices; delete some", param="name")
    model = diarize_model(request)
    voice = Voice(id=f"voice_{uuid.uuid4().hex}", name=name, embedding=await embed(request, model, clip),
                  model=model.id, owner=owner, created_at=now())
    await book.add(voice)
    return _shown(voice)


@get("/v1/voices", summary="The voices enrolled for this key")
async def list_voices(request: Request) -> dict[str, Any]:
    voices = await (await voice_book(request)).owned(job_owner(request), everyone=_everyone(request))
    return {"object": "list", "data": [_shown(v) for v in voices]}


@delete("/v1/voices/{voice_id:str}", status_code=200, summary="Forget an enrolled voice")
async def delete_voice(request: Request, voice_id: str) -> dict[str, Any]:
    book = await voice_book(request)
    voice = await book.get(voice_id, job_owner(request), everyone=_everyone(request))
    if voice is None:
        raise NotFoundException(f"no voice {voice_id}")
    await book.remove(voice.id)
    return {"id": voice.id, "object": "voice", "deleted": True}
