// SGMV: segmented gather matrix-vector products for batched LoRA (Punica's operator).
//
// Rows are grouped into segments that share an adapter slot; each segment is cut into tiles of
// 16 rows (the M of one mma.sync). Per (layer, LoRA group) a slot table gives each slot's A (the
// A matrices of the group's parts stacked: [rank, h_in], rank summed over the parts) and, per
// part, its B ([h_out_j, rank_j], scale folded in), rank and first column in v; a null pointer
// marks what a slot does not have, and those rows or columns are left untouched.
//
// Tensor-core trick: an m16n8k16 fragment gives thread (g = lane / 4, q = lane % 4) the k indices
// {2q, 2q+1, 2q+8, 2q+9} of both operands. Since a dot product does not care about the order of
// its k terms, we map those four logical indices onto four *consecutive* physical ones, so each
// thread feeds two mma k-steps from one 16-byte load of eight consecutive elements, for both the
// activation and the weight operand, straight from global memory (no shared-memory staging).
//
// Prepended: common.cuh.

#define MAX_PARTS 3

struct LoraSlot {
    const void* a;
    u32 rank;
    u32 pad;
    const void* b[MAX_PARTS];
    u32 prank[MAX_PARTS];
    u32 voff[MAX_PARTS];
};

#define SHRINK_WARPS 4
#define EXPAND_WARPS 4

// v[row, :rank] = x[row, :] . A^T for the rows of each tile, split-K over h_in across
// gridDim.y blocks and over ranks in groups of NT*8 across gridDim.z blocks (more blocks in
// flight when a batch has few tiles). With more than one split, blocks add into a zeroed f32 accumulator per tile;
// the last block to finish (counter) copies it to v and clears accumulator and counter, so the
// workspace is clean again for the next launch (and for CUDA-graph replays).
template <typename T, int NT, int U>
__device__ __forceinline__ void sgmv_shrink_impl(
    const T* __restrict__ x, int h_in, float* __restrict__ v, int v_stride,
    const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,
    const u32* __restrict__ segs, int ksplit, float* __restrict__ acc,
    u32* __restrict__ counters) {
    constexpr int R = NT * 8;
    __shared__ float red[SHRINK_WARPS][16][R];
    __shared__ int is_last;

    const int tile = blockIdx.x, split = blockIdx.y, zi = blockIdx.z;
    const int group = tile * gridDim.z + zi;
    // Step metadata and the adapter table come from host copies, never from the previous
    // kernel, so they may be read before the wait (see pdl_enter in common.cuh).
    const u32 seg = tiles[2 * tile];
    const int row0 = (int)tiles[2 * tile + 1];
    const int seg_end = (int)segs[3 * seg + 1];
    const u32 slot = segs[3 * seg + 2];
    const void* slot_a = table[slot].a;
    const int slot_rank = (int)table[slot].rank;
    // x comes from the previous kernel (a GEMM or a norm), and v and the split-K workspace may
    // still be in use by the previous shrink/expand pair. Waiting before the trigger also means
    // the expand, once launched, finds every kernel before this shrink complete.
    pdl_enter();
    const int rank_lo = zi * R;
    const int rank = min(slot_rank - rank_lo, R);
    if (slot_a == nullptr || rank <= 0) return;
    const T* A = reinterpret_cast<const T*>(slot_a) + (size_t)rank_lo * h_in;
    const int nrows = min(16, seg_end - row0);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const bool vec = (h_in & 7) == 0;
    const int steps = (h_in + 31) >> 5;
    const int per_split = (steps + ksplit - 1) / ksplit;
    const int s_begin = split * per_split;
    const int s_end = min(steps, s_begin + per_split);

    float c[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;

    const T* xr0 = x + (size_t)(row0 + g) * h_in;
    const T* xr1 = x + (size_t)(row0 + g + 8) * h_in;
    const bool r0ok = g < nrows, r1ok = g + 8 < nrows;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    for (int st0 = s_begin + warp; st0 < s_end; st0 += SHRINK_WARPS * U) {
        uint4 w[U][NT];
        uint4 xa[U], xb[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int st = st0 + u * SHRINK_WARPS;
            const bool ok = st < s_end;
            const int k = st * 32 + q * 8;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int n = nt * 8 + g;
                w[u][nt] = (ok && n < rank) ? load8(A + (size_t)n * h_in, k, h_in, vec) : zero;
            }
            xa[u] = (ok && r0ok) ? load8(xr0, k, h_in, vec) : zero;
            xb[u] = (ok && r1ok) ? load8(xr1, k, h_in, vec) : zero;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                if (nt * 8 < rank) {
                    mma16816<T>(c[nt], xa[u].x, xb[u].x, xa[u].y, xb[u].y, w[u][nt].x, w[u][nt].y);
                    mma16816<T>(c[nt], xa[u].z, xb[u].z, xa[u].w, xb[u].w, w[u][nt].z, w[u][nt].w);
                }
            }
        }
    }

    // Accumulator fragment: c[nt][0..1] = row g, cols nt*8 + 2q + {0,1}; c[nt][2..3] = row g+8.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        red[warp][g][nt * 8 + 2 * q] = c[nt][0];
        red[warp][g][nt * 8 + 2 * q + 1] = c[nt][1];
        red[warp][g + 8][nt * 8 + 2 * q] = c[nt][2];
        red[warp][g + 8][nt * 8 + 2 * q + 1] = c[nt][3];
    }
    __syncthreads();

    float* tacc = acc + (size_t)group * 16 * R;
    float* vout = v + rank_lo;
    for (int idx = threadIdx.x; idx < 16 * R; idx += blockDim.x) {
        const int row = idx / R, col = idx % R;
        if (row < nrows && col < rank) {
            float sum = 0.0f;
#pragma unroll
            for (int w2 = 0; w2 < SHRINK_WARPS; ++w2) sum += red[w2][row][col];
            if (ksplit == 1) {
                vout[(size_t)(row0 + row) * v_stride + col] = sum;
            } else {
                atomicAdd(&tacc[idx], sum);
            }
        }
    }
    if (ksplit == 1) return;

    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 prev = atomicAdd(&counters[group], 1u);
        is_last = (prev == (u32)(ksplit - 1));
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < 16 * R; idx += blockDim.x) {
        const int row = idx / R, col = idx % R;
        if (row < nrows && col < rank) {
            vout[(size_t)(row0 + row) * v_stride + col] = __ldcg(&tacc[idx]);
            tacc[idx] = 0.0f;
        }
    }
    if (threadIdx.x == 0) counters[group] = 0u;
}

