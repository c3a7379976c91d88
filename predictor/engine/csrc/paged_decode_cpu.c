/* Decode attention over the paged KV cache on the CPU, fp32 (predictor/engine/cpu_decode_attention.py loads it).

   A task is one decode and a run of its KV heads. It reads the blocks of its sequence where they lie, once, for
   all the query heads that share each KV head, with an online softmax over block-sized tiles: no gathered copy
   of the context, no padding. A token's keys for all KV heads are contiguous in a block, so a task that takes
   every KV head (the usual case: many decodes) reads each block as one sequential run, and prefetches the next
   block while it computes on this one. Tasks are spread over the OpenMP threads of the runtime torch already
   loaded (the same libgomp.so.1). */

#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The first line of each token's row: the hardware prefetcher streams the rest of it. Prefetching every line
   (a thousand instructions a block) measured 10-25% slower. */
static void prefetch_rows(const float *row, int64_t count, int64_t stride)
{
    for (int64_t t = 0; t < count; t++)
        __builtin_prefetch(row + t * stride, 0, 1);
}

static void attend(const float *q_row, int64_t q_head_stride, const float *k_cache, const float *v_cache,
                   const int64_t *table, int64_t len, int64_t first_kv, int64_t kv_count, int64_t group,
                   int64_t head_dim, int64_t block_size, int64_t token_stride, float scale,
                   float *out_row, int64_t out_head_stride)
{
    const int64_t rows = kv_count * group;  /* query heads of this task, in order */
    const int64_t block_stride = block_size * token_stride;
    float query[rows][head_dim], acc[rows][head_dim], scores[rows][block_size], top[rows], mass[rows];

    for (int64_t r = 0; r < rows; r++) {
        const float *qh = q_row + (first_kv * group + r) * q_head_stride;
        for (int64_t d = 0; d < head_dim; d++) {
            query[r][d] = qh[d] * scale;
            acc[r][d] = 0.0f;
        }
        top[r] = -INFINITY;
        mass[r] = 0.0f;
    }

    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t tokens = min64(len - start, block_size), block = start / block_size;
        const int64_t offset = table[block] * block_stride + first_kv * head_dim;
        const float *keys = k_cache + offset, *values = v_cache + offset;
        if (start + block_size < len) {
            const int64_t next = table[block + 1] * block_stride + first_kv * head_dim;
            const int64_t next_tokens = min64(len - start - block_size, block_size);
            prefetch_rows(k_cache + next, next_tokens, token_stride);
            prefetch_rows(v_cache + next, next_tokens, token_stride);
        }

        for (int64_t t = 0; t < tokens; t++) {
            const float *key_row = keys + t * token_stride;
            for (int64_t r = 0; r < rows; r++) {
                const float *key = key_row + (r / group) * head_dim;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (int64_t d = 0; d < head_dim; d++)
                    dot += query[r][d] * key[d];
                scores[r][t] = dot;
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            float tile_top = top[r];
            for (int64_t t = 0; t < tokens; t++)
                tile_top = scores[r][t] > tile_top ? scores[r][t] : tile_top;
            const float rescale = expf(top[r] - tile_top);  /* 0 on the first tile: top was -inf */
            float sum = 0.0f;
            #pragma omp simd reduction(+:sum)
            for (int64_t t = 0; t < tokens; t++) {
                const float p = expf(scores[r][t] - tile_top);
                scores[r][t] = p;
                sum += p;
            }
            sum += mass[r] * rescale;
            top[r] = tile_top;
            mass[r] = sum;
            #pragma omp simd
            for (int64_t d = 0; d < head_dim; d++)
                acc[r][d] *= rescale;
        }
        for (int64_t t = 0; t < tokens; t++) {
            const float *value_row = values + t * token_stride;
            for (int64_t r = 0; r < rows; r++) {
                const float *value = value_row + (r / group) * head_dim;
                const float p = scores[r][t];
                #pragma omp simd
                for (int64_t d = 0; d < head_dim; d++)
                    acc[r][d] += p * value[d];
            }
        }
    }

    for (int64_t r = 0; r < rows; r++) {
        float *oh = out_row + (first_kv * group + r) * out_head_stride;
        const float inverse = 1.0f / mass[r];
        for (int64_t d = 0; d < head_dim; d++)
            oh[d] = acc[r][d] * inverse;
    }
}

void paged_decode_f32(
    const float *q, int64_t q_row_stride, int64_t q_head_stride,           /* [T, heads, head_dim] */
    const float *k_cache, const float *v_cache,                            /* [blocks, block_size, kv_heads, head_dim] */
    const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,  /* [S, width], [S] */
    const int64_t *decode_rows, const int64_t *decode_seqs, int64_t num_decodes, /* decode k: q row, sequence */
    int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
    float *out, int64_t out_row_stride, int64_t out_head_stride)           /* [T, heads, head_dim] */
{
    const int64_t group = heads / kv_heads, token_stride = kv_heads * head_dim;
    /* Few decodes: split their KV heads into runs, so that every thread has work. */
    const int64_t wanted = (2 * omp_get_max_threads() + num_decodes - 1) / num_decodes;
    const int64_t runs = wanted < 1 ? 1 : min64(wanted, kv_heads), per_run = (kv_heads + runs - 1) / runs;

    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t k = 0; k < num_decodes; k++) {
        for (int64_t run = 0; run < runs; run++) {
            const int64_t first_kv = run * per_run;
            if (first_kv >= kv_heads)
                continue;
            const int64_t seq = decode_seqs[k];
            attend(q + decode_rows[k] * q_row_stride, q_head_stride, k_cache, v_cache,
                   block_tables + seq * table_stride, seq_lens[seq], first_kv, min64(per_run, kv_heads - first_kv),
                   group, head_dim, block_size, token_stride, scale, out + decode_rows[k] * out_row_stride,
                   out_head_stride);
        }
    }
}
