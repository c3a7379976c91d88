"""Forward passes over the paged KV cache: one per step for all its prefill chunks and decodes.

Models whose attention goes through transformers' AttentionInterface (Llama, Mistral, Qwen, ...) run the paged
attention function: the step's tokens packed in one row, no padding. On CUDA, a decode-only step replays a CUDA
graph captured for the smallest batch-size bucket that holds it; everything else runs eagerly, which is all
there is on the CPU. Other models (Falcon) attend with their own code over gathered context and a 4D mask, in
two forwards when a step has both prefills and decodes.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from predictor import model_facts
from predictor.engine.attention import PAGED_ATTENTION, AttentionMetadata
from predictor.engine.block_manager import SCRATCH_BLOCK
from predictor.engine.kv_cache import MaskLayout, PagedKVCache
from predictor.engine.model_inputs import HEADER, ModelInputs

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 (vLLM's buckets) up to max_num_seqs, which is always one."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class StepTensors:
    """Device views into one step's packed ModelInputs."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor  # [S, width]
    sample_indices: torch.Tensor

    @classmethod
    def of(cls, packed: torch.Tensor, inputs: ModelInputs) -> StepTensors:
        tokens, seqs, width = len(inputs.token_ids), len(inputs.query_lens), inputs.table_width
        sizes = (tokens, tokens, tokens, seqs, seqs, seqs * width, len(inputs.sample_indices))
        ids, positions, slots, _, seq_lens, tables, samples = packed[HEADER:].split(sizes)
        return cls(ids, positions, slots, seq_lens, tables.view(seqs, width), samples)