// Reads two adjacent output elements of y (cols c, c+1 of a row), zero past h_out.
template <typename T>
__device__ __forceinline__ u32 load_pair(const T* row, int c, int n, bool aligned) {
    if (aligned && c + 2 <= n) return *reinterpret_cast<const u32*>(row + c);
    const u16* p = reinterpret_cast<const u16*>(row);
    u32 lo = (c < n) ? (u32)p[c] : 0u;
    u32 hi = (c + 1 < n) ? (u32)p[c + 1] : 0u;
    return lo | (hi << 16);
}

template <typename T>
__device__ __forceinline__ void store_pair(T* row, int c, int n, bool aligned, u32 val) {
    if (aligned && c + 2 <= n) {
        *reinterpret_cast<u32*>(row + c) = val;
        return;
    }
    u16* p = reinterpret_cast<u16*>(row);
    if (c < n) p[c] = (u16)(val & 0xffffu);
    if (c + 1 < n) p[c + 1] = (u16)(val >> 16);
}

// Split an f32 pair into a high and a low half-precision pair (v = hi + lo to ~2^-16).
template <typename T>
__device__ __forceinline__ void split_pair(float a, float b, u32& hi, u32& lo) {
    hi = pack2<T>(a, b);
    const T dummy = T{};
    const float ha = lo_f32(dummy, hi), hb = hi_f32(dummy, hi);
    lo = pack2<T>(a - ha, b - hb);
}

