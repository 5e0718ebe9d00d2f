// SGMV: segmented gather matrix-vector products for batched LoRA (Punica's operator).
//
// Rows are grouped into segments that share an adapter slot; each segment is cut into tiles of
// 16 rows (the M of one mma.sync). Per (layer, LoRA group) a slot table gives each slot's A (the
// A matrices of the group's parts stacked: [rank, h_in], rank summed over the parts) and, per
// part, its B ([h_out_j, rank_j], scale folded in), rank and first column in v (a shrink writes
// from column 0; an expand may read a slot's columns anywhere in v); a null pointer
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

// One row tile: its first row, the end of its segment and the segment's adapter slot. Step
// metadata comes from host copies, never from the previous kernel, so kernels read it before
// their wait (see pdl_enter in common.cuh).
struct TileSeg {
    int row0;
    int end;
    u32 slot;
};

// The segment index of a tile entry that stands for no rows: launches cover the step's tiles
// rounded up (so steps of a few tiles more or less share a CUDA graph), the rest of the tile
// table being such entries (cuda/plan.rs `TILE_NONE`). Their blocks only wait and leave.
#define TILE_NONE 0xffffffffu

// `segs` holds each tile's segment (start, end, slot) at the tile's index, so the four words
// are read side by side: no load waits for another (cuda/plan.rs `pack_meta`).
__device__ __forceinline__ TileSeg tile_seg(const u32* __restrict__ tiles,
                                            const u32* __restrict__ segs, int tile) {
    const u32 seg = tiles[2 * tile];
    const u32 row0 = tiles[2 * tile + 1];
    const u32 end = segs[3 * tile + 1];
    const u32 slot = segs[3 * tile + 2];
    TileSeg t;
    if (seg == TILE_NONE) {
        t.row0 = 0;
        t.end = 0;
        t.slot = 0;
        return t;
    }
    t.row0 = (int)row0;
    t.end = (int)end;
    t.slot = slot;
    return t;
}

// A shrink's tile: its rows (see tile_seg) and its slot's stacked A and total rank.
struct ShrinkTile {
    int row0;
    int end;
    int rank;
    const void* a;
};

__device__ __forceinline__ ShrinkTile shrink_tile(const u32* __restrict__ tiles,
                                                  const u32* __restrict__ segs,
                                                  const LoraSlot* __restrict__ table, int tile) {
    const TileSeg ts = tile_seg(tiles, segs, tile);
    ShrinkTile t;
    t.row0 = ts.row0;
    t.end = ts.end;
    const bool live = ts.end > ts.row0;  // not a TILE_NONE entry
    t.rank = live ? (int)table[ts.slot].rank : 0;
    t.a = live ? table[ts.slot].a : nullptr;
    return t;
}

#define SHRINK_WARPS 4
#define EXPAND_WARPS 4

// p[0..4) += a, as one 16-byte reduction where the architecture has it (sm_90), else four.
__device__ __forceinline__ void red_add_v4(float* p, float4 a) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a.x), "f"(a.y),
                 "f"(a.z), "f"(a.w)
                 : "memory");
#else
    atomicAdd(p, a.x);
    atomicAdd(p + 1, a.y);
    atomicAdd(p + 2, a.z);
    atomicAdd(p + 3, a.w);
#endif
}

