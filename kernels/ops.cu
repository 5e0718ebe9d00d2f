// Everything else a Llama forward pass needs on the GPU, for f32, f16 and bf16 buffers. Arithmetic
// is f32 throughout; results are rounded to the buffer type once, on store.
//
// Every kernel the forward runs starts with pdl_enter() (common.cuh), so the backend may launch it
// with programmatic dependent launch: its launch overlaps the previous kernel's tail, and nothing is
// read from the previous kernel or written before that kernel has completed.
//
// Prepended: common.cuh.

// out[row] = table[token_ids[row]]; ids at or past `vocab` give a zero row.
template <typename T>
__device__ void embedding_impl(const T* __restrict__ table, const u32* __restrict__ ids, int vocab,
                               int hidden, T* __restrict__ out) {
    pdl_enter();
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
__device__ void rms_norm_impl(T* __restrict__ residual, const T* __restrict__ x, int x_stride,
                              const T* __restrict__ w, float eps, int hidden,
                              T* __restrict__ out) {
    __shared__ float scratch[32];
    pdl_enter();
    const size_t base = (size_t)blockIdx.x * hidden;
    const T* xr = x + (size_t)blockIdx.x * x_stride;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float val = to_f32(xr[c]);
        if (residual != nullptr) {
            const T sum = from_f32<T>(to_f32(residual[base + c]) + val);
            residual[base + c] = sum;
            val = to_f32(sum);
        }
        ss += val * val;
    }
    const float total = block_sum(ss, scratch);
    const float inv = rsqrtf(total / (float)hidden + eps);
    const T* src = (residual != nullptr) ? residual + base : xr;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        out[base + c] = from_f32<T>(to_f32(src[c]) * inv * to_f32(w[c]));
    }
}

#define NORM_VEC_THREADS 512

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* f) {
    return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]),
                      pack2<T>(f[6], f[7]));
}

// rms_norm_impl for bf16/f16 rows of hidden % 8 == 0 and 16-byte aligned, the row held in
// registers: one pass of 16-byte loads (VPT vectors a thread, strided by the block), one
// block reduction, one pass of 16-byte stores. Rounding as in rms_norm_impl: the new residual
// is rounded to T before it is squared and normalised.
template <typename T, int VPT>
__device__ void rms_norm_vec_impl(T* __restrict__ residual, const T* __restrict__ x,
                                  int x_stride, const T* __restrict__ w, float eps, int hidden,
                                  T* __restrict__ out) {
    __shared__ float scratch[32];
    pdl_enter();
    const int nvec = hidden >> 3;
    const size_t base = (size_t)blockIdx.x * hidden;
    // Activations through L2 only: they were written by the kernel this one waited for.
    const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)blockIdx.x * x_stride);
    uint4* rr = reinterpret_cast<uint4*>(residual + base);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    float v[VPT][8];
    uint4 wv[VPT];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int k = threadIdx.x + i * blockDim.x;
        if (k < nvec) {
            unpack8<T>(__ldcg(xr + k), v[i]);
            wv[i] = __ldg(wr + k);
            if (residual != nullptr) {
                float r[8];
                unpack8<T>(__ldcg(rr + k), r);
#pragma unroll
                for (int j = 0; j < 8; ++j) r[j] += v[i][j];
                const uint4 sum = pack8<T>(r);
                rr[k] = sum;
                unpack8<T>(sum, v[i]);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) ss += v[i][j] * v[i][j];
        }
    }
    const float total = block_sum(ss, scratch);
    const float inv = rsqrtf(total / (float)hidden + eps);
    uint4* orow = reinterpret_cast<uint4*>(out + base);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int k = threadIdx.x + i * blockDim.x;
        if (k < nvec) {
            float wf[8], o[8];
            unpack8<T>(wv[i], wf);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = v[i][j] * inv * wf[j];
            orow[k] = pack8<T>(o);
        }
    }
}