// Eight f32 values v[k .. k+8) of one row, zero past `rank` or when the row is not in the tile.
__device__ __forceinline__ void load_v8(const float* row, int k, int rank, bool ok, bool vec,
                                        float* out) {
    if (ok && vec && k + 8 <= rank) {
        const float4 p0 = __ldcg(reinterpret_cast<const float4*>(row + k));
        const float4 p1 = __ldcg(reinterpret_cast<const float4*>(row + k + 4));
        out[0] = p0.x; out[1] = p0.y; out[2] = p0.z; out[3] = p0.w;
        out[4] = p1.x; out[5] = p1.y; out[6] = p1.z; out[7] = p1.w;
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (ok && k + i < rank) ? __ldcg(row + k + i) : 0.0f;
}

// One LoRA group's expand: its parts' outputs lie side by side in y from col_offset, part j
// ending at column ends[j] (relative to col_offset); part0 is the first part this launch covers.
// y[row, col_offset + c] += v[row, voff_j + :rank_j] . B_j[c - start_j, :rank_j] for the rows of
// one tile (blockIdx.y) and NTW * 8 columns per warp (blockIdx.x picks EXPAND_WARPS * NTW * 8
// columns); a warp's columns never straddle two parts (the host checks the part widths). B and
// the old y are loaded before waiting on the shrink (programmatic dependent launch), so only v
// is read after it finishes. That is safe because the backend overlaps the expand only with a
// shrink, which writes neither, and a shrink triggers its dependents only after its own wait:
// the kernel that wrote y has completed by then. v is fed to the tensor cores as hi + lo
// halves, keeping it at f32 accuracy.
template <typename T, int KT, int NTW>
__device__ __forceinline__ void sgmv_expand_impl(
    const float* __restrict__ v, int v_stride, T* __restrict__ y, int y_stride, int col_offset,
    int part0, int end0, int end1, int end2, const LoraSlot* __restrict__ table,
    const u32* __restrict__ tiles, const u32* __restrict__ segs) {
    const int tile = blockIdx.y;
    const u32 seg = tiles[2 * tile];
    const int row0 = (int)tiles[2 * tile + 1];
    const int seg_end = (int)segs[3 * seg + 1];
    const u32 slot = segs[3 * seg + 2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int gc0 = (blockIdx.x * EXPAND_WARPS + warp) * (NTW * 8);
    const int j = (gc0 >= end0) + (gc0 >= end1);
    const int part = part0 + j;
    const int start = j == 0 ? 0 : (j == 1 ? end0 : end1);
    const int h_out = (j == 0 ? end0 : (j == 1 ? end1 : end2)) - start;
    // The part's fields are loaded side by side (none waits on another) before B, whose
    // address needs them.
    const LoraSlot* s = table + slot;
    const int pi = min(part, MAX_PARTS - 1);
    const void* bptr = s->b[pi];
    const int prank = (int)s->prank[pi];
    const int voff = (int)s->voff[pi];
    const bool live = gc0 < end2 && part < MAX_PARTS && bptr != nullptr;
    const int rank = live ? min(prank, KT * 32) : 0;
    if (rank == 0) {
        // Even an idle warp waits: a grid must not complete before the one it depends on.
        pdl_enter();
        return;
    }
    const T* B = reinterpret_cast<const T*>(bptr);
    const int nrows = min(16, seg_end - row0);
    const int c0 = gc0 - start;
    col_offset += start;
    v += voff;

    const bool bvec = (rank & 7) == 0;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    uint4 b[NTW][KT];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
        const int col = c0 + nt * 8 + g;
#pragma unroll
        for (int kc = 0; kc < KT; ++kc) {
            const int k = kc * 32 + q * 8;
            b[nt][kc] = (col < h_out && k < rank) ? load8(B + (size_t)col * rank, k, rank, bvec) : zero;
        }
    }

    const bool r0ok = g < nrows, r1ok = g + 8 < nrows;
    T* y0 = y + (size_t)(row0 + g) * y_stride + col_offset;
    T* y1 = y + (size_t)(row0 + g + 8) * y_stride + col_offset;
    const bool yal = ((y_stride | col_offset) & 1) == 0;
    u32 yv[NTW][2];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
        const int col = c0 + nt * 8 + 2 * q;
        yv[nt][0] = r0ok ? load_pair(y0, col, h_out, yal) : 0u;
        yv[nt][1] = r1ok ? load_pair(y1, col, h_out, yal) : 0u;
    }

    pdl_enter();

    float d[NTW][4];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.0f;

    const float* v0 = v + (size_t)(row0 + g) * v_stride;
    const float* v1 = v + (size_t)(row0 + g + 8) * v_stride;
    const bool vvec = ((v_stride | voff) & 3) == 0;
#pragma unroll
    for (int kc = 0; kc < KT; ++kc) {
        if (kc * 32 >= rank) break;
        const int k = kc * 32 + q * 8;
        float va[8], vb[8];
        load_v8(v0, k, rank, r0ok, vvec, va);
        load_v8(v1, k, rank, r1ok, vvec, vb);
        u32 ah[8], al[8];
        // Fragment registers for step 0 use physical k 0..3, step 1 uses 4..7.
        split_pair<T>(va[0], va[1], ah[0], al[0]);
        split_pair<T>(vb[0], vb[1], ah[1], al[1]);
        split_pair<T>(va[2], va[3], ah[2], al[2]);
        split_pair<T>(vb[2], vb[3], ah[3], al[3]);
        split_pair<T>(va[4], va[5], ah[4], al[4]);
        split_pair<T>(vb[4], vb[5], ah[5], al[5]);
        split_pair<T>(va[6], va[7], ah[6], al[6]);
        split_pair<T>(vb[6], vb[7], ah[7], al[7]);
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
            const uint4 w = b[nt][kc];
            mma16816<T>(d[nt], ah[0], ah[1], ah[2], ah[3], w.x, w.y);
            mma16816<T>(d[nt], al[0], al[1], al[2], al[3], w.x, w.y);
            mma16816<T>(d[nt], ah[4], ah[5], ah[6], ah[7], w.z, w.w);
            mma16816<T>(d[nt], al[4], al[5], al[6], al[7], w.z, w.w);
        }
    }

    const T dummy = T{};
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
        const int col = c0 + nt * 8 + 2 * q;
        if (r0ok && col < h_out) {
            const u32 o = yv[nt][0];
            store_pair(y0, col, h_out, yal,
                       pack2<T>(lo_f32(dummy, o) + d[nt][0], hi_f32(dummy, o) + d[nt][1]));
        }
        if (r1ok && col < h_out) {
            const u32 o = yv[nt][1];
            store_pair(y1, col, h_out, yal,
                       pack2<T>(lo_f32(dummy, o) + d[nt][2], hi_f32(dummy, o) + d[nt][3]));
        }
    }
}

