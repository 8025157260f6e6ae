"""`dalston transcribe FILE...`: submit each file as a job, wait, print (or write) the transcripts."""

from __future__ import annotations

import sys
from pathlib import Path

from dalston.cli.client import SUBMIT_GRACE, Client, add_server_option, connect
from dalston.cli.output import CliError, StatusLine, error
from dalston.config import Settings
from dalston.contracts import JobRecord
from dalston.formatting import stages
from dalston.transcript import FORMATS

SUFFIX = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt", "verbose_json": ".json",
          "diarized_json": ".json"}


def register(commands) -> None:
    parser = commands.add_parser("transcribe", help="transcribe audio files",
                                 description="Transcribe audio files; starts Dalston here if none runs.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("-m", "--model", default="", help="a model id of `dalston models` (default: the server's)")
    parser.add_argument("-l", "--language", default="", help="language code, e.g. en (default: detect)")
    parser.add_argument("-f", "--format", default="text", choices=list(FORMATS))
    parser.add_argument("--diarize", action="store_true", help="say who spoke (speaker labels)")
    parser.add_argument("--speakers", type=int, metavar="N", help="how many speakers (with --diarize)")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT",
                        help="write here instead of stdout: a file, or a folder for several inputs")
    parser.add_argument("--stream", action="store_true",
                        help="print the text as it is decoded (plain text on stdout)")
    add_server_option(parser)
    parser.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}", code=2)
    if args.stream and (args.output is not None or args.format != "text"):
        raise CliError("--stream prints plain text on stdout: leave out -o and -f", code=2)
    client = connect(args, settings, start=True)
    if args.stream:
        return 1 if sum(not _stream(client, path, args, len(args.files) > 1) for path in args.files) else 0
    # All submitted first, so the server works on them together.
    jobs = [(path, _submit(client, path, args)) for path in args.files]
    failed = 0
    try:
        for path, job_id in jobs:
            failed += not _finish(client, path, job_id, args, several=len(jobs) > 1)
    except KeyboardInterrupt:
        for _, job_id in jobs:
            client.request("DELETE", f"/v1/jobs/{job_id}")
        error("interrupted; jobs cancelled")
        return 130
    return 1 if failed else 0


def _submit(client: Client, path: Path, args) -> str:
    with path.open("rb") as audio:
        response = client.request("POST", "/v1/jobs", files={"file": (path.name, audio)},
                                  data={"model": args.model, "language": args.language,
                                        **_speaker_fields(args)})
    return response.json()["id"]


def _speaker_fields(args) -> dict[str, str]:
    if args.speakers is not None and not args.diarize:
        raise CliError("--speakers goes with --diarize", code=2)
    return {"diarize": "true", **({"num_speakers": str(args.speakers)} if args.speakers else {})} \
        if args.diarize else {}


def _stream(client: Client, path: Path, args, several: bool) -> bool:
    """Print one file's text word by word as it is decoded; False (reason on stderr) if it failed."""
    if several:
        print(f"==> {path} <==")
    try:
        with path.open("rb") as audio:
            for event in client.events("/v1/audio/transcriptions", files={"file": (path.name, audio)},
                                       data={"model": args.model, "language": args.language, "stream": "true"}):
                if event.get("type") == "transcript.text.delta":
                    sys.stdout.write(event["delta"])
                    sys.stdout.flush()
    except CliError as exc:
        sys.stdout.write("\n")
        error(f"{path}: {exc.message}")
        return False
    sys.stdout.write("\n")
    sys.stdout.flush()
    return True


def _finish(client: Client, path: Path, job_id: str, args, several: bool) -> bool:
    """Wait for one job and deliver its transcript; False (reason on stderr) if it failed."""
    with StatusLine() as line:
        record = client.wait(job_id, lambda r: line.show(f"{path.name}: {r.status} {stages(r)}"),
                             unrecorded_grace=SUBMIT_GRACE)
    if record.status != "completed":
        error(f"{path}: {_reason(record)}")
        return False
    body = client.transcript(job_id, args.format)
    if not body.endswith("\n"):
        body += "\n"
    if args.output is None:
        if several:
            print(f"==> {path} <==")
        sys.stdout.write(body)
        sys.stdout.flush()
    else:
        target = _target(args.output, path, args.format, several)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    return True


def _target(output: Path, source: Path, fmt: str, several: bool) -> Path:
    """OUT itself for one input; OUT/<name>.<format suffix> for several, or when OUT is a folder."""
    if several or output.is_dir():
        return output / (source.stem + SUFFIX[fmt])
    return output


def _reason(record: JobRecord) -> str:
    return record.failure.message if record.failure else f"the job ended {record.status}"
