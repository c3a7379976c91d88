"""The Triton decode kernels that serve CUDA, checked here on the CPU by Triton's interpreter (compiled on a GPU):
split or not, they equal the gathering SDPA path, alone and inside a model's forward; varied steps share the
variants warm_up compiles; and the compiled variants build for Hopper without a GPU."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from predictor.engine import triton_attention  # tests/conftest.py has the CPU interpret it
from predictor.engine.attention import AttentionMetadata, decode_attention_gathered

from .test_model_runner import PROMPTS, generate, model_of, serve_greedy

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TILE = triton_attention.TILE_TOKENS
# 0: a padded row of a captured batch; then one token, exactly a tile, a block boundary crossed, many tiles.
LENGTHS = [0, 1, TILE, 129, 3 * TILE + 7]
KERNELS = (triton_attention._paged_decode_kernel, triton_attention._merge_splits_kernel)


def paged_case(lengths, kv_heads, head_dim, block_size, heads, seed=0, dtype=torch.float32):
    """q, caches and block tables of sequences of the given lengths, their blocks scattered over the cache."""
    generator = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lengths]
    width = max(per_seq)
    num_blocks = sum(per_seq) + 1
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, blocks in enumerate(per_seq):
        tables[row, :blocks] = torch.tensor([order.pop() for _ in range(blocks)], dtype=torch.int64)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
                        for _ in range(2))
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lengths)


def gathered(q, k_cache, v_cache, tables, seq_lens, scale):
    """The SDPA path's answer in fp32; zeros for a length-0 row."""
    f32 = [t.float() for t in (q, k_cache, v_cache)]
    meta = AttentionMetadata(None, [0], [], [], 0, seq_lens, tables, decode_max_len=int(seq_lens.max()))
    expected = decode_attention_gathered(f32[0], f32[1], f32[2], meta, scale)
    return torch.where((seq_lens > 0)[:, None, None], expected, 0.0)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (4, 4, 64, 16),  # no GQA
    (8, 2, 128, 32),  # groups of 4
    (8, 1, 24, 128),  # groups of 8, a head size that is no power of two, a tile within a block
    (6, 2, 24, 16),  # groups of 3: padded
])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-split", "three-splits"])
def test_decode_kernel_equals_gathered_attention(heads, kv_heads, head_dim, block_size, num_splits):
    q, k_cache, v_cache, tables, seq_lens = (t.to(DEVICE) for t in paged_case(LENGTHS, kv_heads, head_dim,
                                                                              block_size, heads))
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3, num_splits=num_splits)
    expected = gathered(q, k_cache, v_cache, tables, seq_lens, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-4 if ON_GPU else 1e-5, rtol=1e-4)
    assert torch.all(out[0] == 0)


