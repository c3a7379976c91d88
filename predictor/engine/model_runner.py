"""Forward passes over the paged KV cache: one per step for all its prefill chunks and decodes.

Models whose attention goes through transformers' AttentionInterface (Llama, Mistral, Qwen, ...) run the paged
attention function: the step's tokens packed in one row, no padding. On CUDA, a decode-only step replays a CUDA
graph captured for the smallest batch-size bucket that holds it (cuda_graphs.py; fast_path.py decides at start
whether there are graphs); everything else runs eagerly, which is all there is on the CPU. Other models (Falcon)
attend with their own code over gathered context and a 4D mask, in two forwards when a step has both prefills and
decodes. A step's inputs reach the device in one asynchronous copy; only the sampled rows' logits are computed.
Under async scheduling, the tokens that the previous step is still sampling are filled in on the device
(model_inputs.Placeholders), on every path.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from predictor import model_facts
from predictor.engine import cpu_decode_attention, cpu_linear
from predictor.engine.attention import PAGED_ATTENTION, AttentionMetadata
from predictor.engine.block_manager import SCRATCH_BLOCK
from predictor.engine.cascade_attention import plan_cascade
from predictor.engine.cpu_decode_attention import CpuDecodes
from predictor.engine.cuda_graphs import DecodeGraphs
from predictor.engine.kv_cache import MaskLayout, PagedKVCache
from predictor.engine.model_inputs import HEADER, ModelInputs, upload

logger = logging.getLogger(__name__)


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
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        config = model.config.get_text_config()
        self.num_layers = model_facts.num_layers(config.to_dict())
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2's tanh cap on the logits
        self.kv_heads, self.head_dim = _cached_kv_shape(model)
        self.paged = model._can_set_attn_implementation()
        if self.paged:
            model.set_attn_implementation(PAGED_ATTENTION)
        self.use_triton = self.paged and self.device.type == "cuda" and triton_available()
        self.cpu_kernel = self.paged and self.device.type == "cpu" and self._cpu_kernel_loads()
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self._pack_linears()
        # Without a kernel, the CPU attends decodes one by one, like prefill chunks (attention.py).
        self.loop_decodes = self.device.type != "cuda" and not self.cpu_kernel
        self.cache: PagedKVCache | None = None
        self.graphs: DecodeGraphs | None = None  # captured over self.cache: allocating another drops them
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._masked = torch.finfo(self.dtype).min

    @property
    def kv_bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return model_facts.kv_bytes_per_token(self.num_layers, self.kv_heads, self.head_dim, element) * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.free_kv_cache()
        self.cache = PagedKVCache(self.num_layers, num_blocks, self.block_size, self.kv_heads, self.head_dim,
                                  self.dtype, self.device)

    def free_kv_cache(self) -> None:
        """The cache goes, and the graphs captured over it with it."""
        self.graphs = None
        self.cache = None

    # ---- a step -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        """Logits [len(sample_indices), V] of the step's sampled positions."""
        if self.graphs is not None and inputs.num_prefills == 0 and self.graphs.fits(len(inputs.query_lens)):
            return self.graphs.replay(inputs)
        step = StepTensors.of(upload(inputs.pack(), self.device), inputs)
        if inputs.placeholders is not None:
            inputs.placeholders.fill(step.token_ids)
        if self.paged:
            return self._forward_paged(inputs, step)
        return self._forward_masked(inputs, step)

    def _cpu_kernel_loads(self) -> bool:
        heads = self.model.config.get_text_config().num_attention_heads
        why_not = cpu_decode_attention.supports(self.dtype, heads, self.kv_heads, self.head_dim, self.block_size)
        if why_not is None:
            try:
                library = cpu_decode_attention.kernel()
            except (cpu_decode_attention.KernelUnavailable, OSError) as err:
                why_not = str(err)
        if why_not is not None:
            logger.warning("CPU decode attention kernel off (decodes gather their context instead): %s", why_not)
            return False
        logger.info("CPU decode attention: the C kernel reads the KV blocks in place (%s)", library._name)
        return True

    def _pack_linears(self) -> None:
        why_not = cpu_linear.unavailable()
        if why_not is not None:
            logger.warning("CPU linear layers unpacked (MKL repacks each weight per call): %s", why_not)
            return
        logger.info("CPU linear layers: %d weights reordered once for oneDNN", cpu_linear.pack_linears(self.model))

    def _forward_paged(self, inputs: ModelInputs, step: StepTensors) -> torch.Tensor:
        looped = len(inputs.query_lens) if self.loop_decodes else inputs.num_prefills
        starts = inputs.query_starts
        cascade = plan_cascade(inputs.block_tables, inputs.seq_lens, starts, inputs.num_prefills, self.block_size,
                               self.dtype) if self.loop_decodes or self.cpu_kernel else None
        meta = AttentionMetadata(
            cache=self.cache,
            chunk_query_starts=starts[: looped + 1],
            chunk_seq_lens=inputs.seq_lens[:looped],
            chunk_block_tables=list(step.block_tables[:looped]),
            decode_start=starts[looped],
            decode_seq_lens=step.seq_lens[looped:],
            decode_block_tables=step.block_tables[looped:],
            decode_max_len=max(inputs.seq_lens[looped:], default=0),
            use_triton=self.use_triton,
            cascade=cascade,
            cpu_decodes=self._cpu_decodes(inputs, step, cascade) if self.cpu_kernel else None,
        )
        self.cache.slot_mapping = step.slot_mapping
        out = self.model(input_ids=step.token_ids[None], position_ids=step.positions[None],
                         past_key_values=self.cache, use_cache=True, attention_metadata=meta,
                         logits_to_keep=step.sample_indices)
        return out.logits[0]

    @staticmethod
    def _cpu_decodes(inputs: ModelInputs, step: StepTensors, cascade) -> CpuDecodes:
        """The decodes the CPU kernel attends: all but those a cascade group attends."""
        grouped = cascade.chunks if cascade else frozenset()
        starts = inputs.query_starts
        seqs = [i for i in range(inputs.num_prefills, len(inputs.query_lens)) if i not in grouped]
        return CpuDecodes(torch.tensor([starts[i] for i in seqs], dtype=torch.int64),
                          torch.tensor(seqs, dtype=torch.int64), step.block_tables, step.seq_lens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] of last hidden states [N, hidden], as the model's forward computes them after its base
        model (fast_path.py checks that it does, for the model at hand, before graphs rely on it)."""
        logits = self.model.get_output_embeddings()(hidden)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _forward_masked(self, inputs: ModelInputs, step: StepTensors) -> torch.Tensor:
        prefills, starts = inputs.num_prefills, inputs.query_starts
        prefill_tokens = starts[prefills]
        samples = step.sample_indices  # ascending: the prefill chunks' first, then the decodes'
        prefill_samples = sum(1 for i in inputs.sample_indices if i < prefill_tokens)
        logits = []
        if prefills:
            rows = slice(0, prefill_tokens)
            layout = MaskLayout(step.block_tables[:prefills], inputs.seq_lens[:prefills], self.block_size, packed=True)
            mask = self._packed_mask(inputs.query_lens[:prefills], inputs.seq_lens[:prefills], step.positions[rows])
            out = self._forward_with_mask(step.token_ids[None, rows], step.positions[None, rows],
                                          step.slot_mapping[rows], layout, mask, samples[:prefill_samples])
            logits.append(out[0])
        if inputs.num_decodes:
            rows = slice(prefill_tokens, None)
            layout = MaskLayout(step.block_tables[prefills:], inputs.seq_lens[prefills:], self.block_size,
                                packed=False)
            visible = torch.arange(layout.width, device=self.device)[None, :] < step.seq_lens[prefills:, None]
            out = self._forward_with_mask(step.token_ids[rows, None], step.positions[rows, None],
                                          step.slot_mapping[rows], layout, visible[:, None, None, :], None)
            logits.append(out[samples[prefill_samples:] - prefill_tokens, -1])
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
        device = self.device  # output_size given: repeat_interleave need not read the lengths back from the device
        query_seq = torch.repeat_interleave(torch.arange(len(query_lens), device=device),
                                            upload(torch.tensor(query_lens), device), output_size=sum(query_lens))
        key_seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=device),
                                          upload(torch.tensor(seq_lens), device), output_size=sum(seq_lens))
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

    def worst_step(self, max_prefill_tokens: int, max_num_seqs: int) -> tuple[ModelInputs, int]:
        """The step that needs the most memory, and the KV blocks it reads: a prompt chunk of max_prefill_tokens
        that ends at max_model_len after cached context (torch's SDPA with a boolean mask and grouped KV heads takes
        its math path: [heads, chunk, context] scores, far more than a fresh prompt's fused kernel), sharing the step
        with max_num_seqs - 1 decodes of max_model_len tokens. Every row reads the same blocks; the decodes write
        to the scratch block."""
        context, size = self.max_model_len, self.block_size
        chunk = min(max_prefill_tokens, context - 1)
        decodes = max_num_seqs - 1
        blocks = -(-context // size)
        table = list(range(SCRATCH_BLOCK + 1, SCRATCH_BLOCK + 1 + blocks))
        positions = list(range(context - chunk, context))
        inputs = ModelInputs(
            token_ids=[0] * (chunk + decodes),
            positions=positions + [context - 1] * decodes,
            slot_mapping=[table[p // size] * size + p % size for p in positions]
            + [SCRATCH_BLOCK * size + i % size for i in range(decodes)],
            query_lens=[chunk] + [1] * decodes,
            seq_lens=[context] * (1 + decodes),
            block_tables=[table] * (1 + decodes),
            sample_indices=[chunk - 1, *range(chunk, chunk + decodes)],
        )
        return inputs, blocks + 1

    @torch.inference_mode()
    def peak_forward_bytes(self, max_prefill_tokens: int, max_num_seqs: int) -> int:
        """Peak CUDA memory of the worst step (weights and a cache just big enough for it included); on other
        devices the step runs the same way and 0 is returned, since they keep no allocator statistics."""
        inputs, num_blocks = self.worst_step(max_prefill_tokens, max_num_seqs)
        self.allocate_kv_cache(num_blocks)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(inputs)
        peak = 0
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        self.free_kv_cache()
        return peak


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