template <typename T>
__device__ void add_assign_impl(T* __restrict__ y, const T* __restrict__ x, size_t n) {
    pdl_enter();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(x[i]));
    }
}

// Rotate-half RoPE of the q and k heads of each qkv row in place (q, k and v heads packed from
// column 0), and the rotated K and the V of the row written into the paged caches at its slot.
// Grid (rows, n_heads + n_kv_heads): a block rotates one head, one thread a pair
// (i, i + head_dim/2); the blocks of k heads also copy their head of K and V to the caches.
template <typename T>
__device__ void rope_write_kv_impl(T* __restrict__ qkv, int row_stride,
                                   const float* __restrict__ inv_freq,
                                   const u32* __restrict__ positions,
                                   const u32* __restrict__ slots, int n_heads, int n_kv_heads,
                                   int head_dim, T* __restrict__ k_cache,
                                   T* __restrict__ v_cache) {
    pdl_enter();
    const int row = blockIdx.x, head = blockIdx.y;
    const int half = head_dim / 2;
    const float pos = (float)positions[row];
    T* r = qkv + (size_t)row * row_stride;
    T* p = r + (size_t)head * head_dim;
    const int kvh = head - n_heads;
    const T* v = r + (size_t)(n_heads + n_kv_heads + kvh) * head_dim;
    const size_t dst = (size_t)slots[row] * n_kv_heads * head_dim + (size_t)kvh * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float sn, cs;
        sincosf(pos * inv_freq[i], &sn, &cs);
        const float a = to_f32(p[i]), b = to_f32(p[i + half]);
        const T ra = from_f32<T>(a * cs - b * sn), rb = from_f32<T>(b * cs + a * sn);
        p[i] = ra;
        p[i + half] = rb;
        if (kvh >= 0) {
            k_cache[dst + i] = ra;
            k_cache[dst + i + half] = rb;
            v_cache[dst + i] = v[i];
            v_cache[dst + i + half] = v[i + half];
        }
    }
}

#define ATTN_WARPS 4
#define ATTN_MAX_PER_LANE 8  // head_dim <= 256

// The start of both attention kernels: the block table of the row's sequence, how many of its
// positions the row sees (causal), and the KV head of the row's query head (GQA).
struct AttnRow {
    const u32* bt;
    int visible;
    int kvh;
};

__device__ __forceinline__ AttnRow attn_row(const u32* __restrict__ row_seq,
                                            const u32* __restrict__ seqs,
                                            const u32* __restrict__ block_tables, int row,
                                            int head, int n_heads, int n_kv_heads) {
    const u32* sq = seqs + 5 * row_seq[row];
    const int row_start = (int)sq[0], num_rows = (int)sq[1], ctx = (int)sq[2];
    AttnRow r;
    r.bt = block_tables + sq[3];
    r.visible = ctx - num_rows + (row - row_start) + 1;
    r.kvh = head / (n_heads / n_kv_heads);
    return r;
}

// The end of both attention kernels: merge the warps' partial softmax states (running max
// s_m, sum s_l, accumulator s_acc, in shared memory after a barrier) of one (row, head) and
// write its hd normalised outputs to op.
template <typename T, int N>
__device__ __forceinline__ void attn_merge(const float* s_m, const float* s_l,
                                           const float (*s_acc)[N], int hd, T* op) {
    float gm = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; ++w) gm = fmaxf(gm, s_m[w]);
    float gl = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) {
        if (s_m[w] != NEG_INF) gl += s_l[w] * expf(s_m[w] - gm);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) {
            if (s_m[w] != NEG_INF) sum += s_acc[w][d] * expf(s_m[w] - gm);
        }
        op[d] = from_f32<T>(gl > 0.0f ? sum / gl : 0.0f);
    }
}

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
    pdl_enter();
    const int row = blockIdx.x, head = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const AttnRow ar = attn_row(row_seq, seqs, block_tables, row, head, n_heads, n_kv_heads);
    const u32* bt = ar.bt;
    const int visible = ar.visible, kvh = ar.kvh;
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
    attn_merge(s_m, s_l, s_acc, head_dim,
               out + (size_t)row * n_heads * head_dim + (size_t)head * head_dim);
}