// The first min(n, 4) values of a to p: one 16-byte store when `vec` and all four fit.
__device__ __forceinline__ void store_v4(float* p, float4 a, int n, bool vec) {
    if (vec && n >= 4) {
        *reinterpret_cast<float4*>(p) = a;
        return;
    }
    p[0] = a.x;
    if (n > 1) p[1] = a.y;
    if (n > 2) p[2] = a.z;
    if (n > 3) p[3] = a.w;
}

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
    __shared__ __align__(16) float red[SHRINK_WARPS][16][R];
    __shared__ int is_last;

    const int tile = blockIdx.x, split = blockIdx.y, zi = blockIdx.z;
    const int group = tile * gridDim.z + zi;
    // The adapter table comes from host copies too.
    const ShrinkTile st = shrink_tile(tiles, segs, table, tile);
    const int row0 = st.row0, seg_end = st.end, slot_rank = st.rank;
    const void* slot_a = st.a;
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

    // Four consecutive columns a thread: the split-K sum goes to the workspace as one 16-byte
    // reduction (sm_90), and v is written in 16-byte vectors where its rows allow.
    float* tacc = acc + (size_t)group * 16 * R;
    float* vout = v + rank_lo;
    const bool v4 = ((v_stride & 3) | (reinterpret_cast<size_t>(vout) & 15)) == 0;
    for (int idx = threadIdx.x * 4; idx < 16 * R; idx += blockDim.x * 4) {
        const int row = idx / R, col = idx % R;
        if (row < nrows && col < rank) {
            float4 sum = *reinterpret_cast<const float4*>(&red[0][row][col]);
#pragma unroll
            for (int w2 = 1; w2 < SHRINK_WARPS; ++w2) {
                const float4 p = *reinterpret_cast<const float4*>(&red[w2][row][col]);
                sum.x += p.x; sum.y += p.y; sum.z += p.z; sum.w += p.w;
            }
            if (ksplit == 1) {
                store_v4(vout + (size_t)(row0 + row) * v_stride + col, sum, rank - col, v4);
            } else {
                // Columns from `rank` on hold zeros (their weights were zero or skipped).
                red_add_v4(tacc + idx, sum);
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
    for (int idx = threadIdx.x * 4; idx < 16 * R; idx += blockDim.x * 4) {
        const int row = idx / R, col = idx % R;
        if (row < nrows && col < rank) {
            float4* t = reinterpret_cast<float4*>(tacc + idx);
            store_v4(vout + (size_t)(row0 + row) * v_stride + col, __ldcg(t), rank - col, v4);
            *t = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
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

// Elements of v per 16-byte vector: v is f32 after a shrink, the activations' type when it
// comes out of the base GEMM (the A matrices ride along as extra output columns).
template <typename VT>
struct VVec {
    static constexpr int n = 16 / (int)sizeof(VT);
};

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

// The same from a row of halves (bf16 or f16), widened to f32.
template <typename T>
__device__ __forceinline__ void load_v8(const T* row, int k, int rank, bool ok, bool vec,
                                        float* out) {
    if (ok && vec && k + 8 <= rank) {
        const uint4 p = __ldcg(reinterpret_cast<const uint4*>(row + k));
        unpack8<T>(p, out);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (ok && k + i < rank) ? to_f32(row[k + i]) : 0.0f;
}

// load_v8 through L1 (the row expand: every warp of a block reads the same row of v).
__device__ __forceinline__ void load_v8_l1(const float* row, int k, int rank, bool vec,
                                           float* out) {
    if (vec && k + 8 <= rank) {
        const float4 p0 = *reinterpret_cast<const float4*>(row + k);
        const float4 p1 = *reinterpret_cast<const float4*>(row + k + 4);
        out[0] = p0.x; out[1] = p0.y; out[2] = p0.z; out[3] = p0.w;
        out[4] = p1.x; out[5] = p1.y; out[6] = p1.z; out[7] = p1.w;
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = k + i < rank ? row[k + i] : 0.0f;
}

template <typename T>
__device__ __forceinline__ void load_v8_l1(const T* row, int k, int rank, bool vec, float* out) {
    if (vec && k + 8 <= rank) {
        const uint4 p = *reinterpret_cast<const uint4*>(row + k);
        unpack8<T>(p, out);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = k + i < rank ? to_f32(row[k + i]) : 0.0f;
}

// One LoRA group's expand: its parts' outputs lie side by side in y from col_offset, part j
// ending at column ends[j] (relative to col_offset); part0 is the first part this launch covers.
// y[row, col_offset + c] += v[row, voff_j + :rank_j] . B_j[c - start_j, :rank_j] for the rows of
// one tile (blockIdx.y) and NTW * 8 columns per warp (blockIdx.x picks EXPAND_WARPS * NTW * 8
// columns); a warp's columns never straddle two parts (the host checks the part widths). B is
// loaded before the wait (programmatic dependent launch), and so is the old y when `y_early`:
// the kernel before is a shrink, which writes neither, and triggers its dependents only after
// its own wait, so the kernel that wrote y has completed by then. Otherwise (after the GEMM
// that wrote v and y, in an arena step) y is loaded after the wait. v is fed to the tensor
// cores as hi + lo halves, keeping it at f32 accuracy.
template <typename T, typename VT, int KT, int NTW>
__device__ __forceinline__ void sgmv_expand_impl(
    const VT* __restrict__ v, int v_stride, T* __restrict__ y, int y_stride, int col_offset,
    int part0, int end0, int end1, int end2, const LoraSlot* __restrict__ table,
    const u32* __restrict__ tiles, const u32* __restrict__ segs, int y_early) {
    const int tile = blockIdx.y;
    const TileSeg ts = tile_seg(tiles, segs, tile);
    const int row0 = ts.row0, seg_end = ts.end;
    const u32 slot = ts.slot;
    if (seg_end <= row0) {  // a TILE_NONE entry
        pdl_enter();
        return;
    }
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
    auto load_y = [&]() {
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
            const int col = c0 + nt * 8 + 2 * q;
            yv[nt][0] = r0ok ? load_pair(y0, col, h_out, yal) : 0u;
            yv[nt][1] = r1ok ? load_pair(y1, col, h_out, yal) : 0u;
        }
    };
    if (y_early) load_y();
    pdl_enter();
    if (!y_early) load_y();

    float d[NTW][4];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.0f;

    const VT* v0 = v + (size_t)(row0 + g) * v_stride;
    const VT* v1 = v + (size_t)(row0 + g + 8) * v_stride;
    const bool vvec = ((v_stride | voff) & (VVec<VT>::n - 1)) == 0;
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

// The expand for long segments (many rows a segment, e.g. a prefill chunk of one adapter): the
// tile expand above gives every tile's warps their own B, so a segment of n tiles reads its B n
// times from L2, and every column block reads its tile's v again. Here a block's EXPAND_WARPS
// warps take consecutive tiles (warp w: tile EXPAND_WARPS * blockIdx.y + w) and the same
// EXPAND_LONG_CHUNKS chunks of 32 columns, so tiles of one segment share B through L1, and a
// warp loads its v once (as hi + lo halves) for all its chunks. The chunks' B and old y go to
// registers DEPTH chunks ahead (the first DEPTH before the wait). All four ahead measured no
// faster at 512 rows in one segment and slower in 23 or 14 (2 blocks an SM, not 3, for 384 or
// 352 blocks). A block's columns lie in one part (the host launches per part unless every
// part boundary falls between blocks); tiles past `num_tiles` or of other slots work as in the
// tile expand. Measured against it on the H200: bench/results/sgmv-tile-probe-*-s17*.txt.
#define EXPAND_LONG_CHUNKS 4
#define EXPAND_LONG_NTW 4

template <typename T, typename VT, int KT, int CH = EXPAND_LONG_CHUNKS, int DEPTH = 2,
          int NTW = EXPAND_LONG_NTW>
__device__ __forceinline__ void sgmv_expand_long_impl(
    const VT* __restrict__ v, int v_stride, T* __restrict__ y, int y_stride, int col_offset,
    int part0, int end0, int end1, int end2, const LoraSlot* __restrict__ table,
    const u32* __restrict__ tiles, const u32* __restrict__ segs, int y_early, int num_tiles) {
    static_assert(DEPTH >= 1 && DEPTH <= CH, "chunks in registers at once");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = blockIdx.y * EXPAND_WARPS + warp;
    const int cb = blockIdx.x * (CH * NTW * 8);
    const int j = (cb >= end0) + (cb >= end1);
    const int part = part0 + j;
    const int start = j == 0 ? 0 : (j == 1 ? end0 : end1);
    const int h_out = (j == 0 ? end0 : (j == 1 ? end1 : end2)) - start;
    const TileSeg ts = tile < num_tiles ? tile_seg(tiles, segs, tile) : TileSeg{0, 0, 0u};
    const LoraSlot* s = table + ts.slot;
    const int pi = min(part, MAX_PARTS - 1);
    const bool live = ts.end > ts.row0 && cb < end2 && part < MAX_PARTS;
    const void* bptr = live ? s->b[pi] : nullptr;
    const int rank = bptr != nullptr ? min((int)s->prank[pi], KT * 32) : 0;
    if (rank == 0) {
        pdl_enter();
        return;
    }
    const int voff = (int)s->voff[pi];
    const int g = lane >> 2, q = lane & 3;
    const int c0 = cb - start;
    col_offset += start;
    const T* B = reinterpret_cast<const T*>(bptr);
    const int row0 = ts.row0, nrows = min(16, ts.end - row0);
    const bool r0ok = g < nrows, r1ok = g + 8 < nrows;
    T* y0 = y + (size_t)(row0 + g) * y_stride + col_offset;
    T* y1 = y + (size_t)(row0 + g + 8) * y_stride + col_offset;
    const bool yal = ((y_stride | col_offset) & 1) == 0;
    const bool bvec = (rank & 7) == 0;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    uint4 b[DEPTH][NTW][KT];
    u32 yv[DEPTH][NTW][2];
    auto load_b = [&](int ch, int buf) {
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
            const int col = c0 + ch * NTW * 8 + nt * 8 + g;
#pragma unroll
            for (int kc = 0; kc < KT; ++kc) {
                const int k = kc * 32 + q * 8;
                b[buf][nt][kc] = (col < h_out && k < rank)
                                     ? load8(B + (size_t)col * rank, k, rank, bvec)
                                     : zero;
            }
        }
    };
    auto load_y = [&](int ch, int buf) {
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
            const int col = c0 + ch * NTW * 8 + nt * 8 + 2 * q;
            yv[buf][nt][0] = r0ok ? load_pair(y0, col, h_out, yal) : 0u;
            yv[buf][nt][1] = r1ok ? load_pair(y1, col, h_out, yal) : 0u;
        }
    };
#pragma unroll
    for (int ch = 0; ch < DEPTH; ++ch) load_b(ch, ch);
    if (y_early) {
#pragma unroll
        for (int ch = 0; ch < DEPTH; ++ch) load_y(ch, ch);
    }
    pdl_enter();
    if (!y_early) {
#pragma unroll
        for (int ch = 0; ch < DEPTH; ++ch) load_y(ch, ch);
    }

    u32 ah[KT][8], al[KT][8];
    const VT* v0 = v + (size_t)(row0 + g) * v_stride + voff;
    const VT* v1 = v + (size_t)(row0 + g + 8) * v_stride + voff;
    const bool vvec = ((v_stride | voff) & (VVec<VT>::n - 1)) == 0;
#pragma unroll
    for (int kc = 0; kc < KT; ++kc) {
        const int k = kc * 32 + q * 8;
        float va[8], vb[8];
        load_v8(v0, k, rank, r0ok, vvec, va);
        load_v8(v1, k, rank, r1ok, vvec, vb);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            split_pair<T>(va[2 * i], va[2 * i + 1], ah[kc][2 * i], al[kc][2 * i]);
            split_pair<T>(vb[2 * i], vb[2 * i + 1], ah[kc][2 * i + 1], al[kc][2 * i + 1]);
        }
    }
    const T dummy = T{};
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) {
        const int cur = ch % DEPTH;
        float d[NTW][4];
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < KT; ++kc) {
            if (kc * 32 >= rank) break;
#pragma unroll
            for (int nt = 0; nt < NTW; ++nt) {
                const uint4 w = b[cur][nt][kc];
                mma16816<T>(d[nt], ah[kc][0], ah[kc][1], ah[kc][2], ah[kc][3], w.x, w.y);
                mma16816<T>(d[nt], al[kc][0], al[kc][1], al[kc][2], al[kc][3], w.x, w.y);
                mma16816<T>(d[nt], ah[kc][4], ah[kc][5], ah[kc][6], ah[kc][7], w.z, w.w);
                mma16816<T>(d[nt], al[kc][4], al[kc][5], al[kc][6], al[kc][7], w.z, w.w);
            }
        }
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
            const int col = c0 + ch * NTW * 8 + nt * 8 + 2 * q;
            if (col >= h_out) continue;
            if (r0ok) {
                const u32 o = yv[cur][nt][0];
                store_pair(y0, col, h_out, yal,
                           pack2<T>(lo_f32(dummy, o) + d[nt][0], hi_f32(dummy, o) + d[nt][1]));
            }
            if (r1ok) {
                const u32 o = yv[cur][nt][1];
                store_pair(y1, col, h_out, yal,
                           pack2<T>(lo_f32(dummy, o) + d[nt][2], hi_f32(dummy, o) + d[nt][3]));
            }
        }
        if (ch + DEPTH < CH) {
            load_b(ch + DEPTH, cur);
            load_y(ch + DEPTH, cur);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels: the same shrink and expand on CUDA cores, for batches whose segments all have a
// few rows (decode with many adapters: one row each). The tensor-core kernels compute 16 rows
// per tile whatever the segment holds; these give every warp only real rows and keep many
// 16-byte loads of A and B in flight with few registers, which is what a weight stream needs.

#define ROWS_WARPS 4
#define ROWS_KU 4
// The row expand's own shape: one column step a lane (B's 16 bytes loaded before the wait) and
// 8 warps a block, at 32 registers a thread so that 64 warps fit an SM (launch bounds of 8). Measured on the H200
// against 4 steps and 4 warps and other shapes (bench/scripts/sgmv_stream_probe.py instantiates
// the row kernels with other constants; bench/results/sgmv-row-expand-knobs-*-s13*.txt): the
// latency of each block's chain after the wait, not the bytes in flight, bounds it.
#define EXPAND_ROWS_WARPS 8
#define EXPAND_ROWS_KU 1
// The grid-stride row expand's launch bounds: blocks of EXPAND_ROWS_WARPS warps an SM, which
// caps it at 40 registers (the host sizes its one wave of blocks from this).
#define EXPAND_ROWS_GS_BLOCKS 6
// The gate|up expand fused into SiLU-mul (sgmv_expand_silu_rows_impl): 8 warps a block at 4
// blocks an SM (64 registers; 6 and 12 blocks of 8 and 4 warps measured no faster:
// bench/results/sgmv-expand-silu-probe-*-s15*.txt), and the columns of one row a block covers
// for rows that no segment does.
#define EXPAND_SILU_WARPS 8
#define EXPAND_SILU_BLOCKS 4
#define EXPAND_SILU_GAP_COLS 2048
static_assert(EXPAND_SILU_GAP_COLS == EXPAND_SILU_WARPS * 32 * 8, "a gap block: 8 columns a thread");
// The q|k|v expand fused into RoPE and the KV-cache write (sgmv_expand_rope_rows_impl), in
// blocks of the same shape; a block without adapter covers this many (i, i + head_dim/2) pairs.
#define EXPAND_ROPE_GAP_PAIRS 256
static_assert(EXPAND_ROPE_GAP_PAIRS == EXPAND_SILU_WARPS * 32, "a gap block: one pair a thread");

// Sum of the eight products of two packed vectors of eight halves.
template <typename T>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const T t = T{};
    float s = lo_f32(t, a.x) * lo_f32(t, b.x);
    s = fmaf(hi_f32(t, a.x), hi_f32(t, b.x), s);
    s = fmaf(lo_f32(t, a.y), lo_f32(t, b.y), s);
    s = fmaf(hi_f32(t, a.y), hi_f32(t, b.y), s);
    s = fmaf(lo_f32(t, a.z), lo_f32(t, b.z), s);
    s = fmaf(hi_f32(t, a.z), hi_f32(t, b.z), s);
    s = fmaf(lo_f32(t, a.w), lo_f32(t, b.w), s);
    s = fmaf(hi_f32(t, a.w), hi_f32(t, b.w), s);
    return s;
}

// Sum of the eight products of eight floats and a packed vector of eight halves, in order.
template <typename T>
__device__ __forceinline__ float dot8f(const float (&w)[8], uint4 b) {
    const T t = T{};
    float s = w[0] * lo_f32(t, b.x);
    s = fmaf(w[1], hi_f32(t, b.x), s);
    s = fmaf(w[2], lo_f32(t, b.y), s);
    s = fmaf(w[3], hi_f32(t, b.y), s);
    s = fmaf(w[4], lo_f32(t, b.z), s);
    s = fmaf(w[5], hi_f32(t, b.z), s);
    s = fmaf(w[6], lo_f32(t, b.w), s);
    return fmaf(w[7], hi_f32(t, b.w), s);
}

// v[row, n] = x[row, :] . A[n, :] for the rows of tile blockIdx.z: rank n = blockIdx.y * NW +
// warp per warp, over split blockIdx.x of h_in (whole 8-element vectors), lanes striding over
// the vectors with KU loads in flight, ROWS rows per pass (instantiated with one: the host sends it
// segments of one row by default). With more than one split, the warps add into a
// zeroed f32 accumulator [tile][16][acc_rank]; the tile's last block to finish (counter) copies
// it to v and clears accumulator and counter, as the tensor-core shrink does.
template <typename T, int ROWS, int KU = ROWS_KU, int NW = ROWS_WARPS>
__device__ __forceinline__ void sgmv_shrink_rows_impl(
    const T* __restrict__ x, int h_in, float* __restrict__ v, int v_stride,
    const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,
    const u32* __restrict__ segs, int ksplit, int acc_rank, float* __restrict__ acc,
    u32* __restrict__ counters) {
    __shared__ int is_last;
    const int tile = blockIdx.z, split = blockIdx.x;
    const ShrinkTile st = shrink_tile(tiles, segs, table, tile);
    const int row0 = st.row0, seg_end = st.end, slot_rank = st.rank;
    const void* slot_a = st.a;
    // x comes from the previous kernel, and v and the workspace may still be in use by the
    // previous shrink/expand pair (see sgmv_shrink_impl).
    pdl_enter();
    if (slot_a == nullptr) return;  // the same for every block of the tile
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = blockIdx.y * NW + warp;
    const int nrows = min(16, seg_end - row0);
    const bool vec = (h_in & 7) == 0;
    const int nvec = (h_in + 7) >> 3;
    const int per = (nvec + ksplit - 1) / ksplit;
    const int i_begin = split * per, i_end = min(nvec, i_begin + per);
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    float* tacc = acc + (size_t)tile * 16 * acc_rank;
    if (n < slot_rank) {
        const T* An = reinterpret_cast<const T*>(slot_a) + (size_t)n * h_in;
        for (int r0 = 0; r0 < nrows; r0 += ROWS) {
            float sum[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sum[r] = 0.0f;
            for (int i0 = i_begin + lane; i0 < i_end; i0 += 32 * KU) {
                uint4 a[KU];
                uint4 xv[KU][ROWS];
#pragma unroll
                for (int u = 0; u < KU; ++u) {
                    const int i = i0 + u * 32;
                    a[u] = i < i_end ? load8(An, i * 8, h_in, vec) : zero;
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const T* xr = x + (size_t)(row0 + r0 + r) * h_in;
                        xv[u][r] = (i < i_end && r0 + r < nrows) ? load8(xr, i * 8, h_in, vec) : zero;
                    }
                }
#pragma unroll
                for (int u = 0; u < KU; ++u) {
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) sum[r] += dot8<T>(a[u], xv[u][r]);
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float t = warp_sum(sum[r]);
                if (lane == 0 && r0 + r < nrows) {
                    if (ksplit == 1) {
                        v[(size_t)(row0 + r0 + r) * v_stride + n] = t;
                    } else {
                        atomicAdd(&tacc[(r0 + r) * acc_rank + n], t);
                    }
                }
            }
        }
    }
    if (ksplit == 1) return;

    __threadfence();
    __syncthreads();
    const u32 blocks = gridDim.x * gridDim.y;
    if (threadIdx.x == 0) {
        const u32 prev = atomicAdd(&counters[tile], 1u);
        is_last = (prev == blocks - 1);
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < nrows * slot_rank; idx += blockDim.x) {
        const int row = idx / slot_rank, col = idx % slot_rank;
        v[(size_t)(row0 + row) * v_stride + col] = __ldcg(&tacc[row * acc_rank + col]);
        tacc[row * acc_rank + col] = 0.0f;
    }
    if (threadIdx.x == 0) counters[tile] = 0u;
}

// A slot's parts for one group, in registers (selects instead of indexing, so they stay there):
// B (null: missing), rank and first position in v; part j covers columns [start_j, end_j).
struct RowParts {
    const u16* b0;
    const u16* b1;
    const u16* b2;
    int rank0, rank1, rank2;
    int voff0, voff1, voff2;
};

__device__ __forceinline__ RowParts row_parts(const LoraSlot* s) {
    RowParts rp;
    rp.b0 = reinterpret_cast<const u16*>(s->b[0]);
    rp.b1 = reinterpret_cast<const u16*>(s->b[1]);
    rp.b2 = reinterpret_cast<const u16*>(s->b[2]);
    rp.rank0 = (int)s->prank[0];
    rp.rank1 = (int)s->prank[1];
    rp.rank2 = (int)s->prank[2];
    rp.voff0 = (int)s->voff[0];
    rp.voff1 = (int)s->voff[1];
    rp.voff2 = (int)s->voff[2];
    return rp;
}

// This lane's 8 ranks of column `col`'s row of B, part B = p (rank r, starting at column
// `start`; null: the slot lacks the part), and in `rank` the part's rank, 0 where the column is
// not written (past end2 or no part).
template <typename T>
__device__ __forceinline__ uint4 row_b8(const u16* p, int r, int start, int col, int end2, int kk,
                                        int& rank) {
    const bool live = col < end2 && p != nullptr;
    rank = live ? r : 0;
    return (live && kk < r)
               ? load8(reinterpret_cast<const T*>(p) + (size_t)(col - start) * r, kk, r,
                       (r & 7) == 0)
               : make_uint4(0u, 0u, 0u, 0u);
}

// y[row, col_offset + c] += v[row, voff_j ..][.. rank_j] . B_j[c - start_j, :] for the rows of
// tile blockIdx.y: RL lanes per column (8 ranks each), 32 / RL columns per warp step, KU steps
// per warp, NW warps per block; a column's B is loaded once (before the wait: B comes from host
// copies), then applied row by row. Parts may end anywhere: each column finds its own.
template <typename T, typename VT, int RL, int KU = EXPAND_ROWS_KU, int NW = EXPAND_ROWS_WARPS,
          bool YP = true>
__device__ __forceinline__ void sgmv_expand_rows_impl(
    const VT* __restrict__ v, int v_stride, T* __restrict__ y, int y_stride, int col_offset,
    int end0, int end1, int end2, const LoraSlot* __restrict__ table,
    const u32* __restrict__ tiles, const u32* __restrict__ segs) {
    constexpr int CPS = 32 / RL;
    const int tile = blockIdx.y;
    const TileSeg ts = tile_seg(tiles, segs, tile);
    const int row0 = ts.row0, seg_end = ts.end;
    const u32 slot = ts.slot;
    if (seg_end <= row0) {  // a TILE_NONE entry
        pdl_enter();
        return;
    }
    const RowParts rp = row_parts(table + slot);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % RL, cg = lane / RL;
    const int kk = sub * 8;
    const int col_base = (blockIdx.x * NW + warp) * CPS * KU + cg;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    uint4 bv[KU];
    int voff[KU], rank[KU];
#pragma unroll
    for (int u = 0; u < KU; ++u) {
        const int col = col_base + u * CPS;
        const int j = (col >= end0) + (col >= end1);
        const u16* p = j == 0 ? rp.b0 : (j == 1 ? rp.b1 : rp.b2);
        const int r = j == 0 ? rp.rank0 : (j == 1 ? rp.rank1 : rp.rank2);
        voff[u] = j == 0 ? rp.voff0 : (j == 1 ? rp.voff1 : rp.voff2);
        bv[u] = row_b8<T>(p, r, j == 0 ? 0 : (j == 1 ? end0 : end1), col, end2, kk, rank[u]);
    }
    pdl_enter();
    const int nrows = min(16, seg_end - row0);
    constexpr int VN = VVec<VT>::n;
    const bool vvec = (v_stride & (VN - 1)) == 0;
    // YP: a one-row segment's old y is loaded before v, beside it rather than after the sum
    // (after the GEMM that wrote y, 7B batch 32: o 3.4 -> 3.1 us, down 3.3 -> 3.1 on the H200,
    // at 8 blocks an SM; bench/results/sgmv-row-expand-after-gemm-*-s14g.txt).
    float yp[KU];
#pragma unroll
    for (int u = 0; u < KU; ++u) {
        yp[u] = (YP && nrows == 1 && sub == 0 && rank[u] > 0)
                    ? to_f32(y[(size_t)row0 * y_stride + col_offset + col_base + u * CPS])
                    : 0.0f;
    }
    for (int row = 0; row < nrows; ++row) {
        const VT* vr = v + (size_t)(row0 + row) * v_stride;
        T* yr = y + (size_t)(row0 + row) * y_stride + col_offset;
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            float part = 0.0f;
            if (kk < rank[u]) {
                float w[8];
                load_v8_l1(vr + voff[u], kk, rank[u], vvec && (voff[u] & (VN - 1)) == 0, w);
                part = dot8f<T>(w, bv[u]);
            }
#pragma unroll
            for (int o = RL / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
            if (sub == 0 && rank[u] > 0) {
                const int col = col_base + u * CPS;
                const float old = (YP && nrows == 1) ? yp[u] : to_f32(yr[col]);
                yr[col] = from_f32<T>(old + part);
            }
        }
    }
}

// The same for outputs wider than one wave of the kernel above (q|k|v, gate|up at batch 32):
// one wave of blocks, each looping over column blocks. gridDim.x = per_tile * ntiles; block b
// serves tile b % ntiles and its column blocks b / ntiles, + per_tile, ... below ncb. Each warp
// loads the next column block's B (and, for a segment of one row, its old y) before it applies
// the current one, so only the first round's loads wait for the shrink. The slot's parts are
// read from the table (L1) for each column block rather than held, which keeps it at 40
// registers (53 otherwise; measured faster too: bench/results/sgmv-row-expand-gs-*-s14*.txt).
template <typename T, typename VT, int RL, int NW = EXPAND_ROWS_WARPS>
__device__ __forceinline__ void sgmv_expand_rows_gs_impl(
    const VT* __restrict__ v, int v_stride, T* __restrict__ y, int y_stride, int col_offset,
    int end0, int end1, int end2, const LoraSlot* __restrict__ table,
    const u32* __restrict__ tiles, const u32* __restrict__ segs, int ntiles, int ncb) {
    constexpr int CPS = 32 / RL;
    const int tile = blockIdx.x % ntiles, per_tile = gridDim.x / ntiles;
    int cb = blockIdx.x / ntiles;
    const TileSeg ts = tile_seg(tiles, segs, tile);
    if (ts.end <= ts.row0 || cb >= ncb) {  // a TILE_NONE entry, or no column block left
        pdl_enter();
        return;
    }
    const LoraSlot* sl = table + ts.slot;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % RL, cg = lane / RL, kk = sub * 8;
    auto load_b = [&](int col, int& rank, int& voff) -> uint4 {
        const int j = (col >= end0) + (col >= end1);
        voff = (int)sl->voff[j];
        return row_b8<T>(reinterpret_cast<const u16*>(sl->b[j]), (int)sl->prank[j],
                         j == 0 ? 0 : (j == 1 ? end0 : end1), col, end2, kk, rank);
    };
    int col = (cb * NW + warp) * CPS + cg, rank, voff;
    uint4 b = load_b(col, rank, voff);
    pdl_enter();
    const int nrows = min(16, ts.end - ts.row0);
    constexpr int VN = VVec<VT>::n;
    const bool vvec = (v_stride & (VN - 1)) == 0;
    T* y0 = y + (size_t)ts.row0 * y_stride + col_offset;
    float yv = (nrows == 1 && sub == 0 && rank > 0) ? to_f32(y0[col]) : 0.0f;
    for (;;) {
        const int cbn = cb + per_tile;
        const bool more = cbn < ncb;  // the same for the whole block
        const int coln = (cbn * NW + warp) * CPS + cg;
        int rankn = 0, voffn = 0;
        uint4 bn = make_uint4(0u, 0u, 0u, 0u);
        float yvn = 0.0f;
        if (more) {
            bn = load_b(coln, rankn, voffn);
            if (nrows == 1 && sub == 0 && rankn > 0) yvn = to_f32(y0[coln]);
        }
        for (int row = 0; row < nrows; ++row) {
            T* yr = y0 + (size_t)row * y_stride;
            float part = 0.0f;
            if (kk < rank) {
                float w[8];
                load_v8_l1(v + (size_t)(ts.row0 + row) * v_stride + voff, kk, rank,
                           vvec && (voff & (VN - 1)) == 0, w);
                part = dot8f<T>(w, b);
            }
#pragma unroll
            for (int o = RL / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
            if (sub == 0 && rank > 0) {
                const float old = nrows == 1 ? yv : to_f32(yr[col]);
                yr[col] = from_f32<T>(old + part);
            }
        }
        if (!more) break;
        cb = cbn;
        col = coln;
        b = bn;
        rank = rankn;
        voff = voffn;
        yv = yvn;
    }
}

// The gate|up expand fused into SiLU-mul, for a two-part group whose parts are n wide: with g
// and u the columns c and n + c of y's row after the expand (y += v . B_j as the row expands
// do, rounded to T), act[row, c] = silu(g) * u. y itself is left as the GEMM wrote it. So the
// expand's output never goes back to memory, and SiLU-mul is no kernel of its own.
//
// Blocks below per_tile * ntiles are the grid-stride expand's (tile blockIdx.x % ntiles, column
// blocks blockIdx.x / ntiles + k * per_tile below ncb), each lane group holding a column's B of
// both parts. The rest cover, EXPAND_SILU_GAP_COLS columns each, the rows that no segment does
// (row_lora[row] == 0: rows without an adapter, a decode step's padding), with SiLU-mul alone.
template <typename T, typename VT, int RL, int NW = EXPAND_SILU_WARPS>
__device__ __forceinline__ void sgmv_expand_silu_rows_impl(
    const VT* __restrict__ v, int v_stride, const T* __restrict__ y, int y_stride, int n,
    T* __restrict__ act, const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,
    const u32* __restrict__ segs, const u32* __restrict__ row_lora, int ntiles, int per_tile,
    int ncb) {
    const int gap = (int)blockIdx.x - per_tile * ntiles;
    if (gap >= 0) {
        const int per_row = (n + EXPAND_SILU_GAP_COLS - 1) / EXPAND_SILU_GAP_COLS;
        const int row = gap / per_row;
        const bool todo = row_lora[row] == 0u;  // step metadata: read before the wait
        pdl_enter();
        if (!todo) return;
        const T* yr = y + (size_t)row * y_stride;
        T* out = act + (size_t)row * n;
        const int c0 = (gap % per_row) * EXPAND_SILU_GAP_COLS + (int)threadIdx.x * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int c = c0 + i;
            if (c < n) out[c] = from_f32<T>(silu_times(to_f32(yr[c]), to_f32(yr[n + c])));
        }
        return;
    }
    constexpr int CPS = 32 / RL;
    const int tile = blockIdx.x % ntiles;
    int cb = blockIdx.x / ntiles;
    const TileSeg ts = tile_seg(tiles, segs, tile);
    if (ts.end <= ts.row0 || cb >= ncb) {  // a TILE_NONE entry, or no column block left
        pdl_enter();
        return;
    }
    const LoraSlot* sl = table + ts.slot;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % RL, cg = lane / RL, kk = sub * 8;
    const u16* bg = reinterpret_cast<const u16*>(sl->b[0]);
    const u16* bu = reinterpret_cast<const u16*>(sl->b[1]);
    const int rg = (int)sl->prank[0], ru = (int)sl->prank[1];
    const int vg = (int)sl->voff[0], vu = (int)sl->voff[1];
    int col = (cb * NW + warp) * CPS + cg, rank_g, rank_u;
    uint4 b0 = row_b8<T>(bg, rg, 0, col, n, kk, rank_g);
    uint4 b1 = row_b8<T>(bu, ru, 0, col, n, kk, rank_u);
    pdl_enter();
    const int nrows = min(16, ts.end - ts.row0);
    constexpr int VN = VVec<VT>::n;
    const bool vvec = (v_stride & (VN - 1)) == 0;
    const bool gvec = vvec && (vg & (VN - 1)) == 0, uvec = vvec && (vu & (VN - 1)) == 0;
    for (;;) {
        const int cbn = cb + per_tile;
        const bool more = cbn < ncb;  // the same for the whole block
        const int coln = (cbn * NW + warp) * CPS + cg;
        int rank_gn = 0, rank_un = 0;
        uint4 b0n = make_uint4(0u, 0u, 0u, 0u), b1n = b0n;
        if (more) {
            b0n = row_b8<T>(bg, rg, 0, coln, n, kk, rank_gn);
            b1n = row_b8<T>(bu, ru, 0, coln, n, kk, rank_un);
        }
        const bool live = col < n && sub == 0;
        for (int row = 0; row < nrows; ++row) {
            const size_t r = (size_t)(ts.row0 + row);
            const T* yr = y + r * y_stride;
            // The GEMM's gate and up, loaded beside v.
            const float g0 = live ? to_f32(yr[col]) : 0.0f;
            const float u0 = live ? to_f32(yr[n + col]) : 0.0f;
            float dg = 0.0f, du = 0.0f;
            if (kk < rank_g) {
                float w[8];
                load_v8_l1(v + r * v_stride + vg, kk, rank_g, gvec, w);
                dg = dot8f<T>(w, b0);
            }
            if (kk < rank_u) {
                float w[8];
                load_v8_l1(v + r * v_stride + vu, kk, rank_u, uvec, w);
                du = dot8f<T>(w, b1);
            }
#pragma unroll
            for (int o = RL / 2; o > 0; o >>= 1) {
                dg += __shfl_xor_sync(0xffffffffu, dg, o);
                du += __shfl_xor_sync(0xffffffffu, du, o);
            }
            if (live) {
                // Rounded to T after the expand, as y would hold them.
                const float g = to_f32(from_f32<T>(g0 + dg));
                const float u = to_f32(from_f32<T>(u0 + du));
                act[r * n + col] = from_f32<T>(silu_times(g, u));
            }
        }
        if (!more) break;
        cb = cbn;
        col = coln;
        b0 = b0n;
        b1 = b1n;
        rank_g = rank_gn;
        rank_u = rank_un;
    }
}

// One (i, i + half) pair p of a q|k|v row after its expand (a, b: its two values, rounded to
// T), as ops.cu rope_write_kv leaves it: a q head's pair rotated in place in the row, a k
// head's rotated and a v head's as it is written to the caches at `slot` (the row's k and v
// columns themselves are not written).
template <typename T>
__device__ __forceinline__ void rope_store_pair(T* __restrict__ row, int p, float a, float b,
                                                float pos, const float* __restrict__ inv_freq,
                                                int n_heads, int n_kv, int half, u32 slot,
                                                T* __restrict__ k_cache, T* __restrict__ v_cache) {
    const int head = p / half, i = p % half, hd = 2 * half;
    if (head < n_heads + n_kv) {
        float sn, cs;
        sincosf(pos * inv_freq[i], &sn, &cs);
        const T ra = from_f32<T>(a * cs - b * sn), rb = from_f32<T>(b * cs + a * sn);
        if (head < n_heads) {
            row[head * hd + i] = ra;
            row[head * hd + i + half] = rb;
        } else {
            const size_t dst = (size_t)slot * n_kv * hd + (size_t)(head - n_heads) * hd + i;
            k_cache[dst] = ra;
            k_cache[dst + half] = rb;
        }
    } else {
        const size_t dst = (size_t)slot * n_kv * hd + (size_t)(head - n_heads - n_kv) * hd + i;
        v_cache[dst] = from_f32<T>(a);
        v_cache[dst + half] = from_f32<T>(b);
    }
}

// The q|k|v expand fused into RoPE and the KV-cache write: y += v . B_j for the q, k and v parts
// (heads of head_dim packed from column 0 of each row of qkv), then what ops.cu rope_write_kv
// does with the row, so the expanded row is written once (q in place, k and v to the caches)
// and RoPE is no kernel of its own. heads = n_heads | n_kv_heads << 16.
//
// A lane group takes a pair (i, i + head_dim/2) of one head: both its columns' B, one load of v.
// Blocks below per_tile * ntiles are the grid-stride expand's over the pairs (tile
// blockIdx.x % ntiles), the rest cover EXPAND_ROPE_GAP_PAIRS pairs each of the rows without
// adapter. The step's positions, KV slots and row flags are the metadata's sections at
// positions, + rows and + 3 * rows (cuda/plan.rs `pack_meta`).
template <typename T, typename VT, int RL, int NW = EXPAND_SILU_WARPS>
__device__ __forceinline__ void sgmv_expand_rope_rows_impl(
    const VT* __restrict__ v, int v_stride, T* __restrict__ qkv, int row_stride,
    const float* __restrict__ inv_freq, const u32* __restrict__ positions, int rows,
    const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,
    const u32* __restrict__ segs, T* __restrict__ k_cache, T* __restrict__ v_cache, u32 heads,
    int head_dim, int ntiles, int per_tile) {
    const int n_heads = (int)(heads & 0xffffu), n_kv = (int)(heads >> 16), half = head_dim / 2;
    const u32* __restrict__ slots = positions + rows;
    const u32* __restrict__ row_lora = positions + 3 * rows;
    const int pairs = (n_heads + 2 * n_kv) * half;
    const int gap = (int)blockIdx.x - per_tile * ntiles;
    if (gap >= 0) {
        const int per_row = (pairs + EXPAND_ROPE_GAP_PAIRS - 1) / EXPAND_ROPE_GAP_PAIRS;
        const int row = gap / per_row;
        const bool todo = row_lora[row] == 0u;  // step metadata: read before the wait
        pdl_enter();
        const int p = (gap % per_row) * EXPAND_ROPE_GAP_PAIRS + (int)threadIdx.x;
        if (!todo || p >= pairs) return;
        T* r = qkv + (size_t)row * row_stride;
        const int c0 = (p / half) * head_dim + p % half;
        rope_store_pair<T>(r, p, to_f32(r[c0]), to_f32(r[c0 + half]), (float)positions[row],
                           inv_freq, n_heads, n_kv, half, slots[row], k_cache, v_cache);
        return;
    }
    constexpr int CPS = 32 / RL;
    const int ncb = (pairs + NW * CPS - 1) / (NW * CPS);
    const int tile = blockIdx.x % ntiles;
    int cb = blockIdx.x / ntiles;
    const TileSeg ts = tile_seg(tiles, segs, tile);
    if (ts.end <= ts.row0 || cb >= ncb) {  // a TILE_NONE entry, or no column block left
        pdl_enter();
        return;
    }
    const LoraSlot* sl = table + ts.slot;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % RL, cg = lane / RL, kk = sub * 8;
    // Pair p's B rows (both columns), rank and v offset; nothing past the last pair.
    auto load_b = [&](int p, uint4& b1, int& rank, int& voff) -> uint4 {
        const int head = p / half, c0 = head * head_dim + p % half;
        const int j = head < n_heads ? 0 : (head < n_heads + n_kv ? 1 : 2);
        const int start = j == 0 ? 0 : (j == 1 ? n_heads : n_heads + n_kv) * head_dim;
        const u16* bp = reinterpret_cast<const u16*>(sl->b[j]);
        const int r = (int)sl->prank[j], lim = p < pairs ? c0 + half + 1 : 0;
        voff = (int)sl->voff[j];
        int unused;
        b1 = row_b8<T>(bp, r, start, c0 + half, lim, kk, unused);
        return row_b8<T>(bp, r, start, c0, lim, kk, rank);
    };
    int p = (cb * NW + warp) * CPS + cg, rank, voff;
    uint4 b1;
    uint4 b0 = load_b(p, b1, rank, voff);
    pdl_enter();
    const int nrows = min(16, ts.end - ts.row0);
    constexpr int VN = VVec<VT>::n;
    const bool vvec = (v_stride & (VN - 1)) == 0;
    for (;;) {
        const int cbn = cb + per_tile;
        const bool more = cbn < ncb;  // the same for the whole block
        const int pn = (cbn * NW + warp) * CPS + cg;
        int rankn = 0, voffn = 0;
        uint4 b0n = make_uint4(0u, 0u, 0u, 0u), b1n = b0n;
        if (more) b0n = load_b(pn, b1n, rankn, voffn);
        const bool live = p < pairs && sub == 0;
        const int c0 = (p / half) * head_dim + p % half;
        for (int row = 0; row < nrows; ++row) {
            const int rr = ts.row0 + row;
            T* r = qkv + (size_t)rr * row_stride;
            // The GEMM's two values, loaded beside v.
            const float y0 = live ? to_f32(r[c0]) : 0.0f;
            const float y1 = live ? to_f32(r[c0 + half]) : 0.0f;
            float d0 = 0.0f, d1 = 0.0f;
            if (kk < rank) {
                float w[8];
                load_v8_l1(v + (size_t)rr * v_stride + voff, kk, rank,
                           vvec && (voff & (VN - 1)) == 0, w);
                d0 = dot8f<T>(w, b0);
                d1 = dot8f<T>(w, b1);
            }
#pragma unroll
            for (int o = RL / 2; o > 0; o >>= 1) {
                d0 += __shfl_xor_sync(0xffffffffu, d0, o);
                d1 += __shfl_xor_sync(0xffffffffu, d1, o);
            }
            if (live) {
                // Rounded to T after the expand, as the row would hold them.
                const float a = to_f32(from_f32<T>(y0 + d0)), b = to_f32(from_f32<T>(y1 + d1));
                rope_store_pair<T>(r, p, a, b, (float)positions[rr], inv_freq, n_heads, n_kv,
                                   half, slots[rr], k_cache, v_cache);
            }
        }
        if (!more) break;
        cb = cbn;
        p = pn;
        b0 = b0n;
        b1 = b1n;
        rank = rankn;
        voff = voffn;
    }
}

#define DEFINE_EXPAND_ROPE_V(TNAME, TYPE, VNAME, VTYPE, RL)                                     \
    extern "C" __global__ void __launch_bounds__(EXPAND_SILU_WARPS * 32, EXPAND_SILU_BLOCKS)    \
        sgmv_expand_rope_rows_##TNAME##VNAME##_l##RL(                                          \
            const VTYPE* __restrict__ v, int v_stride, TYPE* __restrict__ qkv, int row_stride, \
            const float* __restrict__ inv_freq, const u32* __restrict__ positions, int rows,   \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,                 \
            const u32* __restrict__ segs, TYPE* __restrict__ k_cache,                          \
            TYPE* __restrict__ v_cache, u32 heads, int head_dim, int ntiles, int per_tile) {   \
        sgmv_expand_rope_rows_impl<TYPE, VTYPE, RL>(v, v_stride, qkv, row_stride, inv_freq,    \
                                                    positions, rows, table, tiles, segs,       \
                                                    k_cache, v_cache, heads, head_dim, ntiles, \
                                                    per_tile);                                 \
    }

#define DEFINE_EXPAND_SILU_V(TNAME, TYPE, VNAME, VTYPE, RL)                                     \
    extern "C" __global__ void __launch_bounds__(EXPAND_SILU_WARPS * 32, EXPAND_SILU_BLOCKS)    \
        sgmv_expand_silu_rows_##TNAME##VNAME##_l##RL(                                          \
            const VTYPE* __restrict__ v, int v_stride, const TYPE* __restrict__ y, int y_stride, \
            int n, TYPE* __restrict__ act, const LoraSlot* __restrict__ table,                 \
            const u32* __restrict__ tiles, const u32* __restrict__ segs,                       \
            const u32* __restrict__ row_lora, int ntiles, int per_tile, int ncb) {             \
        sgmv_expand_silu_rows_impl<TYPE, VTYPE, RL>(v, v_stride, y, y_stride, n, act, table,   \
                                                    tiles, segs, row_lora, ntiles, per_tile,   \
                                                    ncb);                                      \
    }

#define DEFINE_SHRINK_ROWS(TNAME, TYPE)                                                       \
    extern "C" __global__ void __launch_bounds__(ROWS_WARPS * 32, 8)                          \
        sgmv_shrink_rows_##TNAME(                                                             \
            const TYPE* __restrict__ x, int h_in, float* __restrict__ v, int v_stride,        \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,                \
            const u32* __restrict__ segs, int ksplit, int acc_rank, float* __restrict__ acc,  \
            u32* __restrict__ counters) {                                                     \
        sgmv_shrink_rows_impl<TYPE, 1>(x, h_in, v, v_stride, table, tiles, segs, ksplit,      \
                                          acc_rank, acc, counters);                           \
    }

// VNAME: empty for an f32 v, _vh for a v of the activations' type.
#define DEFINE_EXPAND_ROWS_V(TNAME, TYPE, VNAME, VTYPE, RL)                                    \
    extern "C" __global__ void __launch_bounds__(EXPAND_ROWS_WARPS * 32, 8)                   \
        sgmv_expand_rows_##TNAME##VNAME##_l##RL(                                              \
            const VTYPE* __restrict__ v, int v_stride, TYPE* __restrict__ y, int y_stride,    \
            int col_offset, int end0, int end1, int end2, const LoraSlot* __restrict__ table, \
            const u32* __restrict__ tiles, const u32* __restrict__ segs) {                    \
        sgmv_expand_rows_impl<TYPE, VTYPE, RL>(v, v_stride, y, y_stride, col_offset, end0,    \
                                               end1, end2, table, tiles, segs);               \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(EXPAND_ROWS_WARPS * 32, EXPAND_ROWS_GS_BLOCKS) \
        sgmv_expand_rows_gs_##TNAME##VNAME##_l##RL(                                           \
            const VTYPE* __restrict__ v, int v_stride, TYPE* __restrict__ y, int y_stride,    \
            int col_offset, int end0, int end1, int end2, const LoraSlot* __restrict__ table, \
            const u32* __restrict__ tiles, const u32* __restrict__ segs, int ntiles,          \
            int ncb) {                                                                        \
        sgmv_expand_rows_gs_impl<TYPE, VTYPE, RL>(v, v_stride, y, y_stride, col_offset, end0, \
                                                  end1, end2, table, tiles, segs, ntiles,     \
                                                  ncb);                                       \
    }