#define SHRINK_PASS x, h_in, v, v_stride, table, tiles, segs, ksplit, acc, counters

#define DEFINE_SHRINK(TNAME, TYPE, NT, U)                                                    \
    extern "C" __global__ void __launch_bounds__(SHRINK_WARPS * 32)                          \
        sgmv_shrink_##TNAME##_n##NT(                                                         \
            const TYPE* __restrict__ x, int h_in, float* __restrict__ v, int v_stride,       \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,               \
            const u32* __restrict__ segs, int ksplit, float* __restrict__ acc,               \
            u32* __restrict__ counters) {                                                    \
        sgmv_shrink_impl<TYPE, NT, U>(SHRINK_PASS);                                          \
    }

#define DEFINE_EXPAND(TNAME, TYPE, KT, NTW)                                                  \
    extern "C" __global__ void __launch_bounds__(EXPAND_WARPS * 32)                          \
        sgmv_expand_##TNAME##_k##KT##_w##NTW(                                                \
            const float* __restrict__ v, int v_stride, TYPE* __restrict__ y, int y_stride,   \
            int col_offset, int part0, int end0, int end1, int end2,                         \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,               \
            const u32* __restrict__ segs) {                                                  \
        sgmv_expand_impl<TYPE, KT, NTW>(v, v_stride, y, y_stride, col_offset, part0, end0,   \
                                        end1, end2, table, tiles, segs);                     \
    }

DEFINE_SHRINK(bf16, bf16, 1, 4)
DEFINE_SHRINK(bf16, bf16, 2, 4)
DEFINE_SHRINK(bf16, bf16, 4, 4)
DEFINE_SHRINK(bf16, bf16, 8, 2)
DEFINE_SHRINK(bf16, bf16, 16, 1)
DEFINE_SHRINK(f16, f16, 1, 4)
DEFINE_SHRINK(f16, f16, 2, 4)
DEFINE_SHRINK(f16, f16, 4, 4)
DEFINE_SHRINK(f16, f16, 8, 2)
DEFINE_SHRINK(f16, f16, 16, 1)

