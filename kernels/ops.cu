// Everything else a Llama forward pass needs on the GPU, for f32, f16 and bf16 buffers. Arithmetic
// is f32 throughout; results are rounded to the buffer type once, on store.
//
// Prepended: common.cuh.

// out[row] = table[token_ids[row]]; ids at or past `vocab` give a zero row.
template <typename T>
__device__ void embedding_impl(const T* __restrict__ table, const u32* __restrict__ ids, int vocab,
                               int hidden, T* __restrict__ out) {
    const int row = blockIdx.x;
    const u32 id = ids[row];
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        out[(size_t)row * hidden + c] =
            (id < (u32)vocab) ? table[(size_t)id * hidden + c] : from_f32<T>(0.0f);
    }
}

// out = x / rms(x) * w, one block per row. With `residual`, first residual += x (rounded to T)
// and normalise the new residual.
template <typename T>
__device__ void rms_norm_impl(T* __restrict__ residual, const T* __restrict__ x,
                              const T* __restrict__ w, float eps, int hidden,
                              T* __restrict__ out) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float val = to_f32(x[base + c]);
        if (residual != nullptr) {
            const T sum = from_f32<T>(to_f32(residual[base + c]) + val);
            residual[base + c] = sum;
            val = to_f32(sum);
        }
        ss += val * val;
    }
    const float total = block_sum(ss, scratch);
    const float inv = rsqrtf(total / (float)hidden + eps);
    const T* src = (residual != nullptr) ? residual : x;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        out[base + c] = from_f32<T>(to_f32(src[base + c]) * inv * to_f32(w[c]));
    }
}

template <typename T>
__device__ void add_assign_impl(T* __restrict__ y, const T* __restrict__ x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(x[i]));
    }
}

// Rotate-half RoPE in place; grid (rows, n_heads), one thread per pair (i, i + head_dim/2).
template <typename T>
__device__ void rope_impl(T* __restrict__ x, const float* __restrict__ inv_freq,
                          const u32* __restrict__ positions, int row_stride, int col_offset,
                          int head_dim) {
    const int row = blockIdx.x, head = blockIdx.y;
    const int half = head_dim / 2;
    const float pos = (float)positions[row];
    T* p = x + (size_t)row * row_stride + col_offset + (size_t)head * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float sn, cs;
        sincosf(pos * inv_freq[i], &sn, &cs);
        const float a = to_f32(p[i]), b = to_f32(p[i + half]);
        p[i] = from_f32<T>(a * cs - b * sn);
        p[i + half] = from_f32<T>(b * cs + a * sn);
    }
}

// Copy each row's K and V (kv_width values at k_offset / v_offset) into the paged caches.
template <typename T>
__device__ void write_kv_impl(const T* __restrict__ src, int row_stride, int k_offset,
                              int v_offset, const u32* __restrict__ slots, int kv_width,
                              T* __restrict__ k_cache, T* __restrict__ v_cache) {
    const int row = blockIdx.x;
    const size_t dst = (size_t)slots[row] * kv_width;
    const T* s = src + (size_t)row * row_stride;
    for (int c = threadIdx.x; c < kv_width; c += blockDim.x) {
        k_cache[dst + c] = s[k_offset + c];
        v_cache[dst + c] = s[v_offset + c];
    }
}

#define ATTN_WARPS 4
#define ATTN_MAX_PER_LANE 8  // head_dim <= 256

// Causal paged attention, one block per (row, head); each warp walks a strided share of the
// context with an online softmax in f32, then the warps' partial results are merged.
// seqs: 5 u32 per sequence (row_start, num_rows, context_len, block_table_start, num_blocks).
template <typename T>
__device__ void attention_impl(const T* __restrict__ q, int row_stride, int q_offset,
                               const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                               const u32* __restrict__ row_seq, const u32* __restrict__ seqs,
                               const u32* __restrict__ block_tables, int n_heads, int n_kv_heads,
                               int head_dim, float scale, T* __restrict__ out) {
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][ATTN_MAX_PER_LANE * 32];
    const int row = blockIdx.x, head = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32* sq = seqs + 5 * row_seq[row];
    const int row_start = (int)sq[0], num_rows = (int)sq[1], ctx = (int)sq[2];
    const u32* bt = block_tables + sq[3];
    const int visible = ctx - num_rows + (row - row_start) + 1;
    const int kvh = head / (n_heads / n_kv_heads);
    const int kv_width = n_kv_heads * head_dim;

    float qv[ATTN_MAX_PER_LANE], acc[ATTN_MAX_PER_LANE];
    const T* qp = q + (size_t)row * row_stride + q_offset + (size_t)head * head_dim;