#define DEFINE_EXPAND_ROWS(TNAME, TYPE, RL)                                                   \
    DEFINE_EXPAND_ROWS_V(TNAME, TYPE, , float, RL)                                            \
    DEFINE_EXPAND_ROWS_V(TNAME, TYPE, _vh, TYPE, RL)                                          \
    DEFINE_EXPAND_SILU_V(TNAME, TYPE, , float, RL)                                            \
    DEFINE_EXPAND_SILU_V(TNAME, TYPE, _vh, TYPE, RL)                                          \
    DEFINE_EXPAND_ROPE_V(TNAME, TYPE, , float, RL)                                            \
    DEFINE_EXPAND_ROPE_V(TNAME, TYPE, _vh, TYPE, RL)

DEFINE_SHRINK_ROWS(bf16, bf16)
DEFINE_SHRINK_ROWS(f16, f16)
DEFINE_EXPAND_ROWS(bf16, bf16, 1)
DEFINE_EXPAND_ROWS(bf16, bf16, 2)
DEFINE_EXPAND_ROWS(bf16, bf16, 4)
DEFINE_EXPAND_ROWS(bf16, bf16, 8)
DEFINE_EXPAND_ROWS(bf16, bf16, 16)
DEFINE_EXPAND_ROWS(f16, f16, 1)
DEFINE_EXPAND_ROWS(f16, f16, 2)
DEFINE_EXPAND_ROWS(f16, f16, 4)
DEFINE_EXPAND_ROWS(f16, f16, 8)
DEFINE_EXPAND_ROWS(f16, f16, 16)

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