DEFINE_EXPAND(bf16, bf16, 1, 4)
DEFINE_EXPAND(bf16, bf16, 1, 8)
DEFINE_EXPAND(bf16, bf16, 2, 4)
DEFINE_EXPAND(bf16, bf16, 2, 8)
DEFINE_EXPAND(bf16, bf16, 4, 4)
DEFINE_EXPAND(bf16, bf16, 4, 8)
DEFINE_EXPAND(f16, f16, 1, 4)
DEFINE_EXPAND(f16, f16, 1, 8)
DEFINE_EXPAND(f16, f16, 2, 4)
DEFINE_EXPAND(f16, f16, 2, 8)
DEFINE_EXPAND(f16, f16, 4, 4)
DEFINE_EXPAND(f16, f16, 4, 8)

// ---------------------------------------------------------------------------------------------
// Fused shrink + expand over a thread-block cluster (sm_90): one launch per LoRA group, v never
// leaves the chip. A cluster of gridDim.x blocks serves one row tile (blockIdx.y):
//  1. each block reduces its share of h_in: part[row][k] = x[row, its k range] . A[k, range]^T,
//     all of the slot's stacked rank, into its own shared memory;
//  2. after a cluster barrier every block sums the cluster's partials over distributed shared
//     memory into v[row][k] (f32, the whole rank), in a fixed order;
//  3. each block then adds v . B_j^T to its share of the group's output columns, each 8-column
//     tile reading v over the rank range of the parts it spans (a lane's own column reads zero
//     outside its part), so part boundaries may fall anywhere.
// The first chunk of B and y is loaded before the cluster barrier, overlapping the reduction.
// Everything is read after pdl_enter: x may come from the kernel just before.

#define FUSED_WARPS 8
#define FUSED_NTW 4
#define FUSED_MAX_CLUSTER 16

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ u32 cluster_ctarank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ u32 cluster_nctarank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The f32 at the same shared-memory offset as `p`, in block `rank` of this cluster.
__device__ __forceinline__ float ld_cluster(const float* p, u32 rank) {
    u64 generic = reinterpret_cast<u64>(p), local;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(local) : "l"(generic));
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"((u32)local), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote));
    return v;
}
#endif

// A slot's entry for one group, in registers: where each part's columns start and end in
// the group, its B (null: the slot lacks it), rank and first position in v.
struct SlotParts {
    const u16* b[MAX_PARTS];
    int rank[MAX_PARTS];
    int voff[MAX_PARTS];
    int start[MAX_PARTS];
    int end[MAX_PARTS];
};

__device__ __forceinline__ int part_of(const SlotParts& sp, int col) {
    return (col >= sp.end[0]) + (col >= sp.end[1]);
}

// Element j of a per-part array by selects, so the struct stays in registers.
template <typename V>
__device__ __forceinline__ V pick(const V (&a)[MAX_PARTS], int j) {
    return j == 0 ? a[0] : (j == 1 ? a[1] : a[2]);
}

// Eight consecutive v positions [k, k + 8) of group column `col`'s B row, zero outside its
// part's ranks (or when the column is past the group or its part is missing).
__device__ __forceinline__ uint4 load_bcol(const SlotParts& sp, int col, int k) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    if (col >= sp.end[2]) return zero;
    const int j = part_of(sp, col);
    const u16* p = pick(sp.b, j);
    const int rank = pick(sp.rank, j);
    const int kk = k - pick(sp.voff, j);
    if (p == nullptr || kk >= rank || kk + 8 <= 0) return zero;
    p += (size_t)(col - pick(sp.start, j)) * rank;
    if (((rank | kk) & 7) == 0 && kk + 8 <= rank) {
        return __ldg(reinterpret_cast<const uint4*>(p + kk));
    }
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int a = kk + 2 * i, b = a + 1;
        const u32 lo = (a >= 0 && a < rank) ? (u32)p[a] : 0u;
        const u32 hi = (b >= 0 && b < rank) ? (u32)p[b] : 0u;
        w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// The v range [lo, hi) the live parts overlapping group columns [c0, c1) occupy (empty: none).
__device__ __forceinline__ void cols_k_range(const SlotParts& sp, int c0, int c1, int& lo,
                                             int& hi) {
    lo = 1 << 30;
    hi = 0;
#pragma unroll
    for (int j = 0; j < MAX_PARTS; ++j) {
        if (sp.b[j] != nullptr && sp.start[j] < c1 && c0 < sp.end[j]) {
            lo = min(lo, sp.voff[j]);
            hi = max(hi, sp.voff[j] + sp.rank[j]);
        }
    }
    if (hi <= lo) lo = hi = 0;
}