class ModelRunner:
    def __init__(self, model, *, block_size: int, max_model_len: int):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        config = model.config.get_text_config()
        self.num_layers = model_facts.num_layers(config.to_dict())
        self.vocab_size = config.vocab_size
        self.kv_heads, self.head_dim = _cached_kv_shape(model)
        self.paged = model._can_set_attn_implementation()
        if self.paged:
            model.set_attn_implementation(PAGED_ATTENTION)
        self.use_triton = self.paged and self.device.type == "cuda" and triton_available()
        self.loop_decodes = self.device.type != "cuda"  # attended one by one, like prefill chunks: attention.py
        self.cache: PagedKVCache | None = None
        self.graphs: dict[int, DecodeGraph] = {}
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._masked = torch.finfo(self.dtype).min

    @property
    def kv_bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return model_facts.kv_bytes_per_token(self.num_layers, self.kv_heads, self.head_dim, element) * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.graphs.clear()
        self.cache = None
        self.cache = PagedKVCache(self.num_layers, num_blocks, self.block_size, self.kv_heads, self.head_dim,
                                  self.dtype, self.device)

    # ---- a step -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        """Logits [len(sample_indices), V] of the step's sampled positions."""
        if inputs.num_prefills == 0 and self.graphs:
            graph = self._graph_for(len(inputs.query_lens))
            if graph is not None:
                return graph.replay(inputs)
        step = StepTensors.of(inputs.pack().to(self.device), inputs)  # one small copy per step
        if self.paged:
            return self._forward_paged(inputs, step)
        return self._forward_masked(inputs, step)

    def _forward_paged(self, inputs: ModelInputs, step: StepTensors) -> torch.Tensor:
        looped = len(inputs.query_lens) if self.loop_decodes else inputs.num_prefills
        meta = AttentionMetadata(
            cache=self.cache,
            chunk_query_starts=inputs.query_starts[: looped + 1],
            chunk_seq_lens=inputs.seq_lens[:looped],
            chunk_block_tables=list(step.block_tables[:looped]),
            decode_start=inputs.query_starts[looped],
            decode_seq_lens=step.seq_lens[looped:],
            decode_block_tables=step.block_tables[looped:],
            decode_max_len=max(inputs.seq_lens[looped:], default=0),
            use_triton=self.use_triton,
        )
        self.cache.slot_mapping = step.slot_mapping
        out = self.model(input_ids=step.token_ids[None], position_ids=step.positions[None],
                         past_key_values=self.cache, use_cache=True, attention_metadata=meta,
                         logits_to_keep=step.sample_indices)
        return out.logits[0]

    def _forward_masked(self, inputs: ModelInputs, step: StepTensors) -> torch.Tensor:
        prefills, starts = inputs.num_prefills, inputs.query_starts
        prefill_tokens = starts[prefills]
        samples = step.sample_indices
        logits = []
        if prefills:
            rows = slice(0, prefill_tokens)
            layout = MaskLayout(step.block_tables[:prefills], inputs.seq_lens[:prefills], self.block_size, packed=True)
            mask = self._packed_mask(inputs.query_lens[:prefills], inputs.seq_lens[:prefills], step.positions[rows])
            kept = samples[samples < prefill_tokens]
            out = self._forward_with_mask(step.token_ids[None, rows], step.positions[None, rows],
                                          step.slot_mapping[rows], layout, mask, kept)
            logits.append(out[0])
        if inputs.num_decodes:
            rows = slice(prefill_tokens, None)
            layout = MaskLayout(step.block_tables[prefills:], inputs.seq_lens[prefills:], self.block_size,
                                packed=False)
            visible = torch.arange(layout.width, device=self.device)[None, :] < step.seq_lens[prefills:, None]
            out = self._forward_with_mask(step.token_ids[rows, None], step.positions[rows, None],
                                          step.slot_mapping[rows], layout, visible[:, None, None, :], None)
            logits.append(out[samples[samples >= prefill_tokens] - prefill_tokens, -1])
        return torch.cat(logits)

    def _forward_with_mask(self, ids, positions, slots, layout: MaskLayout, visible, keep) -> torch.Tensor:
        self.cache.slot_mapping, self.cache.mask_layout = slots, layout
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, self._masked)
        try:
            extra = {"logits_to_keep": keep} if keep is not None and self._keeps_logits else {}
            logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                past_key_values=self.cache, use_cache=True, **extra).logits
        finally:
            self.cache.mask_layout = None
        if keep is not None and not extra:
            logits = logits[:, keep]
        return logits

    def _packed_mask(self, query_lens: list[int], seq_lens: list[int], positions: torch.Tensor) -> torch.Tensor:
        """[1, 1, queries, keys]: a query sees the keys of its own sequence at or before its position."""
        device = self.device
        query_seq = torch.repeat_interleave(torch.arange(len(query_lens), device=device),
                                            torch.tensor(query_lens, device=device))
        key_seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=device),
                                          torch.tensor(seq_lens, device=device))
        key_pos = torch.cat([torch.arange(n, device=device) for n in seq_lens])
        visible = (query_seq[:, None] == key_seq[None, :]) & (key_pos[None, :] <= positions[:, None])
        return visible[None, None]

    # ---- other work -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """Each prompt's last hidden states averaged over its tokens, L2-normalised: [N, H] on the CPU, in one
        forward that leaves the KV cache alone. The prompts are padded on the right, which needs no attention
        mask: a causal model's token never attends to the positions after it."""
        lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        hidden = self.model.base_model(input_ids=ids.to(self.device), use_cache=False).last_hidden_state.float()
        real = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).to(self.device)
        mean = (hidden * real[..., None]).sum(dim=1) / lengths.to(self.device)[:, None]
        return torch.nn.functional.normalize(mean, dim=1).cpu()

    @torch.inference_mode()
    def check_device(self) -> None:
        """A tiny operation on the model's device; raises if the device is broken."""
        probe = torch.ones(1, device=self.device) + 1
        if probe.item() != 2.0:
            raise RuntimeError(f"device {self.device} computed 1 + 1 = {probe.item()}")

    def heartbeat(self) -> None:
        """Single process: nobody to tell that we are alive."""

    @torch.inference_mode()
    def peak_forward_bytes(self, num_tokens: int) -> int:
        """Peak CUDA memory of the largest step (num_tokens prompt tokens) with a cache just big enough for it."""
        blocks = -(-num_tokens // self.block_size)
        self.allocate_kv_cache(blocks + 1)
        torch.cuda.reset_peak_memory_stats(self.device)
        slots = list(range(self.block_size, self.block_size + num_tokens))
        self.execute(ModelInputs([0] * num_tokens, list(range(num_tokens)), slots, [num_tokens], [num_tokens],
                                 [list(range(1, blocks + 1))], [num_tokens - 1]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.cache = None
        return peak

    # ---- CUDA graphs ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_decode_graphs(self, max_num_seqs: int) -> None:
        """One graph per batch-size bucket, largest first so the smaller ones reuse its memory pool."""
        if not (self.use_triton and self.device.type == "cuda"):
            return
        pool = None
        for size in reversed(graph_batch_sizes(max_num_seqs)):
            graph = DecodeGraph(self, size)
            graph.capture(pool)
            pool = graph.graph.pool()
            self.graphs[size] = graph
        logger.info("captured decode CUDA graphs for batch sizes %s", sorted(self.graphs))

    def _graph_for(self, batch: int) -> DecodeGraph | None:
        fitting = [size for size in self.graphs if size >= batch]
        return self.graphs[min(fitting)] if fitting else None


class _ShapeProbe(Cache):
    """Records the shape of the keys a model hands its cache; it stores nothing."""

    def __init__(self):
        super().__init__(layers=[])
        self.shape: tuple[int, ...] | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.shape = tuple(key_states.shape)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0


@torch.inference_mode()
def _cached_kv_shape(model) -> tuple[int, int]:
    """(KV heads, head size) as this rank's model caches them: a one-token forward tells. Not always the config's
    KV heads: transformers' Falcon caches its grouped keys broadcast to every attention head."""
    probe = _ShapeProbe()
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), past_key_values=probe, use_cache=True)
    _, heads, _, head_dim = probe.shape
    return heads, head_dim


class DecodeGraph:
    """A decode step of `size` rows captured once; replay copies a step's inputs into its static buffers.

    Rows past the step's batch are padding: they write to the scratch block and attend over nothing.
    """

    def __init__(self, runner: ModelRunner, size: int):
        self.runner, self.size = runner, size
        width = runner.max_blocks_per_seq
        self.buffer = torch.zeros(size * (4 + width), dtype=torch.int64, device=runner.device)
        self.ids, self.positions, self.slots, self.seq_lens, tables = self.buffer.split([size] * 4 + [size * width])
        self.block_tables = tables.view(size, width)
        self.meta = AttentionMetadata(
            cache=runner.cache, chunk_query_starts=[0], chunk_seq_lens=[], chunk_block_tables=[],
            decode_start=0, decode_seq_lens=self.seq_lens, decode_block_tables=self.block_tables,
            decode_max_len=None, use_triton=True,
        )
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        runner = self.runner
        runner.cache.slot_mapping = self.slots
        return runner.model(input_ids=self.ids[None], position_ids=self.positions[None],
                            past_key_values=runner.cache, use_cache=True, attention_metadata=self.meta).logits[0]

    def capture(self, pool) -> None:
        self.slots.fill_(SCRATCH_BLOCK * self.runner.block_size)
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):  # warm-up off the capture stream: compiles the kernels, sets up cuBLAS
            self._forward()
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._forward()

    def replay(self, inputs: ModelInputs) -> torch.Tensor:
        batch, width = len(inputs.query_lens), inputs.table_width
        step = StepTensors.of(inputs.pack().to(self.runner.device), inputs)
        self.ids[:batch] = step.token_ids
        self.positions[:batch] = step.positions
        self.slots[:batch] = step.slot_mapping
        self.slots[batch:] = SCRATCH_BLOCK * self.runner.block_size
        self.seq_lens[:batch] = step.seq_lens
        self.seq_lens[batch:] = 0
        self.block_tables[:batch, :width] = step.block_tables
        self.graph.replay()
        return self.logits.index_select(0, step.sample_indices)