#pragma unroll
    for (int i = 0; i < ATTN_MAX_PER_LANE; ++i) {
        const int d = i * 32 + lane;
        qv[i] = (d < head_dim) ? to_f32(qp[d]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int p = warp; p < visible; p += ATTN_WARPS) {
        const size_t slot = (size_t)bt[p / 16] * 16 + (p % 16);
        const T* kp = k_cache + slot * kv_width + (size_t)kvh * head_dim;
        const T* vp = v_cache + slot * kv_width + (size_t)kvh * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < ATTN_MAX_PER_LANE; ++i) {
            const int d = i * 32 + lane;
            if (d < head_dim) dot += qv[i] * to_f32(kp[d]);
        }
        const float sc = warp_sum(dot);
        const float m_new = fmaxf(m, sc);
        const float corr = expf(m - m_new);
        const float pw = expf(sc - m_new);
        l = l * corr + pw;
#pragma unroll
        for (int i = 0; i < ATTN_MAX_PER_LANE; ++i) {
            const int d = i * 32 + lane;
            acc[i] = acc[i] * corr + ((d < head_dim) ? pw * to_f32(vp[d]) : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATTN_MAX_PER_LANE; ++i) s_acc[warp][i * 32 + lane] = acc[i];
    __syncthreads();
    float gm = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; ++w) gm = fmaxf(gm, s_m[w]);
    float gl = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) {
        if (s_m[w] != NEG_INF) gl += s_l[w] * expf(s_m[w] - gm);
    }
    T* op = out + (size_t)row * n_heads * head_dim + (size_t)head * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) {
            if (s_m[w] != NEG_INF) sum += s_acc[w][d] * expf(s_m[w] - gm);
        }
        op[d] = from_f32<T>(gl > 0.0f ? sum / gl : 0.0f);
    }
}

template <typename T>
__device__ void silu_mul_impl(const T* __restrict__ gate_up, int n, size_t total,
                              T* __restrict__ out) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / n, c = i % n;
        const float g = to_f32(gate_up[row * 2 * n + c]);
        const float u = to_f32(gate_up[row * 2 * n + n + c]);
        out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
    }
}

template <typename T>
__device__ void gather_rows_impl(const T* __restrict__ x, const u32* __restrict__ rows,
                                 int hidden, T* __restrict__ out) {
    const size_t src = (size_t)rows[blockIdx.x] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        out[(size_t)blockIdx.x * hidden + c] = x[src + c];
    }
}

// Per row of x: the index of the largest value (the first one on ties), one block per row.
template <typename T>
__device__ void argmax_impl(const T* __restrict__ x, int cols, u32* __restrict__ out) {
    __shared__ float s_v[32];
    __shared__ int s_i[32];
    const T* p = x + (size_t)blockIdx.x * cols;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float val = to_f32(p[c]);
        if (val > best || (val == best && c < bi)) {
            best = val;
            bi = c;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_v[warp] = best;
        s_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        for (int w = 1; w < nw; ++w) {
            if (s_v[w] > best || (s_v[w] == best && s_i[w] < bi)) {
                best = s_v[w];
                bi = s_i[w];
            }
        }
        out[blockIdx.x] = (bi == 0x7fffffff) ? 0u : (u32)bi;
    }
}

// Greedy pick per row of f32 logits: the first largest logit and its log-probability
// (log-softmax of the raw row), one block per row, one pass (online max and sum of exponentials).
// NaN logits are never picked and add nothing to the sum.
extern "C" __global__ void greedy_pick_f32(const float* __restrict__ logits, int vocab,
                                           u32* __restrict__ tokens, float* __restrict__ logprobs) {
    __shared__ float s_v[32], s_m[32], s_s[32];
    __shared__ int s_i[32];
    const float* p = logits + (size_t)blockIdx.x * vocab;
    float best = NEG_INF, m = NEG_INF, sum = 0.0f;
    int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = p[c];
        if (v != v) continue;
        if (v > best) {
            best = v;
            bi = c;
        }
        if (v > m) {
            sum = sum * __expf(m - v) + 1.0f;
            m = v;
        } else {
            sum += __expf(v - m);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const float os = __shfl_xor_sync(0xffffffffu, sum, o);
        const float nm = fmaxf(m, om);
        sum = (nm == NEG_INF) ? 0.0f : sum * __expf(m - nm) + os * __expf(om - nm);
        m = nm;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_v[warp] = best;
        s_i[warp] = bi;
        s_m[warp] = m;
        s_s[warp] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        for (int w = 1; w < nw; ++w) {
            if (s_v[w] > best || (s_v[w] == best && s_i[w] < bi)) {
                best = s_v[w];
                bi = s_i[w];
            }
            const float nm = fmaxf(m, s_m[w]);
            sum = (nm == NEG_INF) ? 0.0f : sum * __expf(m - nm) + s_s[w] * __expf(s_m[w] - nm);
            m = nm;
        }
        tokens[blockIdx.x] = (bi == 0x7fffffff) ? 0u : (u32)bi;
        logprobs[blockIdx.x] = (bi == 0x7fffffff) ? NEG_INF : best - m - __logf(sum);
    }
}

