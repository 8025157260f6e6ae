"""Batched against unbatched faster-whisper on one long recording: is BatchedInferencePipeline
worth it on this device? Prints wall time, real-time factor and word error rate of both, and
their ratio. Run it on CPU here and on any NVIDIA GPU at hand:

    python scripts/batch_check.py --device cuda --model-dir ~/.local/share/dalston/models/faster-whisper/base

DALSTON_BATCH_SIZE turns batching on in the engines (README, Benchmarks, says what it changes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import soundfile
from faster_whisper import BatchedInferencePipeline, WhisperModel

from dalston.synthetic_speech import lecture, word_error_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a faster-whisper model folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compute-type", default=None, help="default: int8 on CPU, float16 on CUDA")
    parser.add_argument("--seconds", type=float, default=600, help="length of the recording")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the runtime decides)")
    args = parser.parse_args()
    compute_type = args.compute_type or ("int8" if args.device == "cpu" else "float16")
    model = WhisperModel(args.model_dir, device=args.device, compute_type=compute_type,
                         cpu_threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        audio, text = lecture(Path(tmp), args.seconds)
        duration = soundfile.info(str(audio)).duration
        runs = {
            "unbatched": lambda: model.transcribe(str(audio), beam_size=5, vad_filter=True)[0],
            f"batched x{args.batch_size}": lambda: BatchedInferencePipeline(model).transcribe(
                str(audio), beam_size=5, vad_filter=True, batch_size=args.batch_size)[0],
        }
        for segments in (runs["unbatched"](),):  # warm the device and the VAD once
            list(segments)
        times = {}
        print(f"{duration / 60:.1f} min, {Path(args.model_dir).name}, {args.device} {compute_type}")
        for name, run in runs.items():
            started = time.perf_counter()
            said = " ".join(s.text for s in run())
            times[name] = time.perf_counter() - started
            print(f"  {name:<12} {times[name]:7.1f} s  RTF {times[name] / duration:.4f}  "
                  f"WER {word_error_rate(text, said):.3f}")
        unbatched, batched = times.values()
        print(f"  batched / unbatched time: {batched / unbatched:.2f} (below 1: batching pays)")


if __name__ == "__main__":
    main()