#define DEFINE_EXPAND_V(TNAME, TYPE, VNAME, VTYPE, KT, NTW)                                  \
    extern "C" __global__ void __launch_bounds__(EXPAND_WARPS * 32)                          \
        sgmv_expand_##TNAME##VNAME##_k##KT##_w##NTW(                                         \
            const VTYPE* __restrict__ v, int v_stride, TYPE* __restrict__ y, int y_stride,   \
            int col_offset, int part0, int end0, int end1, int end2,                         \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,               \
            const u32* __restrict__ segs, int y_early) {                                     \
        sgmv_expand_impl<TYPE, VTYPE, KT, NTW>(v, v_stride, y, y_stride, col_offset, part0,  \
                                               end0, end1, end2, table, tiles, segs,         \
                                               y_early);                                     \
    }

#define DEFINE_EXPAND(TNAME, TYPE, KT, NTW)                                                  \
    DEFINE_EXPAND_V(TNAME, TYPE, , float, KT, NTW)                                           \
    DEFINE_EXPAND_V(TNAME, TYPE, _vh, TYPE, KT, NTW)

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

#define DEFINE_EXPAND_LONG_V(TNAME, TYPE, VNAME, VTYPE, KT)                                   \
    extern "C" __global__ void __launch_bounds__(EXPAND_WARPS * 32)                          \
        sgmv_expand_long_##TNAME##VNAME##_k##KT(                                             \
            const VTYPE* __restrict__ v, int v_stride, TYPE* __restrict__ y, int y_stride,   \
            int col_offset, int part0, int end0, int end1, int end2,                         \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,               \
            const u32* __restrict__ segs, int y_early, int num_tiles) {                      \
        sgmv_expand_long_impl<TYPE, VTYPE, KT>(v, v_stride, y, y_stride, col_offset, part0,  \
                                               end0, end1, end2, table, tiles, segs,         \
                                               y_early, num_tiles);                          \
    }

