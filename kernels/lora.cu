// Per-head LoRA on the GPU: the adapter term of `y = x W^T + s (x A^T) B^T`
// restricted to selected heads, and its backward pass, without forming the
// full-size `B A` or a full-size `[tokens, out]` delta.
//
// Compiled at run time with NVRTC (src/model/cuda_lora.rs), so it includes no
// header: bf16 values travel as their 16 raw bits and every kernel converts
// them by hand, accumulating in f32. Entry points come in `_f32` and `_bf16`
// flavours of the same template.
//
// A selection is a list of indices into a matrix's columns: `rows` picks the
// output features the adapter writes (the rows of W that belong to selected
// heads, for q/k/v), `cols` the input features it reads (o). A null list
// means every index, in order. The adapter itself is stored compact: `A_sel`
// `[r, n_cols]`, `B_sel` `[n_rows, r]`.
//
// Two building blocks cover the forward and the backward pass:
//
// - `low_rank_add`: `t = in[:, in_idx] R^T` into shared memory (optionally
//   also to a global f32 buffer), then `out[:, out_idx] += s t E^T`, one
//   tile of tokens per block, one pass over `out`. Forward: in = x, R = A_sel,
//   E = B_sel. Backward dx: in = g, R = B_sel^T, E = A_sel^T, added onto the
//   cuBLAS product `g W`.
// - `outer_partial` + `outer_finish`: `P = s M[:, idx]^T L` for `M`
//   `[tokens, .]` and an f32 `L` `[tokens, r]`, reduced over tokens in
//   fixed-size chunks and then summed over chunks in a fixed order, so the
//   result does not depend on scheduling. dA: M = x, L = g B_sel; dB: M = g,
//   L = x A_sel^T.
//
// Output entries whose row of E is all zero are left untouched: a full-size
// B that is zero outside the selected heads then costs no traffic outside
// them. (The composed ops would write `y + 0 * t` there, which differs only
// when `t` is not finite.)

typedef unsigned short bf16_bits;

// Tokens per block of `low_rank_add`: each of its 8 warps reduces 4 tokens,
// so every value of R staged in shared memory feeds 4 FMAs per load.
#define WARPS 8
#define THREADS (WARPS * 32)
#define WARP_TOKENS 4
#define TILE_TOKENS (WARPS * WARP_TOKENS)
// Ranks are processed 16 at a time so that the accumulators stay in registers.
#define RANK_CHUNK 16
#define MAX_RANK 64
// Input features staged in shared memory per step of the reduction.
#define IN_CHUNK 256
// Tokens per partial sum of `outer_partial`, and per shared-memory stage.
#define OUTER_TOKENS 256
#define OUTER_STAGE 64

__device__ __forceinline__ float to_f32(float v) { return v; }

__device__ __forceinline__ float to_f32(bf16_bits v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }

