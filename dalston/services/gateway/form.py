"""Reading a multipart upload with bounded memory.

Litestar's `request.form()` spools file parts (1 MB in memory, the rest in a temporary file) but
holds every other field whole in memory, up to the body limit (DALSTON_MAX_UPLOAD_MB): a flood
of requests with a huge `prompt` field would grow the gateway without bound. Here a field that
is not a file is refused past MAX_FIELD_BYTES instead; files are spooled as Litestar does.
"""

from __future__ import annotations

import asyncio

from litestar import Request
from litestar.datastructures import FormMultiDict, UploadFile
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser

from dalston.contracts import MAX_KNOWN_SPEAKERS

# A model id, a language, a prompt (2048 characters, up to 4 bytes each), options: well below.
MAX_FIELD_BYTES = 64 * 1024
# The form has a file and a handful of options.
MAX_PARTS = 64
# Known speakers' clips come as data URLs in text fields (OpenAI's form), up to
# MAX_KNOWN_SPEAKERS of them: 10 s of 16-bit stereo WAV at 48 kHz, in base64, fits.
REFERENCE_FIELDS = ("known_speaker_references[]", "known_speaker_references")
MAX_REFERENCE_BYTES = 3 * 1024 * 1024


class BadForm(ValueError):
    """The request is not a multipart form the gateway reads; `param` names the field at fault,
    `status` is 400, or 408 for a body that stopped coming."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


async def read_form(request: Request) -> FormMultiDict:
    """The request's multipart form: files as spooled UploadFiles, other fields as text."""
    content_type, options = request.content_type
    boundary = options.get("boundary")
    if content_type != "multipart/form-data" or not boundary:
        raise BadForm("send the request as multipart/form-data, with the audio in the field `file`")
    fields: list[tuple[str, str | UploadFile]] = []
    data: UploadFile | bytearray = bytearray()
    segment: MultipartSegment | None = None
    stream = request.stream()
    timeout = request.app.state.settings.body_timeout
    try:
        with PushMultipartParser(boundary.encode(), max_segment_count=MAX_PARTS) as parser:
            while not parser.closed:
                try:  # b"": the end, which the parser must be told
                    chunk = await asyncio.wait_for(anext(stream, b""), timeout)
                except TimeoutError:
                    raise BadForm(f"the request body sent nothing for {timeout:g} s (DALSTON_BODY_TIMEOUT)",
                                  status=408) from None
                for part in parser.parse(chunk):
                    if isinstance(part, MultipartSegment):
                        if part.filename and any(isinstance(v, UploadFile) for _, v in fields):
                            # Spooling every file part would let one request fill the disk.
                            raise BadForm(f"only one file may be sent; `{part.name}` is a second one",
                                          param=part.name)
                        segment = part
                        if segment.name in REFERENCE_FIELDS and sum(
                                name in REFERENCE_FIELDS for name, _ in fields) >= MAX_KNOWN_SPEAKERS:
                            raise BadForm(f"at most {MAX_KNOWN_SPEAKERS} known_speaker_references may be sent",
                                          param="known_speaker_references[]")
                        data = UploadFile(content_type=part.content_type or "application/octet-stream",
                                          filename=part.filename, headers=dict(part.headerlist)) \
                            if part.filename else bytearray()
                    elif part:
                        if isinstance(data, UploadFile):
                            await data.write(part)
                        elif len(data) + len(part) > _limit(segment.name):
                            raise BadForm(f"the field `{segment.name}` is longer than "
                                          f"{_limit(segment.name) // 1024} KB", param=segment.name)
                        else:
                            data.extend(part)
                    else:  # the end of a part
                        if isinstance(data, UploadFile):
                            await data.seek(0)
                            fields.append((segment.name, data))
                        else:
                            fields.append((segment.name, _text(segment, data)))
                        data = bytearray()
    except BaseException as exc:
        for upload in [data, *(value for _, value in fields)]:
            if isinstance(upload, UploadFile):
                await upload.close()
        if isinstance(exc, (ParserError, ParserLimitReached)):
            raise BadForm(f"the multipart form cannot be read: {exc}") from None
        raise
    return FormMultiDict(fields)


def list_values(form: FormMultiDict, name: str) -> list[str]:
    """Every value of a list field, sent as `name[]` (OpenAI's clients) or as `name`."""
    bare = name.removesuffix("[]")
    return [str(v) for key in (f"{bare}[]", bare) if key in form for v in form.getall(key)]


def _limit(field: str) -> int:
    return MAX_REFERENCE_BYTES if field in REFERENCE_FIELDS else MAX_FIELD_BYTES


def _text(segment: MultipartSegment, data: bytearray) -> str:
    try:
        return data.decode(segment.charset or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        raise BadForm(f"the field `{segment.name}` has an unknown charset {segment.charset[:40]!r}",
                      param=segment.name) from None