#define DEFINE_EXPAND_LONG(TNAME, TYPE, KT)                                                  \
    DEFINE_EXPAND_LONG_V(TNAME, TYPE, , float, KT)                                           \
    DEFINE_EXPAND_LONG_V(TNAME, TYPE, _vh, TYPE, KT)

DEFINE_EXPAND_LONG(bf16, bf16, 1)
DEFINE_EXPAND_LONG(bf16, bf16, 2)
DEFINE_EXPAND_LONG(bf16, bf16, 4)
DEFINE_EXPAND_LONG(f16, f16, 1)
DEFINE_EXPAND_LONG(f16, f16, 2)
DEFINE_EXPAND_LONG(f16, f16, 4)

#if __CUDA_ARCH__ >= 900  // bulk copies, clusters
// ---------------------------------------------------------------------------------------------
// Streamed LoRA: shrink and expand of one-row segments fused in one kernel, the weights fed by
// bulk copies (TMA, 1-D) into a ring of shared-memory stages. For decode batches with an adapter a
// row, where the operator is a pure weight stream: every byte of A and B is read once.
//
// A cluster of C blocks (clusterDim.x) takes a row (tile) at a time; block j of it reads the
// j-th C-th of the slot's stacked A (whole rank rows: its part of v, complete, no split-K) and
// the j-th C-th of each part's columns of B (whole B rows), both contiguous in memory. The
// blocks swap their parts of v through distributed shared memory (each writes its part into
// every other block's copy with asynchronous stores that complete on that block's mbarrier),
// then expand. Warp 0 is the
// producer: one thread issues the copies, running ahead of the consumer warps across rows by
// as many stages as the ring holds (x and the old y of a row come by bulk copies as well). The
// host checks what the copies need: ranks of eight or more, powers of two, at most 128 a part;
// h_in, the parts' widths, y's stride and column offset multiples of eight; 16-byte aligned
// weights.