// Round to nearest even, keeping NaN a NaN.
__device__ __forceinline__ void store(bf16_bits* p, float v) {
    unsigned int bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        *p = (bf16_bits)((bits >> 16) | 0x0040u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *p = (bf16_bits)(bits >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// `r(k, i)` is `R[k * r_k + i * r_i]`, `e(j, k)` is `E[j * e_j + k * e_k]`.
// `out` may be null (only `low` is wanted), `low` may be null. The launch has
// `ceil(tokens / TILE_TOKENS)` blocks of THREADS threads and rank <= MAX_RANK.
template <typename T>
__device__ void low_rank_add(
    T* out, long long out_stride, const unsigned int* out_idx, int n_out,
    const T* in, long long in_stride, const unsigned int* in_idx, int n_in,
    const T* r_mat, long long r_k, long long r_i,
    const T* e_mat, long long e_j, long long e_k,
    float* low, int tokens, int rank, float scale) {
    __shared__ float r_tile[RANK_CHUNK][IN_CHUNK];
    // Zero past `rank`, so the expansion can run over whole chunks.
    __shared__ float t_tile[TILE_TOKENS][MAX_RANK];

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int tile0 = blockIdx.x * TILE_TOKENS;
    const int tok0 = tile0 + WARP_TOKENS * warp;
    const int rank_chunks = (rank + RANK_CHUNK - 1) / RANK_CHUNK;

    for (int e = threadIdx.x; e < TILE_TOKENS * MAX_RANK; e += THREADS) {
        t_tile[e / MAX_RANK][e % MAX_RANK] = 0.0f;
    }

    // t = in[:, in_idx] R^T, WARP_TOKENS tokens per warp, R staged through shared memory.
    for (int k0 = 0; k0 < rank; k0 += RANK_CHUNK) {
        float acc[WARP_TOKENS][RANK_CHUNK];
#pragma unroll
        for (int w = 0; w < WARP_TOKENS; ++w) {
#pragma unroll
            for (int q = 0; q < RANK_CHUNK; ++q) acc[w][q] = 0.0f;
        }
        for (int i0 = 0; i0 < n_in; i0 += IN_CHUNK) {
            __syncthreads();
            for (int e = threadIdx.x; e < RANK_CHUNK * IN_CHUNK; e += THREADS) {
                const int q = e / IN_CHUNK, ii = e % IN_CHUNK;
                const int k = k0 + q, i = i0 + ii;
                r_tile[q][ii] = (k < rank && i < n_in) ? to_f32(r_mat[k * r_k + i * r_i]) : 0.0f;
            }
            __syncthreads();
            for (int ii = lane; ii < IN_CHUNK && i0 + ii < n_in; ii += 32) {
                const int i = i0 + ii;
                const long long col = in_idx ? in_idx[i] : i;
                float xv[WARP_TOKENS];
#pragma unroll
                for (int w = 0; w < WARP_TOKENS; ++w) {
                    const int tok = tok0 + w;
                    xv[w] = tok < tokens ? to_f32(in[tok * in_stride + col]) : 0.0f;
                }
#pragma unroll
                for (int q = 0; q < RANK_CHUNK; ++q) {
                    const float rv = r_tile[q][ii];
#pragma unroll
                    for (int w = 0; w < WARP_TOKENS; ++w) acc[w][q] += xv[w] * rv;
                }
            }
        }
#pragma unroll
        for (int w = 0; w < WARP_TOKENS; ++w) {
#pragma unroll
            for (int q = 0; q < RANK_CHUNK; ++q) {
                const float sum = warp_sum(acc[w][q]);
                if (lane == 0 && k0 + q < rank) t_tile[WARP_TOKENS * warp + w][k0 + q] = sum;
            }
        }
    }
    __syncthreads();

    if (low) {
        for (int e = threadIdx.x; e < TILE_TOKENS * rank; e += THREADS) {
            const int tl = e / rank, k = e % rank;
            if (tile0 + tl < tokens) low[(long long)(tile0 + tl) * rank + k] = t_tile[tl][k];
        }
    }
    if (!out) return;

    // out[:, out_idx] += s t E^T: one output feature per thread, all tokens of
    // the tile, so E's row is read once per tile and the writes coalesce.
    for (int j = threadIdx.x; j < n_out; j += THREADS) {
        float acc[TILE_TOKENS];
#pragma unroll
        for (int tl = 0; tl < TILE_TOKENS; ++tl) acc[tl] = 0.0f;
        bool nonzero = false;
        for (int c = 0; c < rank_chunks; ++c) {
            const int k0 = c * RANK_CHUNK;
            float ev[RANK_CHUNK];
#pragma unroll
            for (int q = 0; q < RANK_CHUNK; ++q) {
                ev[q] = k0 + q < rank ? to_f32(e_mat[j * e_j + (k0 + q) * e_k]) : 0.0f;
                nonzero |= ev[q] != 0.0f;
            }
#pragma unroll
            for (int tl = 0; tl < TILE_TOKENS; ++tl) {
#pragma unroll
                for (int q = 0; q < RANK_CHUNK; ++q) acc[tl] += t_tile[tl][k0 + q] * ev[q];
            }
        }
        if (!nonzero) continue;
        const long long col = out_idx ? out_idx[j] : j;
#pragma unroll
        for (int tl = 0; tl < TILE_TOKENS; ++tl) {
            const int tok = tile0 + tl;
            if (tok < tokens) {
                T* p = out + tok * out_stride + col;
                store(p, to_f32(*p) + scale * acc[tl]);
            }
        }
    }
}

// partial[chunk][j * rank + k] = sum over the chunk's tokens of
// M[tok, idx[j]] * L[tok, k]. Grid: (ceil(n / THREADS), ceil(tokens / OUTER_TOKENS)).
template <typename T>
__device__ void outer_partial(
    float* partial, const T* m, long long m_stride, const unsigned int* idx, int n,
    const float* l, int tokens, int rank) {
    __shared__ float l_tile[OUTER_STAGE][RANK_CHUNK];
    const int j = blockIdx.x * THREADS + threadIdx.x;
    const int chunk = blockIdx.y;
    const int first = chunk * OUTER_TOKENS;
    const int last = min(first + OUTER_TOKENS, tokens);
    const long long col = j < n ? (idx ? idx[j] : j) : 0;

    for (int k0 = 0; k0 < rank; k0 += RANK_CHUNK) {
        float acc[RANK_CHUNK];
#pragma unroll
        for (int q = 0; q < RANK_CHUNK; ++q) acc[q] = 0.0f;
        for (int s0 = first; s0 < last; s0 += OUTER_STAGE) {
            __syncthreads();
            for (int e = threadIdx.x; e < OUTER_STAGE * RANK_CHUNK; e += THREADS) {
                const int tl = e / RANK_CHUNK, q = e % RANK_CHUNK;
                const int tok = s0 + tl, k = k0 + q;
                l_tile[tl][q] = (tok < last && k < rank) ? l[(long long)tok * rank + k] : 0.0f;
            }
            __syncthreads();
            if (j < n) {
                const int count = min(OUTER_STAGE, last - s0);
                for (int tl = 0; tl < count; ++tl) {
                    const float mv = to_f32(m[(s0 + tl) * m_stride + col]);
#pragma unroll
                    for (int q = 0; q < RANK_CHUNK; ++q) acc[q] += mv * l_tile[tl][q];
                }
            }
        }
        if (j < n) {
            float* p = partial + ((long long)chunk * n + j) * rank;
#pragma unroll
            for (int q = 0; q < RANK_CHUNK; ++q) {
                if (k0 + q < rank) p[k0 + q] = acc[q];
            }
        }
    }
}

// out[j * o_j + k * o_k] = s * sum over chunks, in order, of partial[chunk][j * rank + k].
template <typename T>
__device__ void outer_finish(
    T* out, long long o_j, long long o_k, const float* partial, int chunks, int n, int rank,
    float scale) {
    const long long e = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (e >= (long long)n * rank) return;
    const long long j = e / rank, k = e % rank;
    float sum = 0.0f;
    for (int c = 0; c < chunks; ++c) sum += partial[(long long)c * n * rank + e];
    store(out + j * o_j + k * o_k, scale * sum);
}

#define LORA_KERNELS(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) low_rank_add_##NAME(                  \
        T* out, long long out_stride, const unsigned int* out_idx, int n_out, const T* in,     \
        long long in_stride, const unsigned int* in_idx, int n_in, const T* r_mat,             \
        long long r_k, long long r_i, const T* e_mat, long long e_j, long long e_k,            \
        float* low, int tokens, int rank, float scale) {                                       \
        low_rank_add<T>(out, out_stride, out_idx, n_out, in, in_stride, in_idx, n_in, r_mat,   \
                        r_k, r_i, e_mat, e_j, e_k, low, tokens, rank, scale);                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS) outer_partial_##NAME(                 \
        float* partial, const T* m, long long m_stride, const unsigned int* idx, int n,        \
        const float* l, int tokens, int rank) {                                                \
        outer_partial<T>(partial, m, m_stride, idx, n, l, tokens, rank);                       \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS) outer_finish_##NAME(                  \
        T* out, long long o_j, long long o_k, const float* partial, int chunks, int n,         \
        int rank, float scale) {                                                               \
        outer_finish<T>(out, o_j, o_k, partial, chunks, n, rank, scale);                       \
    }

LORA_KERNELS(f32, float)
LORA_KERNELS(bf16, bf16_bits)
