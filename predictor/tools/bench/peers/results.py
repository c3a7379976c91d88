"""One peer run's measurements and the ratios derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from predictor.tools.bench.client import WaveResult
from predictor.tools.bench.peers.cpu import CpuUse
from predictor.tools.bench.results import percentile_ms

OURS = "ours"
PLAIN = "distinct prompts"
PREFIX = "shared prefix"
WORKLOADS = (PLAIN, PREFIX)


@dataclass
class ServerRun:
    """One server on one model, started alone."""

    label: str  # OURS, or a description of the vLLM configuration
    command: str
    startup_s: float | None = None
    load_at_start: float | None = None
    load_at_end: float | None = None
    others_at_start: float | None = None  # cores the rest of the machine used just before it started
    waves: dict[tuple[str, int], WaveResult] = field(default_factory=dict)  # (workload, streams) -> wave
    cpu: dict[tuple[str, int], CpuUse] = field(default_factory=dict)  # (workload, streams) -> during that wave
    first_ttft_s: float | None = None  # a request with a prefix the server has not seen, sent alone
    second_ttft_s: float | None = None  # then one sharing that prefix, sent alone
    problems: list[str] = field(default_factory=list)  # why it was not (fully) measured

    def wave(self, workload: str, streams: int) -> WaveResult | None:
        return self.waves.get((workload, streams))

    @property
    def second_over_first(self) -> float | None:
        """The issue's prefix-reuse target: <= 0.25."""
        if self.first_ttft_s and self.second_ttft_s is not None:
            return self.second_ttft_s / self.first_ttft_s
        return None


@dataclass
class ModelRun:
    name: str
    model_dir: str
    servers: list[ServerRun]

    @property
    def ours(self) -> ServerRun | None:
        return next((s for s in self.servers if s.label == OURS), None)

    @property
    def peers(self) -> list[ServerRun]:
        return [s for s in self.servers if s.label != OURS]


@dataclass
class PeerRun:
    machine: dict[str, str]
    workload: dict[str, str]
    streams: list[int]
    models: list[ModelRun]
    notes: list[str] = field(default_factory=list)


def ttft_p50_ms(wave: WaveResult | None) -> float | None:
    return percentile_ms(wave.ttfts_s, 50) if wave else None


def tokens_ratio(ours: WaveResult | None, peer: WaveResult | None) -> float | None:
    """ours / peer generated tok/s: above 1, ours is faster."""
    return ours.tokens_per_s / peer.tokens_per_s if ours and peer and peer.tokens_per_s else None


def ttft_ratio(ours: WaveResult | None, peer: WaveResult | None) -> float | None:
    """peer / ours TTFT p50: above 1, ours answers first sooner (read the same way as the tok/s ratio)."""
    mine, theirs = ttft_p50_ms(ours), ttft_p50_ms(peer)
    return theirs / mine if mine and theirs is not None else None