// A timeline hook for bench/scripts/sgmv_stream_probe.py (`trace`); nothing here.
#ifndef STREAM_TRACE
#define STREAM_TRACE(slot)
#define STREAM_TRACE_GT(slot)
#endif

// Consumer warps a block: a power of two (rows of A go to warps by rank row mod it).
#define STREAM_CONSUMERS 16
#define STREAM_MAX_STAGES 16
#define STREAM_MAX_RANK 384
// Rank rows a copy of the shrink's sums holds when they are spread over copies (SPREAD).
#define STREAM_SPREAD_ROWS 96
// Shared memory before the x row: barriers (512 bytes), the shrink's sums and two copies of v.
#define STREAM_HDR (512 + 4 * STREAM_MAX_RANK * 3)

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void bulk_g2s(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            dst),
        "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{ .reg .pred p; WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra "
        "WAIT_%=; }" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// A shared-memory address of this block as the same address in block `rank` of the cluster.
__device__ __forceinline__ u32 cluster_map(u32 addr, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
// An f32 into another block's shared memory (`addr`, mapped), completing 4 bytes of the
// transaction count of its barrier `bar` (mapped).
__device__ __forceinline__ void st_async_f32(u32 addr, float v, u32 bar) {
    asm volatile(
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];" ::"r"(addr),
        "f"(v), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;" ::: "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// The consumer warps only (named barrier 1).
__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;" ::"n"(STREAM_CONSUMERS * 32) : "memory");
}

// One block's share of one row: A's rank rows [n0, n0 + nr) and, per part, columns
// [c0, c0 + nc) of B, with where they go in y and in the block's copy of the old y; and how
// the share is cut into pieces (a stage each), in order: A (`a_rows` whole rank rows a piece
// when a row fits a stage, else each row cut in `a_split` pieces of `a_per` vectors), then
// each part's B (`b_cols` whole B rows a piece).
struct StreamWork {
    const u16* a;
    const u16* b[MAX_PARTS];
    int row, ra, n0, nr, a_rows, a_split, a_per, ycols, pieces;
    int rank[MAX_PARTS], voff[MAX_PARTS], c0[MAX_PARTS], nc[MAX_PARTS], yo[MAX_PARTS];
    int b_cols[MAX_PARTS];
    bool live;
};

__device__ __forceinline__ StreamWork stream_work(const LoraSlot* __restrict__ table,
                                                  const u32* __restrict__ tiles,
                                                  const u32* __restrict__ segs, int tile, int j,
                                                  int nb, const int (&start)[MAX_PARTS + 1],
                                                  int h_in, int stage_bytes) {
    StreamWork w;
    const TileSeg ts = tile_seg(tiles, segs, tile);
    const LoraSlot* s = table + ts.slot;
    w.live = ts.end > ts.row0 && s->a != nullptr;
    w.row = ts.row0;
    const int rank = w.live ? (int)s->rank : 0;
    w.ra = rank;
    w.n0 = rank * j / nb;
    w.nr = rank * (j + 1) / nb - w.n0;
    w.a = reinterpret_cast<const u16*>(s->a);
    const int nvec = h_in >> 3;
    if (2 * h_in <= stage_bytes) {
        w.a_rows = stage_bytes / (2 * h_in);
        w.a_split = 1;
        w.a_per = nvec;
        w.pieces = (w.nr + w.a_rows - 1) / w.a_rows;
    } else {
        w.a_rows = 1;
        w.a_split = (2 * h_in + stage_bytes - 1) / stage_bytes;
        w.a_per = (nvec + w.a_split - 1) / w.a_split;
        w.pieces = w.nr * w.a_split;
    }
    w.ycols = 0;
#pragma unroll
    for (int p = 0; p < MAX_PARTS; ++p) {
        const bool has = w.live && s->b[p] != nullptr;
        const int n8 = (start[p + 1] - start[p]) >> 3;
        w.b[p] = reinterpret_cast<const u16*>(s->b[p]);
        w.rank[p] = has ? (int)s->prank[p] : 0;
        w.voff[p] = (int)s->voff[p];
        w.c0[p] = 8 * (n8 * j / nb);
        w.nc[p] = has ? 8 * (n8 * (j + 1) / nb) - w.c0[p] : 0;
        w.yo[p] = w.ycols;
        w.ycols += w.nc[p];
        w.b_cols[p] = has ? stage_bytes / (2 * w.rank[p]) : 1;
        w.pieces += (w.nc[p] + w.b_cols[p] - 1) / w.b_cols[p];
    }
    return w;
}

// Calls a(first, count, v0, v1) for each piece of A (rank rows [first, first + count) of the
// share, vectors [v0, v1) of each), then b(part, first, count) for each piece of B (columns
// [first, first + count) of the part's share), in order.
template <typename FA, typename FB>
__device__ __forceinline__ void stream_pieces(const StreamWork& w, int nvec, FA a, FB b) {
    for (int r = 0; r < w.nr; r += w.a_rows) {
        const int count = min(w.a_rows, w.nr - r);
        for (int v0 = 0; v0 < nvec; v0 += w.a_per) a(r, count, v0, min(nvec, v0 + w.a_per));
    }
#pragma unroll
    for (int p = 0; p < MAX_PARTS; ++p) {
        for (int c = 0; c < w.nc[p]; c += w.b_cols[p]) b(p, c, min(w.b_cols[p], w.nc[p] - c));
    }
}

// A ring position: stage and the parity of its current pass.
struct RingPos {
    int s;
    u32 phase;
    __device__ __forceinline__ void next(int stages) {
        if (++s == stages) {
            s = 0;
            phase ^= 1u;
        }
    }
};

// One stage of B (`count` columns of a part of rank 8 << LG) applied to the block's copy of
// the old y (`yb`: the stage's first column), v at `vp` (the part's first rank): 1 << LG lanes
// a column, each with eight of its ranks, two column steps a pass.
template <typename T, int LG, bool MATH>
__device__ __forceinline__ void stream_expand_stage(const uint4* __restrict__ st, int count,
                                                    const float* vp, T* yb, int cw, int lane) {
    constexpr int L = 1 << LG, NT = STREAM_CONSUMERS * 32;
    const int kk = lane & (L - 1);
    float vr[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) vr[e] = vp[8 * kk + e];
    const int total = count << LG;
    for (int i0 = cw * 32; i0 < total && MATH; i0 += 2 * NT) {
        const int ia = i0 + lane, ib = ia + NT;
        const bool va = ia < total, vb = ib < total;
        float sa = va ? dot8f<T>(vr, st[ia]) : 0.0f;
        float sb = vb ? dot8f<T>(vr, st[ib]) : 0.0f;
#pragma unroll
        for (int off = L >> 1; off > 0; off >>= 1) {
            sa += __shfl_xor_sync(0xffffffffu, sa, off);
            sb += __shfl_xor_sync(0xffffffffu, sb, off);
        }
        if (kk == 0) {
            // A column is one lane group's: rounded once, as the expand kernels store it.
            if (va) yb[ia >> LG] = from_f32<T>(to_f32(yb[ia >> LG]) + sa);
            if (vb) yb[ib >> LG] = from_f32<T>(to_f32(yb[ib >> LG]) + sb);
        }
    }
}

// The MMA option's expand (ranks 32 and 64: RQ = rank / 32; the others take
// `stream_expand_stage`, rank 128 for registers). m16n8k16 with B's columns as
// the 16 rows of the A operand (rows g and g + 8 of a group of 16 columns are lane group g's)
// and v as the B operand. A lane's 16-byte load holds 8 ranks of a column, chunk
// c = q + 4 * ((it + (g & 1)) % RQ) in step it: the two column parities read different halves
// of a 128-byte line (no bank conflicts), so a row's sum is valid in the accumulator columns of
// its own parity, and every lane of the group holds it (d[g & 1], d[2 + (g & 1)]). v comes as
// hi + lo halves (f32 accuracy), the lane's own chunks (`stream_vfrag`).
template <typename T, int RQ>
__device__ __forceinline__ void stream_vfrag(const float* vp, int lane, u32 (&vh)[2][4],
                                             u32 (&vl)[2][4]) {
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int it = 0; it < RQ; ++it) {
        const float* s = vp + 8 * (q + 4 * ((it + (g & 1)) & (RQ - 1)));
#pragma unroll
        for (int e = 0; e < 4; ++e) split_pair<T>(s[2 * e], s[2 * e + 1], vh[it][e], vl[it][e]);
    }
}

template <typename T, int RQ, bool MATH>
__device__ __forceinline__ void stream_expand_stage_mma(const uint4* __restrict__ st, int count,
                                                        const u32 (&vh)[2][4],
                                                        const u32 (&vl)[2][4], T* yb, int gw,
                                                        int lane) {
    constexpr int L = 4 * RQ;  // vectors a column
    const int g = lane >> 2, q = lane & 3, e = g & 1;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int grp = gw; grp * 16 < count && MATH; grp += STREAM_CONSUMERS) {
        const int c1 = grp * 16 + g, c2 = c1 + 8;
        const bool ok1 = c1 < count, ok2 = c2 < count;
        // Independent accumulators (short mma chains), summed at the end.
        float d[2 * RQ][4] = {};
#pragma unroll
        for (int it = 0; it < RQ; ++it) {
            const int ch = q + 4 * ((it + e) & (RQ - 1));
            const uint4 a = ok1 ? st[c1 * L + ch] : zero;
            const uint4 b = ok2 ? st[c2 * L + ch] : zero;
            mma16816<T>(d[2 * it], a.x, b.x, a.y, b.y, vh[it][0], vh[it][1]);
            mma16816<T>(d[2 * it + 1], a.z, b.z, a.w, b.w, vh[it][2], vh[it][3]);
            mma16816<T>(d[2 * it], a.x, b.x, a.y, b.y, vl[it][0], vl[it][1]);
            mma16816<T>(d[2 * it + 1], a.z, b.z, a.w, b.w, vl[it][2], vl[it][3]);
        }
        float y1 = 0.0f, y2 = 0.0f;
#pragma unroll
        for (int k = 0; k < 2 * RQ; ++k) {
            y1 += e ? d[k][1] : d[k][0];
            y2 += e ? d[k][3] : d[k][2];
        }
        // Rounded once, as the expand kernels store it.
        if (q == 0 && ok1) yb[c1] = from_f32<T>(to_f32(yb[c1]) + y1);
        if (q == 1 && ok2) yb[c2] = from_f32<T>(to_f32(yb[c2]) + y2);
    }
}

