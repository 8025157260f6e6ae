"""Fetching the audio of a request that names it by URL (ElevenLabs' cloud_storage_url,
source_url) rather than uploading it.

The URL is anyone's input, so it is checked as a webhook target is (dalston/webhook_targets.py:
http(s), public addresses unless DALSTON_FETCH_ALLOW_PRIVATE) and fetched from the very address
checked, redirects not followed (each hop would be a new, unchecked target), the whole download
within DALSTON_FETCH_TIMEOUT and DALSTON_MAX_UPLOAD_MB, at DALSTON_FETCH_MIN_KB_PER_SECOND on
average at least (a source that drips is cut), spooled to a temporary file as an upload is."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httpx
from litestar.datastructures import UploadFile

from dalston import __version__
from dalston.config import Settings
from dalston.webhook_targets import RefusedTarget, check_target

# Spooled in memory up to this, as Litestar spools uploads; the rest in a temporary file.
SPOOL_BYTES = 1024 * 1024
# The source has this long to connect and answer, and the floor rate counts from then.
FETCH_GRACE_SECONDS = 5.0


class FetchFailed(ValueError):
    """The audio could not be fetched; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def fetch_audio(url: str, settings: Settings) -> UploadFile:
    """The audio at `url`, spooled; FetchFailed if it is refused, too large or not there."""
    try:
        target = await check_target(url, settings.fetch_allow_private, "DALSTON_FETCH_ALLOW_PRIVATE")
    except RefusedTarget as exc:
        raise FetchFailed(422, f"the audio URL is refused: {exc}") from None
    limit = int(settings.max_upload_mb * 1024 * 1024)
    name = urlsplit(url).path.rsplit("/", 1)[-1] or "audio"
    audio = UploadFile(content_type="application/octet-stream", filename=name[:255], max_spool_size=SPOOL_BYTES)
    try:
        async with asyncio.timeout(settings.fetch_timeout):
            await _download(target.pinned_url, target.netloc, target.host, limit,
                            settings.fetch_min_kb_per_second * 1024, audio)
    except TimeoutError:
        await audio.close()
        raise FetchFailed(400, f"the audio URL was not fetched within {settings.fetch_timeout:g} s "
                               "(DALSTON_FETCH_TIMEOUT)") from None
    except httpx.HTTPError as exc:
        await audio.close()
        raise FetchFailed(400, f"the audio URL could not be fetched: {type(exc).__name__}: {exc}") from None
    except BaseException:
        await audio.close()
        raise
    await audio.seek(0)
    return audio


async def _download(pinned_url: str, netloc: str, host: str, limit: int, floor: float, into: UploadFile) -> None:
    headers = {"host": netloc, "user-agent": f"Dalston/{__version__}"}
    started = time.monotonic()
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=FETCH_GRACE_SECONDS) as http:
        # To the address just checked, with TLS checked against the name.
        async with http.stream("GET", pinned_url, headers=headers,
                               extensions={"sni_hostname": host}) as response:
            if response.is_redirect:
                raise FetchFailed(400, f"the audio URL answered {response.status_code} (a redirect, "
                                       "not followed: give the final URL)")
            if not response.is_success:
                raise FetchFailed(400, f"the audio URL answered {response.status_code}")
            if int(response.headers.get("content-length") or 0) > limit:
                raise FetchFailed(413, "the audio is larger than DALSTON_MAX_UPLOAD_MB")
            read = 0
            chunks = aiter(response.aiter_bytes())
            while True:
                # The bytes so far buy the time until the next chunk must come.
                left = started + FETCH_GRACE_SECONDS + read / floor - time.monotonic()
                try:
                    chunk = await asyncio.wait_for(anext(chunks), max(left, 0.0))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise FetchFailed(400, f"the audio URL sent {read} bytes in {time.monotonic() - started:.0f} s, "
                                           f"below {floor / 1024:g} KB/s (DALSTON_FETCH_MIN_KB_PER_SECOND)") from None
                read += len(chunk)
                if read > limit:
                    raise FetchFailed(413, "the audio is larger than DALSTON_MAX_UPLOAD_MB")
                await into.write(chunk)
