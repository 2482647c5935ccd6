"""The audio pipeline shared by TIMIT and any folder of speaker-labelled wav files.

- Reading: RIFF/WAVE (16-bit PCM) with the standard library, NIST SPHERE (TIMIT's own format)
  with our own header parser; shorten-compressed SPHERE files are refused.
- Features, as in the DSVAE/FHVAE protocol: log spectral frames (log mel filterbank) from a
  25 ms window with a 10 ms shift; utterances are cut into 200 ms segments (20 frames) that are
  treated as independent sequences.
- Motion augmentation (the paper's unsupervised voice conversion): change the voice, keep the
  content. Pitch shift by resampling, then WSOLA time-scale modification back to the original
  duration; one random shift per utterance, computed on the waveform.
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from data_prep.common import PrepareError

WINDOW_MS, SHIFT_MS, SEGMENT_FRAMES, N_MELS = 25, 10, 20, 64


def read_sphere(path: Path) -> tuple[np.ndarray, int]:
    """A NIST SPHERE file of 16-bit PCM: ``(samples in [-1, 1], sample rate)``."""
    data = path.read_bytes()
    if not data.startswith(b"NIST_1A"):
        raise PrepareError(f"{path}: not a NIST SPHERE file (no NIST_1A header)")
    try:
        header_size = int(data[8:16].split()[0])
    except (ValueError, IndexError):
        raise PrepareError(f"{path}: malformed NIST SPHERE header size") from None
    fields = {}
    for line in data[16:header_size].decode("ascii", "replace").splitlines():
        parts = line.split(None, 2)
        if parts and parts[0] == "end_head":
            break
        if len(parts) == 3:
            fields[parts[0]] = parts[2].strip()
    coding = fields.get("sample_coding", "pcm")
    if "shorten" in coding:
        raise PrepareError(f"{path}: shorten-compressed NIST SPHERE ({coding}); expected 16-bit PCM "
                           "(decompress it first, e.g. with sph2pipe)")
    if fields.get("sample_n_bytes", "2") != "2" or fields.get("channel_count", "1") != "1" or \
            not coding.startswith("pcm"):
        raise PrepareError(f"{path}: SPHERE {coding}, {fields.get('sample_n_bytes')} bytes x "
                           f"{fields.get('channel_count')} channels; expected 16-bit mono PCM")
    order = "<" if fields.get("sample_byte_format", "01") == "01" else ">"
    held = (len(data) - header_size) // 2
    try:
        count, rate = int(fields.get("sample_count", held)), int(fields.get("sample_rate", 16000))
    except ValueError:
        raise PrepareError(f"{path}: malformed NIST SPHERE sample_count or sample_rate") from None
    if not 0 < count <= held or rate <= 0 or header_size < 16:
        raise PrepareError(f"{path}: NIST SPHERE header claims {count} samples at {rate} Hz, the file "
                           f"holds {max(held, 0)}; expected a complete 16-bit PCM file")
    samples = np.frombuffer(data[header_size:header_size + 2 * count], dtype=f"{order}i2")
    return samples.astype(np.float32) / 32768.0, rate


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE or NIST SPHERE file of 16-bit mono PCM."""
    with path.open("rb") as handle:
        magic = handle.read(7)
    if magic.startswith(b"NIST_1A"):
        return read_sphere(path)
    if not magic.startswith(b"RIFF"):
        raise PrepareError(f"{path}: neither RIFF/WAVE nor NIST SPHERE; expected 16-bit PCM audio")
    try:
        with wave.open(str(path)) as reader:
            if reader.getsampwidth() != 2:
                raise PrepareError(f"{path}: {8 * reader.getsampwidth()}-bit audio; expected 16-bit PCM")
            frames = reader.readframes(reader.getnframes())
            claimed = reader.getnframes() * reader.getnchannels() * 2
            if len(frames) < claimed or claimed == 0:
                raise PrepareError(f"{path}: wav header claims {reader.getnframes()} frames, the file holds "
                                   f"{len(frames) // (2 * reader.getnchannels())}; expected a complete 16-bit PCM file")
            samples = np.frombuffer(frames, dtype="<i2").reshape(-1, reader.getnchannels()).mean(axis=1)
            return samples.astype(np.float32) / 32768.0, reader.getframerate()
    except (wave.Error, EOFError) as error:
        raise PrepareError(f"{path}: unreadable wav ({error}); expected 16-bit PCM") from None