// attention_impl for bf16/f16 caches with head_dim = 64 * W: lane l holds dims [2Wl, 2Wl + 2W)
// and reads them as W 32-bit words (one 4-, 8- or 16-byte load per row), and each warp loads the
// K and V rows of ATTN_VEC_TOKENS positions before using any, so that many rows are in flight
// per warp instead of one memory round trip per position. Same arithmetic as attention_impl:
// f32 scores, an online softmax per warp, the warps merged at the end.
#define ATTN_VEC_TOKENS 8

template <int W>
__device__ __forceinline__ void load_words(const void* p, u32 (&w)[W]) {
    if (W == 4) {
        const uint4 t = *reinterpret_cast<const uint4*>(p);
        w[0] = t.x; w[1] = t.y; w[2 % W] = t.z; w[3 % W] = t.w;
    } else if (W == 2) {
        const uint2 t = *reinterpret_cast<const uint2*>(p);
        w[0] = t.x; w[1 % W] = t.y;
    } else {
        w[0] = *reinterpret_cast<const u32*>(p);
    }
}

template <typename T, int W>
__device__ void attention_vec_impl(const T* __restrict__ q, int row_stride, int q_offset,
                                   const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                   const u32* __restrict__ row_seq, const u32* __restrict__ seqs,
                                   const u32* __restrict__ block_tables, int n_heads,
                                   int n_kv_heads, float scale, T* __restrict__ out) {
    constexpr int HD = 64 * W, E = 2 * W;
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][HD];
    pdl_enter();
    const int row = blockIdx.x, head = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const AttnRow ar = attn_row(row_seq, seqs, block_tables, row, head, n_heads, n_kv_heads);
    const u32* bt = ar.bt;
    const int visible = ar.visible, kvh = ar.kvh;
    const int kv_width = n_kv_heads * HD;
    const T dummy = T{};

    float qv[E], acc[E];
    const T* qp = q + (size_t)row * row_stride + q_offset + (size_t)head * HD + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        qv[e] = to_f32(qp[e]) * scale;
        acc[e] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int p0 = warp * ATTN_VEC_TOKENS; p0 < visible; p0 += ATTN_WARPS * ATTN_VEC_TOKENS) {
        u32 kw[ATTN_VEC_TOKENS][W], vw[ATTN_VEC_TOKENS][W];
#pragma unroll
        for (int u = 0; u < ATTN_VEC_TOKENS; ++u) {
            const int p = p0 + u;
            if (p < visible) {
                const size_t slot = (size_t)bt[p / 16] * 16 + (p % 16);
                const size_t off = slot * kv_width + (size_t)kvh * HD + lane * E;
                load_words<W>(k_cache + off, kw[u]);
                load_words<W>(v_cache + off, vw[u]);
            } else {
#pragma unroll
                for (int i = 0; i < W; ++i) kw[u][i] = vw[u][i] = 0u;
            }
        }
        float sc[ATTN_VEC_TOKENS];
        float m_new = m;
#pragma unroll
        for (int u = 0; u < ATTN_VEC_TOKENS; ++u) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < W; ++i) {
                dot += qv[2 * i] * lo_f32(dummy, kw[u][i]) + qv[2 * i + 1] * hi_f32(dummy, kw[u][i]);
            }
            dot = warp_sum(dot);
            sc[u] = p0 + u < visible ? dot : NEG_INF;
            m_new = fmaxf(m_new, sc[u]);
        }
        // Position p0 is visible, so m_new is finite, and exp(-inf) = 0 drops the others.
        const float corr = expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= corr;