// The A operand of one mma k-chunk from v rows g and g + 8 (f32 in shared memory) at positions
// [k, k + 8) below `hi`, as high and low half-precision parts (v = hi + lo to ~2^-16).
template <typename T>
__device__ __forceinline__ void v_frags(const float* v0, const float* v1, bool r0ok, bool r1ok,
                                        int k, int hi, u32* ah, u32* al) {
    float va[8], vb[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        va[i] = (r0ok && k + i < hi) ? v0[k + i] : 0.0f;
        vb[i] = (r1ok && k + i < hi) ? v1[k + i] : 0.0f;
    }
    split_pair<T>(va[0], va[1], ah[0], al[0]);
    split_pair<T>(vb[0], vb[1], ah[1], al[1]);
    split_pair<T>(va[2], va[3], ah[2], al[2]);
    split_pair<T>(vb[2], vb[3], ah[3], al[3]);
    split_pair<T>(va[4], va[5], ah[4], al[4]);
    split_pair<T>(vb[4], vb[5], ah[5], al[5]);
    split_pair<T>(va[6], va[7], ah[6], al[6]);
    split_pair<T>(vb[6], vb[7], ah[7], al[7]);
}

template <typename T>
__device__ __forceinline__ void mma_v(float* d, const u32* ah, const u32* al, uint4 w) {
    mma16816<T>(d, ah[0], ah[1], ah[2], ah[3], w.x, w.y);
    mma16816<T>(d, al[0], al[1], al[2], al[3], w.x, w.y);
    mma16816<T>(d, ah[4], ah[5], ah[6], ah[7], w.z, w.w);
    mma16816<T>(d, al[4], al[5], al[6], al[7], w.z, w.w);
}

template <typename T, int NT, int U>
__device__ __forceinline__ void sgmv_fused_impl(
    const T* __restrict__ x, int h_in, T* __restrict__ y, int y_stride, int col_offset, int end0,
    int end1, int end2, int vs, const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,
    const u32* __restrict__ segs) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ float smem[];
    float* part = smem;           // [16][vs]: this block's partial over its k range
    float* vsum = smem + 16 * vs; // [16][vs]: the cluster's sum, v

    // Step metadata and the adapter table come from host copies: read before the wait.
    const int tile = blockIdx.y;
    const u32 seg = tiles[2 * tile];
    const int row0 = (int)tiles[2 * tile + 1];
    const int seg_end = (int)segs[3 * seg + 1];
    const u32 slot = segs[3 * seg + 2];
    const LoraSlot* s = table + slot;
    const void* slot_a = s->a;
    const int slot_rank = (int)s->rank;
    SlotParts sp;