def test_splits_fill_the_device_but_never_outnumber_the_tiles():
    split = triton_attention.split_count
    target = triton_attention._target_programs(DEVICE)
    assert split(1, 2, 64, 16, DEVICE) == min(-(-target // 2), 64 * 16 // TILE)
    assert split(1, 2, 4, 16, DEVICE) == 1  # the table holds one tile at most
    assert split(1, 1, 5, 16, DEVICE) == 2  # 80 tokens: two tiles
    assert split(target, 1, 64, 16, DEVICE) == 1  # the batch fills the device alone
    assert split(1, 2, 0, 16, DEVICE) == 1


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_precision_caches_attend_like_fp32_on_the_same_values(dtype, tolerance):
    """The interpreter multiplies bf16/fp16 by their raw bits, so the kernel upcasts there; compiled, it keeps
    half-precision dots with fp32 accumulation."""
    q, k_cache, v_cache, tables, seq_lens = (t.to(DEVICE) for t in paged_case(LENGTHS, 2, 64, 16, 4, dtype=dtype))
    expected = gathered(q, k_cache, v_cache, tables, seq_lens, 0.125)
    for num_splits in (1, None):
        out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125,
                                                      num_splits=num_splits)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


# ---- specialization: what Triton keys its compiled variants on ---------------------------------------------------


def specialization_of(kernel):
    """The function Triton's JIT runs on a launch's arguments to key its compiled variants (3.6's binder:
    types, == 1 and % 16 of ints, 16-byte alignment of pointers, constexprs), with the kernel's own
    do_not_specialize settings. The interpreter has no binder: it is built from the same settings."""
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    return lambda *args, **kwargs: str(binder(*args, **kwargs)[1])


@pytest.fixture
def launch_keys():
    """Records (kernel, specialization key, arguments) of every launch of the decode kernels."""
    launches = []
    hooks = []
    for kernel in KERNELS:
        key_of = specialization_of(kernel)

        def hook(*args, kernel=kernel, key_of=key_of, **kwargs):
            launches.append((kernel.__name__, key_of(*args, **kwargs), args))

        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    yield launches
    for kernel, hook in hooks:
        kernel.pre_run_hooks.remove(hook)


def eager_step(packed_offset, lengths, width, decode_start, k_cache, heads, block_size):
    """Decode inputs laid out as the model runner hands them over: lengths and block tables are views into one
    packed int64 tensor after a header and the prefills' fields, q is a slice of the step's [T, heads, dim]
    queries transposed from the model's [heads, T, dim]."""
    batch = len(lengths)
    tables = torch.arange(batch * width).remainder(k_cache.shape[0])
    packed = torch.cat([torch.zeros(packed_offset, dtype=torch.int64), torch.tensor(lengths), tables])
    assert max(lengths) <= width * block_size
    queries = torch.randn(heads, decode_start + batch, k_cache.shape[-1], dtype=k_cache.dtype).transpose(0, 1)
    packed, queries = packed.to(k_cache.device), queries.to(k_cache.device)
    seq_lens = packed[packed_offset:packed_offset + batch]
    block_tables = packed[packed_offset + batch:].view(batch, width)
    return queries[decode_start:], block_tables, seq_lens


# (offset of the lengths in the packed tensor, lengths, table width, first decode row in the step's queries)
EAGER_STEPS = [(5, [1], 1, 0), (6, [3, 0, 17], 2, 3), (7, [200, 5], 13, 1), (8, [9] * 9, 3, 6), (9, [1], 33, 2),
               (10, [16, 31], 2, 5)]


def test_varied_eager_steps_launch_only_the_variants_warm_up_compiled(launch_keys):
    """Steps whose views sit at offsets of every alignment, whose tables are 1 to 33 blocks wide, whose batch is
    1 to 9 rows and whose queries' strides change: Triton would key every one of their launches like one of
    warm_up's, so nothing compiles under traffic."""
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 16
    k_cache = v_cache = torch.randn(40, block_size, kv_heads, head_dim, device=DEVICE)
    triton_attention.warm_up(k_cache, v_cache, heads)
    warmed = {(name, key) for name, key, _ in launch_keys}
    assert len(warmed) == 3  # attention with and without splits, and the merge
    launch_keys.clear()
    for packed_offset, lengths, width, decode_start in EAGER_STEPS:
        q, tables, seq_lens = eager_step(packed_offset, lengths, width, decode_start, k_cache, heads, block_size)
        triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25)
    attention = [args for name, _, args in launch_keys if name == "_paged_decode_kernel"]
    assert len(attention) == len(EAGER_STEPS)
    assert {args[3].data_ptr() % 16 for args in attention} == {0, 8}  # tables and lengths at both alignments
    assert {args[4].data_ptr() % 16 for args in attention} == {0, 8}
    assert {1, 2, 13, 33} <= {args[15] for args in attention}  # the block table's row stride, 1 included
    assert len({args[11] for args in attention}) > 1  # the queries' head stride
    assert {name for name, _, _ in launch_keys} == {"_paged_decode_kernel", "_merge_splits_kernel"}
    assert {(name, key) for name, key, _ in launch_keys} <= warmed


def test_a_model_decoding_through_the_kernel_equals_generate(launch_keys):
    from predictor.engine.model_runner import ModelRunner

    model = model_of("llama").to(DEVICE)
    prompts = PROMPTS[:3]
    expected = [generate(model.cpu(), p, 6) for p in prompts]
    runner = ModelRunner(model.to(DEVICE), block_size=16, max_model_len=128)
    runner.use_triton = True
    runner.loop_decodes = False  # on the CPU the runner loops decodes through SDPA; batch them into the kernel
    outputs, _ = serve_greedy(runner, prompts, 6, num_blocks=32)
    assert outputs == expected
    assert launch_keys, "no decode went through the kernel"


COMPILE_FOR_HOPPER = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
built = []

def compile_instead_of_launching(self, *args, grid, warmup, **kwargs):
    bound, specialization, options = create_function_from_signature(self.signature, self.params, backend)(
        *args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
    built.append((self.__name__, kernel.metadata.shared))

JITFunction.run = compile_instead_of_launching
from predictor.engine import triton_attention
for dtype, heads, kv_heads, head_dim, block_size in [
        (torch.bfloat16, 32, 4, 64, 16), (torch.float16, 32, 32, 128, 128), (torch.float32, 6, 2, 24, 32)]:
    cache = torch.zeros(4, block_size, kv_heads, head_dim, dtype=dtype)
    triton_attention.warm_up(cache, cache, heads)
print(built)
"""


@pytest.mark.skipif(ON_GPU, reason="a GPU runs the compiled kernels in the tests above")
def test_every_warmed_variant_compiles_for_hopper_without_a_gpu():
    """Triton compiles to sm_90 machine code (ptxas included) with no device: each variant warm_up launches, for
    bf16, fp16 and fp32 caches, goes through the whole compiler, as on the H100."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    built = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert [name for name, _ in built] == ["_paged_decode_kernel", "_paged_decode_kernel", "_merge_splits_kernel"] * 3
    assert all(0 < shared <= 228 * 1024 for name, shared in built if name == "_paged_decode_kernel")