def mel_filterbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale, 0 Hz to Nyquist."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel):
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    edges = to_hz(np.linspace(0.0, to_mel(rate / 2), n_mels + 2))
    bins = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel(samples: np.ndarray, rate: int, n_mels: int = N_MELS) -> np.ndarray:
    """(frames, n_mels) log mel spectral frames: 25 ms Hann window, 10 ms shift."""
    window = int(rate * WINDOW_MS / 1000)
    shift = int(rate * SHIFT_MS / 1000)
    n_fft = 1 << (window - 1).bit_length()
    if len(samples) < window:
        samples = np.pad(samples, (0, window - len(samples)))
    count = 1 + (len(samples) - window) // shift
    index = np.arange(window)[None, :] + shift * np.arange(count)[:, None]
    frames = samples[index] * np.hanning(window).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, n=n_fft)) ** 2
    return np.log(power @ mel_filterbank(rate, n_fft, n_mels).T + 1e-6).astype(np.float32)


def resample(samples: np.ndarray, factor: float) -> np.ndarray:
    """Play ``factor`` times faster (linear interpolation): pitch x factor, duration / factor."""
    positions = np.arange(0.0, len(samples) - 1, factor)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)


def wsola(samples: np.ndarray, stretch: float, rate: int) -> np.ndarray:
    """Waveform-similarity overlap-add: duration x ``stretch``, pitch unchanged."""
    window = int(0.02 * rate)
    synthesis_hop = window // 2
    analysis_hop = synthesis_hop / stretch
    tolerance = synthesis_hop // 2
    pad = window + tolerance
    padded = np.pad(samples, (pad, pad + window))
    out_length = int(round(len(samples) * stretch))
    taper = np.hanning(window).astype(np.float32)
    out = np.zeros(out_length + window, np.float32)
    weight = np.zeros_like(out)
    previous = pad
    for k in range(out_length // synthesis_hop + 1):
        nominal = pad + int(round(k * analysis_hop))
        if k == 0:
            start = nominal
        else:   # the candidate near the nominal position most like the natural continuation
            template = padded[previous + synthesis_hop: previous + synthesis_hop + window]
            low = max(nominal - tolerance, 0)
            region = padded[low: nominal + tolerance + window]
            if len(region) < window or len(template) < window:
                break
            start = low + int(np.argmax(np.correlate(region, template, mode="valid")))
        out[k * synthesis_hop: k * synthesis_hop + window] += padded[start:start + window] * taper
        weight[k * synthesis_hop: k * synthesis_hop + window] += taper
        previous = start
    return (out / np.maximum(weight, 1e-3))[:out_length]


def voice_conversion(samples: np.ndarray, rate: int, semitones: float) -> np.ndarray:
    """Pitch shift by ``semitones`` with the duration kept: resample, then WSOLA back."""
    factor = 2.0 ** (semitones / 12.0)
    shifted = wsola(resample(samples, factor), factor, rate)
    if len(shifted) < len(samples):
        shifted = np.pad(shifted, (0, len(samples) - len(shifted)))
    return shifted[:len(samples)]


def random_semitones(rng: np.random.Generator) -> float:
    """A shift of 2 to 5 semitones, up or down."""
    return float(rng.uniform(2.0, 5.0) * rng.choice([-1.0, 1.0]))


def segments(features: np.ndarray, length: int = SEGMENT_FRAMES) -> np.ndarray:
    """Non-overlapping ``length``-frame segments of an utterance, (count, length, D)."""
    count = len(features) // length
    return features[:count * length].reshape(count, length, features.shape[1])


def utterance_segments(path: Path, rng: np.random.Generator, n_mels: int = N_MELS):
    """(segments, motion-augmented segments) of one file: both (count, 20, n_mels)."""
    samples, rate = read_audio(path)
    original = log_mel(samples, rate, n_mels)
    converted = log_mel(voice_conversion(samples, rate, random_semitones(rng)), rate, n_mels)
    frames = min(len(original), len(converted))
    return segments(original[:frames]), segments(converted[:frames]), rate