#pragma unroll
    for (int j = 0; j < MAX_PARTS; ++j) {
        sp.b[j] = reinterpret_cast<const u16*>(s->b[j]);
        sp.rank[j] = (int)s->prank[j];
        sp.voff[j] = (int)s->voff[j];
    }
    sp.start[0] = 0;
    sp.end[0] = sp.start[1] = end0;
    sp.end[1] = sp.start[2] = end1;
    sp.end[2] = end2;
    pdl_enter();
    // One tile, one slot: the whole cluster leaves together, before any cluster barrier.
    if (slot_a == nullptr || slot_rank <= 0) return;
    const T* A = reinterpret_cast<const T*>(slot_a);
    const int nrows = min(16, seg_end - row0);
    const u32 cr = cluster_ctarank(), ncl = cluster_nctarank();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const bool r0ok = g < nrows, r1ok = g + 8 < nrows;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    for (int i = threadIdx.x; i < nrows * vs; i += blockDim.x) part[i] = 0.0f;
    __syncthreads();

    // 1. This block's k range, every rank chunk of NT * 8.
    const bool vec = (h_in & 7) == 0;
    const int steps = (h_in + 31) >> 5;
    const int per_block = (steps + (int)ncl - 1) / (int)ncl;
    const int s_begin = (int)cr * per_block;
    const int s_end = min(steps, s_begin + per_block);
    const T* xr0 = x + (size_t)(row0 + g) * h_in;
    const T* xr1 = x + (size_t)(row0 + g + 8) * h_in;
    for (int rank_lo = 0; rank_lo < slot_rank; rank_lo += NT * 8) {
        const int rank = min(slot_rank - rank_lo, NT * 8);
        const T* Ar = A + (size_t)rank_lo * h_in;
        float c[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
        for (int st0 = s_begin + warp; st0 < s_end; st0 += FUSED_WARPS * U) {
            uint4 w[U][NT];
            uint4 xa[U], xb[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int st = st0 + u * FUSED_WARPS;
                const bool ok = st < s_end;
                const int k = st * 32 + q * 8;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int n = nt * 8 + g;
                    w[u][nt] = (ok && n < rank) ? load8(Ar + (size_t)n * h_in, k, h_in, vec) : zero;
                }
                xa[u] = (ok && r0ok) ? load8(xr0, k, h_in, vec) : zero;
                xb[u] = (ok && r1ok) ? load8(xr1, k, h_in, vec) : zero;
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    if (nt * 8 < rank) {
                        mma16816<T>(c[nt], xa[u].x, xb[u].x, xa[u].y, xb[u].y, w[u][nt].x, w[u][nt].y);
                        mma16816<T>(c[nt], xa[u].z, xb[u].z, xa[u].w, xb[u].w, w[u][nt].z, w[u][nt].w);
                    }
                }
            }
        }
        // c[nt][0..1]: row g, ranks nt*8 + 2q + {0,1}; c[nt][2..3]: row g + 8.
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int col = nt * 8 + 2 * q;
            float* p0 = part + g * vs + rank_lo + col;
            float* p1 = part + (g + 8) * vs + rank_lo + col;
            if (r0ok && col < rank) atomicAdd(p0, c[nt][0]);
            if (r0ok && col + 1 < rank) atomicAdd(p0 + 1, c[nt][1]);
            if (r1ok && col < rank) atomicAdd(p1, c[nt][2]);
            if (r1ok && col + 1 < rank) atomicAdd(p1 + 1, c[nt][3]);
        }
    }

    // Each warp takes FUSED_NTW 8-column tiles at a time of this block's share of the group's
    // columns. A chunk inside one part (the usual case) shares its v fragments over its tiles;
    // one that straddles parts goes tile by tile. The first chunk's B (first rank chunk) and
    // old y are loaded before the cluster barrier.
    const int n8 = (end2 + 7) >> 3;
    const int t_per = (n8 + (int)ncl - 1) / (int)ncl;
    const int t_begin = (int)cr * t_per, t_end = min(n8, t_begin + t_per);
    const bool yal = ((y_stride | col_offset) & 1) == 0;
    T* y0 = y + (size_t)(row0 + g) * y_stride + col_offset;
    T* y1 = y + (size_t)(row0 + g + 8) * y_stride + col_offset;
    int t0 = t_begin + warp * FUSED_NTW;
    int c0 = 0, c1 = 0;
    bool uni = false;
    uint4 b[FUSED_NTW];
    u32 yv[FUSED_NTW][2];
    auto load_chunk = [&]() {
        c0 = t0 * 8;
        c1 = min(min(t0 + FUSED_NTW, t_end) * 8, end2);
        uni = part_of(sp, c0) == part_of(sp, c1 - 1);
        int lo, hi;
        if (uni) cols_k_range(sp, c0, c1, lo, hi);
#pragma unroll
        for (int nt = 0; nt < FUSED_NTW; ++nt) {
            const int tc = c0 + nt * 8;
            if (!uni && tc < c1) cols_k_range(sp, tc, tc + 8, lo, hi);
            b[nt] = (tc < c1 && hi > 0) ? load_bcol(sp, tc + g, lo + q * 8) : zero;
            const int col = tc + 2 * q;
            yv[nt][0] = (tc < c1 && r0ok) ? load_pair(y0, col, end2, yal) : 0u;
            yv[nt][1] = (tc < c1 && r1ok) ? load_pair(y1, col, end2, yal) : 0u;
        }
    };
    if (t0 < t_end) load_chunk();

    // 2. Sum the cluster's partials in a fixed order.
    __syncthreads();
    cluster_arrive();
    cluster_wait();
    for (int i = threadIdx.x; i < nrows * slot_rank; i += blockDim.x) {
        const int row = i / slot_rank, col = i % slot_rank;
        // All remote loads first, so they are in flight together.
        float got[FUSED_MAX_CLUSTER];
#pragma unroll
        for (int r = 0; r < FUSED_MAX_CLUSTER; ++r) {
            got[r] = r < (int)ncl ? ld_cluster(part + row * vs + col, (u32)r) : 0.0f;
        }
        float sum = 0.0f;
#pragma unroll
        for (int r = 0; r < FUSED_MAX_CLUSTER; ++r) sum += got[r];
        vsum[row * vs + col] = sum;
    }
    // Our partials may be read by the others until they pass this barrier's wait (at the end).
    cluster_arrive();
    __syncthreads();

    // 3. y += v . B^T.
    const T dummy = T{};
    const float* v0 = vsum + g * vs;
    const float* v1 = vsum + (g + 8) * vs;
    while (t0 < t_end) {
        float d[FUSED_NTW][4];
#pragma unroll
        for (int nt = 0; nt < FUSED_NTW; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.0f;
        bool live[FUSED_NTW];
        if (uni) {
            int klo, khi;
            cols_k_range(sp, c0, c1, klo, khi);
            for (int kc = klo; kc < khi; kc += 32) {
                const int k = kc + q * 8;
                u32 ah[8], al[8];
                v_frags<T>(v0, v1, r0ok, r1ok, k, khi, ah, al);
#pragma unroll
                for (int nt = 0; nt < FUSED_NTW; ++nt) {
                    const int tc = c0 + nt * 8;
                    const uint4 w = kc == klo ? b[nt] : (tc < c1 ? load_bcol(sp, tc + g, k) : zero);
                    mma_v<T>(d[nt], ah, al, w);
                }
            }
#pragma unroll
            for (int nt = 0; nt < FUSED_NTW; ++nt) live[nt] = khi > 0;
        } else {
#pragma unroll
            for (int nt = 0; nt < FUSED_NTW; ++nt) {
                const int tc = c0 + nt * 8;
                int klo = 0, khi = 0;
                if (tc < c1) cols_k_range(sp, tc, tc + 8, klo, khi);
                live[nt] = khi > 0;
                for (int kc = klo; kc < khi; kc += 32) {
                    const int k = kc + q * 8;
                    u32 ah[8], al[8];
                    v_frags<T>(v0, v1, r0ok, r1ok, k, khi, ah, al);
                    mma_v<T>(d[nt], ah, al, kc == klo ? b[nt] : load_bcol(sp, tc + g, k));
                }
            }
        }
        // A tile whose columns have no live part is left untouched.
#pragma unroll
        for (int nt = 0; nt < FUSED_NTW; ++nt) {
            const int col = c0 + nt * 8 + 2 * q;
            if (!live[nt] || c0 + nt * 8 >= c1 || col >= end2) continue;
            if (r0ok) {
                const u32 o = yv[nt][0];
                store_pair(y0, col, end2, yal,
                           pack2<T>(lo_f32(dummy, o) + d[nt][0], hi_f32(dummy, o) + d[nt][1]));
            }
            if (r1ok) {
                const u32 o = yv[nt][1];
                store_pair(y1, col, end2, yal,
                           pack2<T>(lo_f32(dummy, o) + d[nt][2], hi_f32(dummy, o) + d[nt][3]));
            }
        }
        t0 += FUSED_WARPS * FUSED_NTW;
        if (t0 < t_end) load_chunk();
    }
    cluster_wait();
#endif
}

#define DEFINE_FUSED(TNAME, TYPE, NT, U)                                                     \
    extern "C" __global__ void __launch_bounds__(FUSED_WARPS * 32, 2)                        \
        sgmv_fused_##TNAME##_n##NT(                                                          \
            const TYPE* __restrict__ x, int h_in, TYPE* __restrict__ y, int y_stride,        \
            int col_offset, int end0, int end1, int end2, int vs,                            \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,               \
            const u32* __restrict__ segs) {                                                  \
        sgmv_fused_impl<TYPE, NT, U>(x, h_in, y, y_stride, col_offset, end0, end1, end2, vs, \
                                     table, tiles, segs);                                    \
    }

// Rank chunks of 16, 32 or 64 per pass over this block's k range (a wider rank takes passes).
DEFINE_FUSED(bf16, bf16, 2, 4)
DEFINE_FUSED(bf16, bf16, 4, 2)
DEFINE_FUSED(bf16, bf16, 8, 1)
DEFINE_FUSED(f16, f16, 2, 4)
DEFINE_FUSED(f16, f16, 4, 2)
DEFINE_FUSED(f16, f16, 8, 1)