#pragma unroll
        for (int u = 0; u < ATTN_VEC_TOKENS; ++u) {
            const float pw = expf(sc[u] - m_new);
            l += pw;
#pragma unroll
            for (int i = 0; i < W; ++i) {
                acc[2 * i] += pw * lo_f32(dummy, vw[u][i]);
                acc[2 * i + 1] += pw * hi_f32(dummy, vw[u][i]);
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) s_acc[warp][lane * E + e] = acc[e];
    __syncthreads();
    attn_merge(s_m, s_l, s_acc, HD, out + (size_t)row * n_heads * HD + (size_t)head * HD);
}

template <typename T>
__device__ void silu_mul_impl(const T* __restrict__ gate_up, int stride, int n, size_t total,
                              T* __restrict__ out) {
    pdl_enter();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / n, c = i % n;
        const float g = to_f32(gate_up[row * stride + c]);
        const float u = to_f32(gate_up[row * stride + n + c]);
        out[i] = from_f32<T>(silu_times(g, u));
    }
}

template <typename T>
__device__ void gather_rows_impl(const T* __restrict__ x, const u32* __restrict__ rows,
                                 int hidden, T* __restrict__ out) {
    pdl_enter();
    const size_t src = (size_t)rows[blockIdx.x] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        out[(size_t)blockIdx.x * hidden + c] = x[src + c];
    }
}

// ---- Sampling: the procedure documented on `engine::sampling::pick_row`, one block per row. ----

// Per-row parameters, laid out as `plan::pack_sampling` writes them (16 bytes).
struct RowSamplingDev {
    float temperature;
    u32 top_k;
    float top_p;
    float u;
};

#define SAMPLE_MAX_THREADS 1024
#define NO_INDEX 0x7fffffff

// A logit as the procedure compares it: NaN counts as minus infinity.
__device__ __forceinline__ float rank_value(float v) { return (v != v) ? NEG_INF : v; }

__device__ __forceinline__ bool is_finite_f32(float v) { return fabsf(v) <= 3.402823466e38f; }

// Order-preserving key of a rank value: key(a) < key(b) iff a < b as floats; -0 and +0 share one.
__device__ __forceinline__ u32 order_key(float v) {
    u32 b = __float_as_uint(rank_value(v));
    if (b == 0x80000000u) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Unnormalised probability of a logit: kept when its key is at least `cut`.
__device__ __forceinline__ float sample_weight(float v, u32 cut, float lmax, float temperature) {
    const float r = rank_value(v);
    if (r == NEG_INF || order_key(r) < cut) return 0.0f;
    return expf((r - lmax) / temperature);
}

__device__ __forceinline__ int block_max_i32(int v, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const int n = __shfl_xor_sync(0xffffffffu, v, o);
        v = n > v ? n : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int r = (lane < nwarps) ? scratch[lane] : -1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const int n = __shfl_xor_sync(0xffffffffu, r, o);
        r = n > r ? n : r;
    }
    return r;
}

