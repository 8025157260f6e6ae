"""The GE2E speaker encoder (Resemblyzer's weights) on onnxruntime, without torch or librosa:
Resemblyzer's mel frames and partial-utterance windows in numpy, its LSTM as an ONNX graph that
scripts/convert_ge2e.py wrote once from Resemblyzer's `pretrained.pt`. Its embeddings equal
Resemblyzer's (tests/test_diarize.py checks them against torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from dalston.pcm import SAMPLE_RATE

# Resemblyzer's hparams: 25 ms windows every 10 ms, 40 mel channels, 1.6 s partial utterances.
N_FFT = SAMPLE_RATE * 25 // 1000
HOP = SAMPLE_RATE * 10 // 1000
MEL_CHANNELS = 40
PARTIAL_FRAMES = 160
# Partials are fed to the LSTM this many at a time, so a long stretch bounds its memory.
BATCH = 64
# The level Resemblyzer's `preprocess_wav` raises every quieter utterance to before the encoder,
# in training and in use (`normalize_volume`, dBFS of the mean power). The encoder reads mel
# power, not its log, so its embeddings move with the level.
SPEECH_DBFS = -30.0


def levelled(audio: np.ndarray, speech: np.ndarray | None = None, *, raise_only: bool = False) -> np.ndarray:
    """`audio` scaled so that `speech` (by default `audio` itself) has a mean power of
    SPEECH_DBFS; with `raise_only`, left as it is where its speech is louder already."""
    speech = audio if speech is None else speech
    power = float(np.mean(np.square(speech, dtype=np.float64))) if len(speech) else 0.0
    if power <= 0.0 or (raise_only and power >= 10 ** (SPEECH_DBFS / 10)):
        return audio
    return (audio * 10 ** ((SPEECH_DBFS - 10 * np.log10(power)) / 20)).astype(np.float32)


class Ge2eEncoder:
    """Embeds speech as Resemblyzer's `VoiceEncoder.embed_utterance` does."""

    def __init__(self, model: Path, threads: int = 0) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's own choice
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.mel_basis = mel_filters()
        self.window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann, as librosa's

    def embed_utterance(self, wav: np.ndarray, return_partials: bool = False, rate: float = 1.3,
                        min_coverage: float = 0.75):
        """The unit-length mean of the embeddings of 1.6 s windows, `rate` a second, over `wav`;
        with `return_partials`, also the windows' embeddings and their sample slices."""
        wav_slices, mel_slices = partial_slices(len(wav), rate, min_coverage)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)))
        mel = self.mel_frames(np.asarray(wav, dtype=np.float32))
        mels = np.stack([mel[s] for s in mel_slices])
        partials = np.concatenate([self.session.run(None, {self.input: mels[i:i + BATCH]})[0]
                                   for i in range(0, len(mels), BATCH)])
        mean = partials.mean(axis=0)
        embedding = mean / np.linalg.norm(mean)
        if return_partials:
            return embedding, partials, wav_slices
        return embedding

    def mel_frames(self, wav: np.ndarray) -> np.ndarray:
        """Power mel spectrogram (frames, channels) as `librosa.feature.melspectrogram` makes it
        with Resemblyzer's settings: centred frames, zero padding, periodic Hann window."""
        padded = np.pad(wav, N_FFT // 2)
        count = 1 + len(wav) // HOP
        frames = np.lib.stride_tricks.as_strided(
            padded, (count, N_FFT), (padded.strides[0] * HOP, padded.strides[0]), writeable=False)
        power = np.abs(np.fft.rfft(frames * self.window, axis=1)) ** 2
        return (power @ self.mel_basis.T).astype(np.float32)


def partial_slices(n_samples: int, rate: float, min_coverage: float) -> tuple[list[slice], list[slice]]:
    """Resemblyzer's `compute_partial_slices`: windows of PARTIAL_FRAMES frames, `rate` a second,
    covering the whole utterance; the last dropped if it covers less than `min_coverage` (unless
    it is the only one). Slices in samples and in mel frames."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    frame_step = int(np.round((SAMPLE_RATE / rate) / HOP))
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(f"a rate of {rate} windows a second is outside what 1.6 s windows can cover")
    starts = range(0, max(1, n_frames - PARTIAL_FRAMES + frame_step + 1), frame_step)
    mel_slices = [slice(i, i + PARTIAL_FRAMES) for i in starts]
    wav_slices = [slice(i * HOP, (i + PARTIAL_FRAMES) * HOP) for i in starts]
    last = wav_slices[-1]
    if (n_samples - last.start) / (last.stop - last.start) < min_coverage and len(mel_slices) > 1:
        return wav_slices[:-1], mel_slices[:-1]
    return wav_slices, mel_slices


def mel_filters() -> np.ndarray:
    """librosa's default mel filterbank (Slaney's mel scale, Slaney normalisation) for N_FFT at
    SAMPLE_RATE: (MEL_CHANNELS, N_FFT // 2 + 1)."""
    fft_freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), MEL_CHANNELS + 2))
    ramps = np.subtract.outer(mel_freqs, fft_freqs)
    steps = np.diff(mel_freqs)
    lower = -ramps[:-2] / steps[:-1, None]
    upper = ramps[2:] / steps[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]
    return weights.astype(np.float32)


# Slaney's mel scale: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz < _MIN_LOG_HZ:
        return hz / _F_SP
    return _MIN_LOG_MEL + float(np.log(hz / _MIN_LOG_HZ)) / _LOG_STEP


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    return np.where(mels < _MIN_LOG_MEL, _F_SP * mels, _MIN_LOG_HZ * np.exp(_LOG_STEP * (mels - _MIN_LOG_MEL)))