// y[row, col_offset + ...] += (x[row] . A^T) . B_j^T per part for one-row segments (tiles),
// C blocks a row; see above. start: the parts' first columns (relative to col_offset), the
// fourth entry the group's width. y_cap: columns a block's copy of the old y holds.
// XA: the producer asks for the first row's x (after the kernel before is done) once it has
// issued this many stages (0: when the ring is full). x comes behind the weights asked for
// before it, and the shrink waits for x: behind a full ring of every block it landed 3-4 us
// after the first stage (session 19's timeline, clusters of three). Asked for earlier, a block
// that starts while the kernel before still runs waits for it with fewer stages in flight.
// Measured (H200, 7B r=64, bench/results/sgmv-lora-stream-probe-xa-*-s19e.txt): clusters of
// three best after three stages (32 rows 14.6 us against 14.9 at a full ring and 14.8 after
// two; 24 rows level), the other sizes at a full ring (64 rows in pairs 23.3 against 24.7
// after two; fours unmeasured).
#define STREAM_X_AFTER(C) ((C) == 3 ? 3 : 0)
template <typename T, int C, bool MATH = true, bool MMA = false, int UV = 64, int SPREAD = 1,
          int XA = STREAM_X_AFTER(C)>
__device__ __forceinline__ void sgmv_lora_stream_impl(
    const T* __restrict__ x, int h_in, T* __restrict__ y, int y_stride, int col_offset,
    int end0, int end1, int end2, const LoraSlot* __restrict__ table,
    const u32* __restrict__ tiles, const u32* __restrict__ segs, int num_tiles, int stages,
    int stage_bytes, int y_cap) {
    static_assert(SPREAD * STREAM_SPREAD_ROWS <= STREAM_MAX_RANK, "the copies fit sacc");
    extern __shared__ __align__(128) unsigned char smem[];
    const int start[MAX_PARTS + 1] = {0, end0, end1, end2};
    const u32 base = smem_u32(smem);
    // Barriers: full[16] at 0, empty[16] at 128, x full/empty at 256/264, y full[2] at 272,
    // y empty[2] at 288, v full[2] at 304.
    const u32 full0 = base, empty0 = base + 128, xfull = base + 256, xempty = base + 264;
    const u32 yfull0 = base + 272, yempty0 = base + 288, vfull0 = base + 304;
    float* sacc = reinterpret_cast<float*>(smem + 512);
    float* vbuf = sacc + STREAM_MAX_RANK;  // [2][STREAM_MAX_RANK]
    unsigned char* xs = smem + STREAM_HDR;
    const int x_bytes = (2 * h_in + 127) & ~127;
    unsigned char* ys = xs + x_bytes;  // [2][y_cap] of T
    const int y_bytes = (2 * y_cap + 127) & ~127;
    unsigned char* ring = ys + 2 * y_bytes;
    const u32 ring0 = smem_u32(ring);
    stages = min(stages, STREAM_MAX_STAGES);  // the host sizes the ring within it
    const int nb = C, j = C == 1 ? 0 : (int)cluster_rank();
    const int cluster = blockIdx.x / nb, nclusters = gridDim.x / nb;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nvec = h_in >> 3;
    if (threadIdx.x == 0) {
        STREAM_TRACE(124);
        STREAM_TRACE_GT(126);
    }
    // The producer's first share, read (three dependent loads: the tile, its segment, the
    // slot) while another thread sets up the barriers.
    StreamWork first_w;
    if (threadIdx.x == 0 && cluster < num_tiles)
        first_w = stream_work(table, tiles, segs, cluster, j, nb, start, h_in, stage_bytes);
    if (threadIdx.x == 32) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, STREAM_CONSUMERS);
        }
        mbar_init(xfull, 1);
        mbar_init(xempty, 1);
        for (int b = 0; b < 2; ++b) {
            mbar_init(yfull0 + 8 * b, 1);
            mbar_init(yempty0 + 8 * b, STREAM_CONSUMERS);
            mbar_init(vfull0 + 8 * b, 1);
        }
        fence_barrier_init();
    }
    for (int i = threadIdx.x; i < STREAM_MAX_RANK; i += blockDim.x) sacc[i] = 0.0f;
    // The block's barriers are ready before its threads use them; every block's, before any
    // block stores into another: the consumers wait for the cluster at once, the producer only
    // at its end, so that the first copies go out without it. (A cluster-scope wait or fence
    // once copies are in flight waits for them: microseconds.)
    __syncthreads();
    if (C > 1) cluster_arrive();  // relaxed: fence_barrier_init released the barriers
    bool cluster_pending = C > 1;
    auto cluster_ready = [&]() {
        if (cluster_pending) {
            cluster_wait();
            cluster_pending = false;
        }
    };
    if (threadIdx.x == 32) STREAM_TRACE(59);

    if (warp == 0) {
        // The producer.
        if (lane == 0) {
            RingPos at{0, 0u};
            bool wrapped = false, waited = false;
            int ni = 0;  // pieces issued
            int lt = 0;
            // The first row's x once the kernel before is done (the weights do not come from
            // it: the first stages' copies go out before the wait).
            auto first_x = [&](const StreamWork& w) {
                if (waited) return;
                pdl_wait();
                waited = true;
                mbar_expect_tx(xfull, (u32)(2 * h_in));
                bulk_g2s(smem_u32(xs), x + (size_t)w.row * h_in, (u32)(2 * h_in), xfull);
            };
            auto issue = [&](const StreamWork& w, const void* src, u32 bytes) {
                if (wrapped) {
                    first_x(w);
                    mbar_wait(empty0 + 8 * at.s, at.phase ^ 1u);
                }
                STREAM_TRACE(64 + min(ni, 59));
                mbar_expect_tx(full0 + 8 * at.s, bytes);
                bulk_g2s(ring0 + at.s * stage_bytes, src, bytes, full0 + 8 * at.s);
                at.next(stages);
                if (at.s == 0) wrapped = true;
                if (++ni == XA) first_x(w);
            };
            for (int tile = cluster; tile < num_tiles; tile += nclusters) {
                const StreamWork w =
                    tile == cluster
                        ? first_w
                        : stream_work(table, tiles, segs, tile, j, nb, start, h_in, stage_bytes);
                if (!w.live) continue;
                if (lt > 0) {
                    mbar_wait(xempty, (u32)((lt - 1) & 1));
                    mbar_expect_tx(xfull, (u32)(2 * h_in));
                    bulk_g2s(smem_u32(xs), x + (size_t)w.row * h_in, (u32)(2 * h_in), xfull);
                }
                const int yb = lt & 1, yu = lt >> 1;
                bool y_sent = false;
                // The old y of the share, once the buffer's row before is written (a share
                // without B columns only turns the buffer over).
                auto send_y = [&]() {
                    first_x(w);
                    if (yu > 0) mbar_wait(yempty0 + 8 * yb, (u32)((yu - 1) & 1));
                    if (w.ycols == 0) {
                        mbar_arrive(yfull0 + 8 * yb);
                    } else {
                        mbar_expect_tx(yfull0 + 8 * yb, (u32)(2 * w.ycols));
                    }
#pragma unroll
                    for (int p = 0; p < MAX_PARTS; ++p) {
                        if (w.nc[p] > 0) {
                            const T* src =
                                y + (size_t)w.row * y_stride + col_offset + start[p] + w.c0[p];
                            bulk_g2s(smem_u32(ys) + yb * y_bytes + 2 * w.yo[p], src,
                                     (u32)(2 * w.nc[p]), yfull0 + 8 * yb);
                        }
                    }
                    y_sent = true;
                };
                stream_pieces(
                    w, nvec,
                    [&](int first, int count, int v0, int v1) {
                        issue(w, w.a + (size_t)(w.n0 + first) * h_in + (size_t)v0 * 8,
                              (u32)(16 * count * (v1 - v0)));
                    },
                    [&](int p, int first, int count) {
                        if (!y_sent) send_y();
                        issue(w, w.b[p] + (size_t)(w.c0[p] + first) * w.rank[p],
                              (u32)(2 * count * w.rank[p]));
                    });
                if (!y_sent) send_y();
                first_x(w);
                ++lt;
            }
            if (!waited) pdl_wait();
        }
        pdl_launch_dependents();
    } else {
        pdl_launch_dependents();
        cluster_ready();
        const int cw = warp - 1, ct = threadIdx.x - 32;  // consumer warp and thread
        const uint4* xv = reinterpret_cast<const uint4*>(xs);
        u32 vh[2][4], vl[2][4];  // MMA: this lane's v fragments of the current part
        RingPos at{0, 0u};
        int lt = 0;
        [[maybe_unused]] int nw_ = 0;  // stages waited for (STREAM_TRACE)
        int units_done = 0;   // MMA: shrink units of the block so far (they go to warps in turn)
        for (int tile = cluster; tile < num_tiles; tile += nclusters) {
            const StreamWork w =
                stream_work(table, tiles, segs, tile, j, nb, start, h_in, stage_bytes);
            if (!w.live) continue;
            const int vb = lt & 1, yu = lt >> 1;
            const float* v = vbuf + vb * STREAM_MAX_RANK;
            T* ynew = reinterpret_cast<T*>(ys + vb * y_bytes);  // the old y, then the new
            if (ct == 0 && lt == 0) STREAM_TRACE(0);
            mbar_wait(xfull, (u32)(lt & 1));
            if (ct == 0) STREAM_TRACE(1);
            // After the shrink: x is free again; this block's part of v goes into every
            // block's copy, then it arrives on their barriers and waits for theirs.
            auto share_v = [&]() {
                consumers_sync();
                if (ct == 0) STREAM_TRACE(60);
                if (ct == 0) mbar_arrive(xempty);
                if (cw == 0) {
                    for (int i = lane; i < w.nr; i += 32) {
                        const int n = w.n0 + i;
                        float val = sacc[n];
                        sacc[n] = 0.0f;
                        if (SPREAD > 1 && w.ra <= STREAM_SPREAD_ROWS) {
#pragma unroll
                            for (int c = 1; c < SPREAD; ++c) {
                                val += sacc[c * STREAM_SPREAD_ROWS + n];
                                sacc[c * STREAM_SPREAD_ROWS + n] = 0.0f;
                            }
                        }
                        vbuf[vb * STREAM_MAX_RANK + n] = val;
                        // The other blocks' copies by asynchronous stores that complete on
                        // their barrier: no cluster-scope fence, which would wait for this
                        // block's bulk copies in flight (the B stages, microseconds).
                        const u32 dst = smem_u32(vbuf + vb * STREAM_MAX_RANK + n);
                        for (int b = 1; b < C; ++b) {
                            const u32 peer = (u32)((j + b) % C);
                            st_async_f32(cluster_map(dst, peer), val,
                                         cluster_map(vfull0 + 8 * vb, peer));
                        }
                    }
                    __syncwarp();
                    // Its own part written, this block expects the others' bytes.
                    if (lane == 0) {
                        if (C == 1) {
                            mbar_arrive(vfull0 + 8 * vb);
                        } else {
                            mbar_expect_tx(vfull0 + 8 * vb, (u32)(4 * (w.ra - w.nr)));
                        }
                    }
                }
                // At CTA scope: the other blocks' parts came by asynchronous stores that
                // completed on this block's barrier (a cluster-scope acquire would wait for the
                // block's copies in flight, microseconds).
                mbar_wait(vfull0 + 8 * vb, (u32)(yu & 1));
                if (ct == 0) STREAM_TRACE(62);
            };
            bool expanding = false;
            int vpart = -1;  // the part whose v fragments vh, vl hold (MMA)
            stream_pieces(
                w, nvec,
                [&](int first, int count, int v0, int v1) {
                    // Shrink: this block's rank rows of v, whole. A row belongs to one warp
                    // (rank row mod STREAM_CONSUMERS, the same for each piece of a row cut in
                    // pieces), which sums it alone: no atomics, and warps work on different
                    // stages at once. Every warp waits for the stage before it releases it.
                    mbar_wait(full0 + 8 * at.s, at.phase);
                    if (ct == 0) STREAM_TRACE(2 + min(nw_++, 55));
                    const uint4* st = reinterpret_cast<const uint4*>(ring + at.s * stage_bytes);
                    const int len = v1 - v0;
                    if constexpr (MMA) {
                        // On tensor cores, every warp on every stage: a unit is a pair of rank
                        // rows (the second zero past the piece's end) over UV vectors, unit u
                        // of the block's A pieces warp u mod STREAM_CONSUMERS's; the units of
                        // a row add into its sum in shared memory (atomicAdd, a compare-and-swap
                        // loop on sm_90: eight units a 4096-wide row collide; the probe has
                        // wider units, `probe_lora_stream_mma_u*`, and the sums in SPREAD
                        // copies, `probe_lora_stream_mma_s4_*`). m16n8k16 with the pair as
                        // rows g and g + 8 of the A operand and x as the B operand: lane (g, q)
                        // loads vector i of both rows and of x, so column g of the accumulator
                        // sums lane group g's products (the diagonal: lane q = g / 2, element
                        // g & 1).
                        const int g = lane >> 2, e = g & 1;
                        const bool diag = (lane & 3) == (g >> 1);
                        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
                        constexpr int UV_LG = UV == 64 ? 6 : UV == 128 ? 7 : 8;
                        static_assert(UV == 1 << UV_LG, "units of 64, 128 or 256 vectors");
                        const int nch = (len + UV - 1) >> UV_LG, units = ((count + 1) >> 1) * nch;
                        for (int u = (cw - units_done) & (STREAM_CONSUMERS - 1); u < units && MATH;
                             u += STREAM_CONSUMERS) {
                            const int q = u / nch, i0 = (u - q * nch) * UV + lane;
                            const uint4* r1 = st + 2 * q * len;
                            const bool two = 2 * q + 1 < count;
                            float d[4][4] = {};  // independent accumulators: short mma chains
#pragma unroll
                            for (int k = 0; k < UV / 32; ++k) {
                                const int i = i0 + 32 * k;
                                const bool ok = i < len;
                                const uint4 a = ok ? r1[i] : zero;
                                const uint4 c = ok && two ? r1[len + i] : zero;
                                const uint4 xx = ok ? xv[v0 + i] : zero;
                                mma16816<T>(d[2 * (k & 1)], a.x, c.x, a.y, c.y, xx.x, xx.y);
                                mma16816<T>(d[2 * (k & 1) + 1], a.z, c.z, a.w, c.w, xx.z, xx.w);
                            }
                            float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
                            for (int k = 0; k < 4; ++k) {
                                s1 += e ? d[k][1] : d[k][0];
                                s2 += e ? d[k][3] : d[k][2];
                            }
                            s1 = warp_sum(diag ? s1 : 0.0f);
                            s2 = warp_sum(diag ? s2 : 0.0f);
                            if (lane == 0) {
                                // SPREAD: the units of a row add into SPREAD copies of its sum
                                // in turn (fewer collide), summed in share_v.
                                float* row = sacc + w.n0 + first + 2 * q;
                                if (SPREAD > 1 && w.ra <= STREAM_SPREAD_ROWS)
                                    row += ((u - q * nch) % SPREAD) * STREAM_SPREAD_ROWS;
                                atomicAdd(row, s1);
                                if (two) atomicAdd(row + 1, s2);
                            }
                        }
                        units_done += units;
                    } else {
                        for (int r = (cw - first) & (STREAM_CONSUMERS - 1); r < count && MATH;
                             r += STREAM_CONSUMERS) {
                            const uint4* ar = st + r * len;
                            // x . one vector of A (vector i of the piece).
                            auto xdot = [&](uint4 a, int i) { return dot8<T>(a, xv[v0 + i]); };
                            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
                            int i = lane;
                            for (; i + 96 < len; i += 128) {
                                const uint4 a0 = ar[i], a1 = ar[i + 32], a2 = ar[i + 64],
                                            a3 = ar[i + 96];
                                s0 += xdot(a0, i);
                                s1 += xdot(a1, i + 32);
                                s2 += xdot(a2, i + 64);
                                s3 += xdot(a3, i + 96);
                            }
                            for (; i < len; i += 32) s0 += xdot(ar[i], i);
                            const float sum = warp_sum((s0 + s1) + (s2 + s3));
                            if (lane == 0) sacc[w.n0 + first + r] += sum;
                        }
                    }
                    __syncwarp();
                    if (lane == 0) mbar_arrive(empty0 + 8 * at.s);
                    at.next(stages);
                },
                [&](int p, int first, int count) {
                    if (!expanding) {
                        expanding = true;
                        share_v();
                        mbar_wait(yfull0 + 8 * vb, (u32)(yu & 1));
                    }
                    // Expand into the block's copy of the old y: a column's rank / 8 vectors
                    // (a power of two) to as many lanes.
                    mbar_wait(full0 + 8 * at.s, at.phase);
                    if (ct == 0) STREAM_TRACE(2 + min(nw_++, 55));
                    const uint4* st = reinterpret_cast<const uint4*>(ring + at.s * stage_bytes);
                    const float* vp = v + w.voff[p];
                    T* yb = ynew + w.yo[p] + first;
                    const int lg = __ffs(w.rank[p] >> 3) - 1;
                    if (MMA && (lg == 2 || lg == 3)) {
                        // Groups of 16 columns to warps in turn across the part's stages.
                        const int gw = (cw - (first >> 4)) & (STREAM_CONSUMERS - 1);
                        if (p != vpart) {
                            vpart = p;
                            if (lg == 2) {
                                stream_vfrag<T, 1>(vp, lane, vh, vl);
                            } else {
                                stream_vfrag<T, 2>(vp, lane, vh, vl);
                            }
                        }
                        if (lg == 2) {
                            stream_expand_stage_mma<T, 1, MATH>(st, count, vh, vl, yb, gw, lane);
                        } else {
                            stream_expand_stage_mma<T, 2, MATH>(st, count, vh, vl, yb, gw, lane);
                        }
                    } else {
                        switch (lg) {
                            case 0: stream_expand_stage<T, 0, MATH>(st, count, vp, yb, cw, lane); break;
                            case 1: stream_expand_stage<T, 1, MATH>(st, count, vp, yb, cw, lane); break;
                            case 2: stream_expand_stage<T, 2, MATH>(st, count, vp, yb, cw, lane); break;
                            case 3: stream_expand_stage<T, 3, MATH>(st, count, vp, yb, cw, lane); break;
                            default: stream_expand_stage<T, 4, MATH>(st, count, vp, yb, cw, lane);
                        }
                    }
                    __syncwarp();
                    if (lane == 0) mbar_arrive(empty0 + 8 * at.s);
                    at.next(stages);
                });
            if (!expanding) {
                share_v();  // a share without B columns
            } else {
                // The share's new y to memory in 16-byte vectors, once every warp has added
                // its columns.
                consumers_sync();
                if (ct == 0) STREAM_TRACE(61);
#pragma unroll
                for (int p = 0; p < MAX_PARTS; ++p) {
                    const uint4* src = reinterpret_cast<const uint4*>(ynew + w.yo[p]);
                    uint4* dst = reinterpret_cast<uint4*>(y + (size_t)w.row * y_stride +
                                                          col_offset + start[p] + w.c0[p]);
                    for (int i = ct; i < (w.nc[p] >> 3); i += STREAM_CONSUMERS * 32) dst[i] = src[i];
                }
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(yempty0 + 8 * vb);
            if (ct == 0) STREAM_TRACE(63);
            ++lt;
        }
    }
    if (threadIdx.x == 32) {
        STREAM_TRACE(125);
        STREAM_TRACE_GT(127);
    }
    // No block leaves while another may still write into its shared memory.
    __syncwarp();
    cluster_ready();
    if (C > 1) cluster_sync_all();
}