// Fill with a constant given as f32 (NaN poisons outputs in tests).
template <typename T>
__device__ void fill_impl(T* __restrict__ y, float val, size_t n) {
    const T t = from_f32<T>(val);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        y[i] = t;
    }
}

// Deterministic uniform values in [-scale, scale) from a hash of (seed, index).
template <typename T>
__device__ void fill_random_impl(T* __restrict__ y, u32 seed, float scale, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 0x9E3779B1u ^ (u32)(i >> 32) * 0x85EBCA77u ^ seed * 0xC2B2AE3Du;
        h ^= h >> 16;
        h *= 0x7FEB352Du;
        h ^= h >> 15;
        h *= 0x846CA68Bu;
        h ^= h >> 16;
        const float u = (float)(h >> 8) * (1.0f / 16777216.0f);
        y[i] = from_f32<T>((2.0f * u - 1.0f) * scale);
    }
}

#define DEFINE_OPS(TNAME, T)                                                                  \
    extern "C" __global__ void embedding_##TNAME(const T* table, const u32* ids, int vocab,  \
                                                 int hidden, T* out) {                       \
        embedding_impl<T>(table, ids, vocab, hidden, out);                                    \
    }                                                                                         \
    extern "C" __global__ void rms_norm_##TNAME(T* residual, const T* x, const T* w,         \
                                                float eps, int hidden, T* out) {              \
        rms_norm_impl<T>(residual, x, w, eps, hidden, out);                                   \
    }                                                                                         \
    extern "C" __global__ void add_assign_##TNAME(T* y, const T* x, size_t n) {              \
        add_assign_impl<T>(y, x, n);                                                          \
    }                                                                                         \
    extern "C" __global__ void rope_##TNAME(T* x, const float* inv_freq, const u32* pos,     \
                                            int row_stride, int col_offset, int head_dim) {   \
        rope_impl<T>(x, inv_freq, pos, row_stride, col_offset, head_dim);                     \
    }                                                                                         \
    extern "C" __global__ void write_kv_##TNAME(const T* src, int row_stride, int k_offset,  \
                                                int v_offset, const u32* slots, int kv_width, \
                                                T* k_cache, T* v_cache) {                     \
        write_kv_impl<T>(src, row_stride, k_offset, v_offset, slots, kv_width, k_cache,       \
                         v_cache);                                                            \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_##TNAME(         \
        const T* q, int row_stride, int q_offset, const T* k_cache, const T* v_cache,         \
        const u32* row_seq, const u32* seqs, const u32* block_tables, int n_heads,            \
        int n_kv_heads, int head_dim, float scale, T* out) {                                  \
        attention_impl<T>(q, row_stride, q_offset, k_cache, v_cache, row_seq, seqs,           \
                          block_tables, n_heads, n_kv_heads, head_dim, scale, out);           \
    }                                                                                         \
    extern "C" __global__ void silu_mul_##TNAME(const T* gate_up, int n, size_t total,       \
                                                T* out) {                                     \
        silu_mul_impl<T>(gate_up, n, total, out);                                             \
    }                                                                                         \
    extern "C" __global__ void gather_rows_##TNAME(const T* x, const u32* rows, int hidden,  \
                                                   T* out) {                                  \
        gather_rows_impl<T>(x, rows, hidden, out);                                            \
    }                                                                                         \
    extern "C" __global__ void argmax_##TNAME(const T* x, int cols, u32* out) {              \
        argmax_impl<T>(x, cols, out);                                                         \
    }                                                                                         \
    extern "C" __global__ void fill_##TNAME(T* y, float val, size_t n) {                     \
        fill_impl<T>(y, val, n);                                                              \
    }                                                                                         \
    extern "C" __global__ void fill_random_##TNAME(T* y, u32 seed, float scale, size_t n) {  \
        fill_random_impl<T>(y, seed, scale, n);                                               \
    }

DEFINE_OPS(f32, float)
DEFINE_OPS(f16, f16)
DEFINE_OPS(bf16, bf16)
