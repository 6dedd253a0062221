"""PCM helpers shared by the call layer, the engines' callers and the simulator.

All audio inside pbx-agent is signed 16-bit little-endian mono PCM ("slin") at the PBX rate.
"""

from __future__ import annotations

import numpy as np

FRAME_MS = 20
SAMPLE_WIDTH = 2


def frame_bytes(rate_hz: int, ms: int = FRAME_MS) -> int:
    """Bytes in one frame of ``ms`` milliseconds at ``rate_hz``."""
    return rate_hz * ms // 1000 * SAMPLE_WIDTH


def silence(rate_hz: int, ms: int = FRAME_MS) -> bytes:
    """Digital silence of ``ms`` milliseconds."""
    return bytes(frame_bytes(rate_hz, ms))


def duration_ms(pcm: bytes, rate_hz: int) -> float:
    """Length of ``pcm`` in milliseconds."""
    return len(pcm) / SAMPLE_WIDTH / rate_hz * 1000.0


def split_frames(pcm: bytes, rate_hz: int, ms: int = FRAME_MS) -> list[bytes]:
    """Cut ``pcm`` into whole frames, padding the last one with silence."""
    size = frame_bytes(rate_hz, ms)
    if len(pcm) % size:
        pcm = pcm + bytes(size - len(pcm) % size)
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


def rms_dbfs(pcm: bytes) -> float:
    """Level of ``pcm`` in dBFS (-120 for digital silence)."""
    if len(pcm) < SAMPLE_WIDTH:
        return -120.0
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    rms = float(np.sqrt(np.mean(samples * samples)))
    return -120.0 if rms < 1e-9 else 20.0 * float(np.log10(rms / 32768.0))


def is_silent(pcm: bytes, threshold_dbfs: float = -55.0) -> bool:
    """True when ``pcm`` is below ``threshold_dbfs`` (used to find 'first agent audio')."""
    return rms_dbfs(pcm) < threshold_dbfs


def trim_silence(pcm: bytes, rate_hz: int, threshold_dbfs: float = -45.0) -> bytes:
    """Drop leading and trailing 10 ms blocks quieter than ``threshold_dbfs``."""
    blocks = split_frames(pcm, rate_hz, 10)
    loud = [i for i, b in enumerate(blocks) if not is_silent(b, threshold_dbfs)]
    if not loud:
        return b""
    return b"".join(blocks[loud[0]: loud[-1] + 1])


def resample(pcm: bytes, from_hz: int, to_hz: int) -> bytes:
    """Resample PCM16 with soxr (high quality, ~0.2 ms per second of audio)."""
    if from_hz == to_hz or not pcm:
        return pcm
    import soxr  # imported here: the simulator and tests use it, the codecs do not

    samples = np.frombuffer(pcm, dtype="<i2")
    out = soxr.resample(samples, from_hz, to_hz)
    return np.asarray(out, dtype="<i2").tobytes()


def mulaw_roundtrip(pcm: bytes) -> bytes:
    """Encode to G.711 mu-law and back, as a telephone line would."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0
    mu = 255.0
    encoded = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    quantized = np.round(encoded * 127.0) / 127.0
    decoded = np.sign(quantized) * np.expm1(np.abs(quantized) * np.log1p(mu)) / mu
    return np.clip(decoded * 32768.0, -32768, 32767).astype("<i2").tobytes()


def add_noise(pcm: bytes, snr_db: float, seed: int = 0) -> bytes:
    """Add white noise at ``snr_db`` below the signal's RMS (line noise)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if x.size == 0:
        return pcm
    power = float(np.mean(x * x)) or 1.0
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), x.size)
    return np.clip(x + noise, -32768, 32767).astype("<i2").tobytes()