__device__ __forceinline__ float warp_inclusive_scan(float v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

// Pick one token per row of f32 logits `[rows, vocab]` and its log-probability under the raw
// logits. The block size must be a multiple of 32, at most SAMPLE_MAX_THREADS. Every branch
// below depends only on block-wide values, so all threads take it together.
extern "C" __global__ void __launch_bounds__(SAMPLE_MAX_THREADS)
    sample_f32(const float* __restrict__ logits, int vocab,
               const RowSamplingDev* __restrict__ params, u32* __restrict__ tokens,
               float* __restrict__ logprobs) {
    __shared__ float s_v[32], s_m[32], s_s[32], s_scan[32];
    __shared__ int s_i[32];
    __shared__ u32 s_hist[256];
    __shared__ float s_row[3];  // largest logit, log-sum-exp offset and log of the sum
    __shared__ u32 s_word[2];
    __shared__ int s_found;
    pdl_enter();
    const float* p = logits + (size_t)blockIdx.x * vocab;
    const RowSamplingDev rs = params[blockIdx.x];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // 1. The first largest logit (NaN never) and the online log-sum-exp of the raw row. Each
    // thread visits its columns in increasing order (so it keeps the first of equal values);
    // rows of whole 16-byte vectors are read two vectors a thread at a time, loads first.
    float best = NEG_INF, m = NEG_INF, sum = 0.0f;
    int bi = NO_INDEX;
    auto visit = [&](float v, int c) {
        if (v != v) return;
        if (v > best || bi == NO_INDEX) {
            best = v;
            bi = c;
        }
        if (v == NEG_INF) return;
        if (v > m) {
            sum = sum * expf(m - v) + 1.0f;
            m = v;
        } else {
            sum += expf(v - m);
        }
    };
    if ((vocab & 3) == 0) {
        const float4* p4 = reinterpret_cast<const float4*>(p);
        const int n4 = vocab >> 2, step = (int)blockDim.x;
        for (int base = tid; base < n4; base += 2 * step) {
            float4 q[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int i = base + u * step;
                q[u] = (i < n4) ? __ldg(p4 + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int i = base + u * step;
                if (i < n4) {
                    visit(q[u].x, 4 * i);
                    visit(q[u].y, 4 * i + 1);
                    visit(q[u].z, 4 * i + 2);
                    visit(q[u].w, 4 * i + 3);
                }
            }
        }
    } else {
        for (int c = tid; c < vocab; c += blockDim.x) visit(p[c], c);
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
        sum = (nm == NEG_INF) ? 0.0f : sum * expf(m - nm) + os * expf(om - nm);
        m = nm;
    }
    if (lane == 0) {
        s_v[warp] = best;
        s_i[warp] = bi;
        s_m[warp] = m;
        s_s[warp] = sum;
    }
    __syncthreads();
    if (tid == 0) {
        const int nw = blockDim.x >> 5;
        for (int w = 1; w < nw; ++w) {
            if (s_v[w] > best || (s_v[w] == best && s_i[w] < bi)) {
                best = s_v[w];
                bi = s_i[w];
            }
            const float nm = fmaxf(m, s_m[w]);
            sum = (nm == NEG_INF) ? 0.0f : sum * expf(m - nm) + s_s[w] * expf(s_m[w] - nm);
            m = nm;
        }
        s_row[0] = best;
        s_row[1] = m;
        s_row[2] = logf(sum);
        s_word[0] = (bi == NO_INDEX) ? 0u : (u32)bi;
    }
    __syncthreads();
    const float lmax = s_row[0];
    const u32 greedy = s_word[0];
    const bool finite = is_finite_f32(lmax);
    if (!(rs.temperature > 0.0f) || !finite) {
        if (tid == 0) {
            tokens[blockIdx.x] = greedy;
            logprobs[blockIdx.x] = finite ? (p[greedy] - s_row[1]) - s_row[2] : NEG_INF;
        }
        return;
    }
    const float t = rs.temperature;
    const u32 key_max = order_key(lmax);

    // 2. Top-k: radix select of the k-th largest key, 8 bits a pass; equal values all pass.
    u32 cut = 0u;
    if (rs.top_k > 0u && rs.top_k < (u32)vocab) {
        u32 prefix = 0u, want = rs.top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            const u32 hi_mask = (shift == 24) ? 0u : (0xffffffffu << (shift + 8));
            for (int b = tid; b < 256; b += blockDim.x) s_hist[b] = 0u;
            __syncthreads();
            for (int base = 0; base < vocab; base += blockDim.x) {
                const int c = base + tid;
                const u32 key = (c < vocab) ? order_key(p[c]) : 0u;
                const bool take = c < vocab && (key & hi_mask) == prefix;
                const u32 bin = (key >> shift) & 0xffu;
                // One shared atomic per distinct bin in the warp: logits crowd a few bins.
                const u32 active = __ballot_sync(0xffffffffu, take);
                if (take) {
                    const u32 peers = __match_any_sync(active, bin);
                    if (lane == __ffs(peers) - 1) atomicAdd(&s_hist[bin], (u32)__popc(peers));
                }
            }
            __syncthreads();
            if (tid == 0) {
                u32 b = 255u, above = 0u;
                for (;; --b) {
                    if (above + s_hist[b] >= want || b == 0u) break;
                    above += s_hist[b];
                }
                s_word[0] = prefix | (b << shift);
                s_word[1] = want - above;
            }
            __syncthreads();
            prefix = s_word[0];
            want = s_word[1];
        }
        cut = prefix;
    }

    // 3. Top-p: the largest key K (at most the largest logit's) such that the kept tokens with
    // key >= K carry at least top_p of the kept mass. Block sums of non-negative terms grow
    // with every term, so the test is monotone in K and a bitwise search finds it.
    if (rs.top_p > 0.0f && rs.top_p < 1.0f) {
        float part = 0.0f;
        for (int c = tid; c < vocab; c += blockDim.x) part += sample_weight(p[c], cut, lmax, t);
        const float target = rs.top_p * block_sum(part, s_v);
        u32 k = 0u;
        for (int bit = 31; bit >= 0; --bit) {
            const u32 cand = k | (1u << bit);
            if (cand > key_max) continue;
            const u32 c_cut = cand > cut ? cand : cut;
            float mass = 0.0f;
            for (int c = tid; c < vocab; c += blockDim.x) {
                mass += sample_weight(p[c], c_cut, lmax, t);
            }
            if (block_sum(mass, s_v) >= target) k = cand;
        }
        cut = k > cut ? k : cut;
    }

    // 4. Draw: target = u * kept mass; the first kept token in id order whose cumulative mass
    // exceeds it, else the last kept token with a nonzero weight.
    float part = 0.0f;
    int last = -1;
    for (int c = tid; c < vocab; c += blockDim.x) {
        const float w = sample_weight(p[c], cut, lmax, t);
        part += w;
        if (w > 0.0f) last = c;
    }
    const float target = rs.u * block_sum(part, s_v);
    last = block_max_i32(last, s_i);
    if (tid == 0) s_found = NO_INDEX;
    __syncthreads();
    const int nw = blockDim.x >> 5;
    float carry = 0.0f;
    for (int base = 0; base < vocab; base += blockDim.x) {
        const int c = base + tid;
        const float w = (c < vocab) ? sample_weight(p[c], cut, lmax, t) : 0.0f;
        const float incl = warp_inclusive_scan(w);
        if (lane == 31) s_scan[warp] = incl;
        __syncthreads();
        float before = 0.0f, tile = 0.0f;
        for (int w2 = 0; w2 < nw; ++w2) {
            if (w2 == warp) before = tile;
            tile += s_scan[w2];
        }
        // Zero weights add exactly nothing, so the first index past the target has w > 0.
        if (c < vocab && carry + (before + incl) > target) atomicMin(&s_found, c);
        __syncthreads();
        if (s_found != NO_INDEX) break;
        carry += tile;
    }
    if (tid == 0) {
        const int tok = (s_found != NO_INDEX) ? s_found : (last >= 0 ? last : (int)greedy);
        tokens[blockIdx.x] = (u32)tok;
        logprobs[blockIdx.x] = (p[tok] - s_row[1]) - s_row[2];
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
    extern "C" __global__ void rms_norm_##TNAME(T* residual, const T* x, int x_stride,       \
                                                const T* w, float eps, int hidden, T* out) {  \
        rms_norm_impl<T>(residual, x, x_stride, w, eps, hidden, out);                         \
    }                                                                                         \
    extern "C" __global__ void add_assign_##TNAME(T* y, const T* x, size_t n) {              \
        add_assign_impl<T>(y, x, n);                                                          \
    }                                                                                         \
    extern "C" __global__ void rope_write_kv_##TNAME(                                        \
        T* qkv, int row_stride, const float* inv_freq, const u32* pos, const u32* slots,      \
        int n_heads, int n_kv_heads, int head_dim, T* k_cache, T* v_cache) {                  \
        rope_write_kv_impl<T>(qkv, row_stride, inv_freq, pos, slots, n_heads, n_kv_heads,     \
                              head_dim, k_cache, v_cache);                                    \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_##TNAME(         \
        const T* q, int row_stride, int q_offset, const T* k_cache, const T* v_cache,         \
        const u32* row_seq, const u32* seqs, const u32* block_tables, int n_heads,            \
        int n_kv_heads, int head_dim, float scale, T* out) {                                  \
        attention_impl<T>(q, row_stride, q_offset, k_cache, v_cache, row_seq, seqs,           \
                          block_tables, n_heads, n_kv_heads, head_dim, scale, out);           \
    }                                                                                         \
    extern "C" __global__ void silu_mul_##TNAME(const T* gate_up, int stride, int n,         \
                                                size_t total, T* out) {                       \
        silu_mul_impl<T>(gate_up, stride, n, total, out);                                     \
    }                                                                                         \
    extern "C" __global__ void gather_rows_##TNAME(const T* x, const u32* rows, int hidden,  \
                                                   T* out) {                                  \
        gather_rows_impl<T>(x, rows, hidden, out);                                            \
    }                                                                                         \
    extern "C" __global__ void fill_##TNAME(T* y, float val, size_t n) {                     \
        fill_impl<T>(y, val, n);                                                              \
    }                                                                                         \
    extern "C" __global__ void fill_random_##TNAME(T* y, u32 seed, float scale, size_t n) {  \
        fill_random_impl<T>(y, seed, scale, n);                                               \
    }

