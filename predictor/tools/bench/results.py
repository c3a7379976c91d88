"""One benchmark run's measurements and the figures derived from them (ratios, percentiles)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from predictor.tools.bench.baseline import BaselineResult
from predictor.tools.bench.client import WaveResult
from predictor.tools.bench.raw_loop import RawLoopResult

RATIO_STREAMS = 32  # the concurrency of the headline `ratio_vs_raw_loop` line


def percentile_ms(seconds: list[float], q: float) -> float | None:
    return float(np.percentile(seconds, q)) * 1000 if seconds else None


@dataclass
class SweepPoint:
    concurrency: int
    raw: RawLoopResult | None = None  # the eager loop
    compiled: RawLoopResult | None = None  # the CUDA-graph loop (CUDA only)
    wave: WaveResult | None = None
    server_peak_rss_bytes: int | None = None  # VmHWM after this wave; None for a remote server

    @property
    def server_over_raw(self) -> float | None:
        return self.wave.tokens_per_s / self.raw.tokens_per_s if self.wave and self.raw else None

    @property
    def server_over_compiled(self) -> float | None:
        return self.wave.tokens_per_s / self.compiled.tokens_per_s if self.wave and self.compiled else None

    def server_over(self, baseline: BaselineResult | None) -> float | None:
        return self.wave.tokens_per_s / baseline.tokens_per_s if self.wave and baseline else None


@dataclass
class BenchRun:
    machine: dict[str, str]
    model: str
    workload: dict[str, str]
    server: str
    points: list[SweepPoint]
    baseline: BaselineResult | None = None
    single_prefill_s: float | None = None  # raw prefill of one prompt, median over the 1-stream wave's prompts
    roofline_tokens_per_s: float | None = None  # one stream, if each step only streamed weights + KV from memory
    copy_bandwidth_bytes_per_s: float | None = None
    sampled: WaveResult | None = None  # the largest wave again, sampling (temperature 0.8, top_p 0.9, seeds)
    notes: list[str] = field(default_factory=list)

    @property
    def has_compiled(self) -> bool:
        return any(p.compiled for p in self.points)

    def point(self, concurrency: int) -> SweepPoint | None:
        return next((p for p in self.points if p.concurrency == concurrency), None)

    @property
    def headline_point(self) -> SweepPoint | None:
        """32 streams, or the largest measured concurrency below that when the sweep stops short of 32."""
        candidates = [p for p in self.points if p.concurrency <= RATIO_STREAMS] or self.points
        return self.point(RATIO_STREAMS) or max(candidates, key=lambda p: p.concurrency, default=None)

    @property
    def ttft_target_ms(self) -> float | None:
        """Issue #6: one client's TTFT p50 within 1.25x the raw prefill time + 10 ms."""
        return self.single_prefill_s * 1250 + 10 if self.single_prefill_s is not None else None