// C: blocks a cluster (a row's blocks), fixed at compile time. The `_mma` twin shrinks and
// expands on tensor cores (the MMA option; see cuda/plan.rs `stream_plan`).
#define DEFINE_LORA_STREAM_X(TNAME, TYPE, C, XNAME, MMA)                                       \
    extern "C" __global__ void __cluster_dims__(C, 1, 1)                                      \
        __launch_bounds__((STREAM_CONSUMERS + 1) * 32, 1)                                     \
            sgmv_lora_stream##XNAME##_##TNAME##_c##C(                                         \
                const TYPE* __restrict__ x, int h_in, TYPE* __restrict__ y, int y_stride,     \
                int col_offset, int end0, int end1, int end2,                                 \
                const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,            \
                const u32* __restrict__ segs, int num_tiles, int stages, int stage_bytes,     \
                int y_cap) {                                                                  \
        sgmv_lora_stream_impl<TYPE, C, true, MMA>(x, h_in, y, y_stride, col_offset, end0,     \
                                                 end1, end2, table, tiles, segs, num_tiles,   \
                                                 stages, stage_bytes, y_cap);                 \
    }

#define DEFINE_LORA_STREAM(TNAME, TYPE, C)                                                    \
    DEFINE_LORA_STREAM_X(TNAME, TYPE, C, , false)                                             \
    DEFINE_LORA_STREAM_X(TNAME, TYPE, C, _mma, true)

DEFINE_LORA_STREAM(bf16, bf16, 1)
DEFINE_LORA_STREAM(bf16, bf16, 2)
DEFINE_LORA_STREAM(bf16, bf16, 3)
DEFINE_LORA_STREAM(bf16, bf16, 4)
DEFINE_LORA_STREAM(f16, f16, 1)
DEFINE_LORA_STREAM(f16, f16, 2)
DEFINE_LORA_STREAM(f16, f16, 3)
DEFINE_LORA_STREAM(f16, f16, 4)

#endif  // __CUDA_ARCH__ >= 900