// The vector attention for head_dim = HD = 64 * W (the host checks 4W-byte alignment).
#define DEFINE_ATTN_VEC(TNAME, T, HD, W)                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_d##HD##_##TNAME( \
        const T* q, int row_stride, int q_offset, const T* k_cache, const T* v_cache,         \
        const u32* row_seq, const u32* seqs, const u32* block_tables, int n_heads,            \
        int n_kv_heads, float scale, T* out) {                                                \
        attention_vec_impl<T, W>(q, row_stride, q_offset, k_cache, v_cache, row_seq, seqs,    \
                                 block_tables, n_heads, n_kv_heads, scale, out);              \
    }

// The register-resident norm and the vector attention (bf16/f16 only).
#define DEFINE_HALF_OPS(TNAME, T)                                                             \
    extern "C" __global__ void __launch_bounds__(NORM_VEC_THREADS) rms_norm_vec1_##TNAME(    \
        T* residual, const T* x, int x_stride, const T* w, float eps, int hidden, T* out) {   \
        rms_norm_vec_impl<T, 1>(residual, x, x_stride, w, eps, hidden, out);                  \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(NORM_VEC_THREADS) rms_norm_vec2_##TNAME(    \
        T* residual, const T* x, int x_stride, const T* w, float eps, int hidden, T* out) {   \
        rms_norm_vec_impl<T, 2>(residual, x, x_stride, w, eps, hidden, out);                  \
    }                                                                                         \
    DEFINE_ATTN_VEC(TNAME, T, 64, 1)                                                          \
    DEFINE_ATTN_VEC(TNAME, T, 128, 2)                                                         \
    DEFINE_ATTN_VEC(TNAME, T, 256, 4)

DEFINE_OPS(f32, float)
DEFINE_OPS(f16, f16)
DEFINE_OPS(bf16, bf16)
DEFINE_HALF_OPS(f16, f16)
DEFINE_HALF_OPS(bf16, bf16)
