// Probe: SGMV shrink and expand for segments of one row, fed by bulk copies (TMA, 1-D) into a
// ring of shared-memory stages, persistent blocks. Compiled after kernels/common.cuh and
// kernels/sgmv.cu (for LoraSlot, tile_seg, dot8, load_v8_l1).

// smem_u32, mbar_*, bulk_g2s, fence_barrier_init: kernels/sgmv.cu (the streamed LoRA kernel).

#define SS_WARPS 4
#define SS_MAXU 32     // units a block may own (the host sizes the grid so)
#define SS_UNITS 1024  // unit list offset in shared memory
#define SS_HDR 4608    // barriers (up to 16), reduction scratch (2 x 64 floats), unit list
#define YU 8
#define YB 2048
#define ES_K 8         // column steps of a warp per expand unit (the host sizes units to fit)

// --- shrink: unit = (tile, chunk of `ch` rank rows of the stacked A) ---
struct SUnit {
    const u16* a;
    int row0, nrows, r0, nr;
};

__device__ __forceinline__ SUnit s_unit(const LoraSlot* table, const u32* tiles, const u32* segs,
                                        int u, int nchunks, int ch, int h_in) {
    SUnit su;
    const int t = u / nchunks, c = u % nchunks;
    const TileSeg ts = tile_seg(tiles, segs, t);
    su.row0 = ts.row0;
    su.nrows = min(16, ts.end - ts.row0);
    su.r0 = c * ch;
    su.a = nullptr;
    su.nr = 0;
    if (su.nrows > 0) {
        const LoraSlot* s = table + ts.slot;
        const int rank = (int)s->rank;
        if (s->a != nullptr && su.r0 < rank) {
            su.nr = min(ch, rank - su.r0);
            su.a = reinterpret_cast<const u16*>(s->a) + (size_t)su.r0 * h_in;
        }
    }
    return su;
}

// Warp 0 gathers the block's units (u = blockIdx.x + k * gridDim.x), each lane one, all
// metadata loads in flight at once, and keeps the non-empty ones in order. Returns the count.
template <typename U, typename F>
__device__ __forceinline__ int gather_units(U* list, int* count, int nunits, F make) {
    if (threadIdx.x < 32) {
        const int u = blockIdx.x + threadIdx.x * gridDim.x;
        U e;
        bool live = false;
        if (u < nunits) {
            e = make(u);
            live = e.live();
        }
        const u32 m = __ballot_sync(0xffffffffu, live);
        if (live) list[__popc(m & ((1u << threadIdx.x) - 1u))] = e;
        if (threadIdx.x == 0) *count = __popc(m);
    }
    __syncthreads();
    return *count;
}

struct SUnitL : SUnit {
    __device__ bool live() const { return nr > 0; }
};

template <typename T>
__device__ __forceinline__ void sgmv_shrink_stream_impl(
    const T* __restrict__ x, int h_in, float* __restrict__ v, int v_stride,
    const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,
    const u32* __restrict__ segs, int num_tiles, int nchunks, int ch, int stages,
    int stage_bytes) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 bar0 = smem_u32(smem);
    float* red = reinterpret_cast<float*>(smem + 128);  // [2][64]
    int* count = reinterpret_cast<int*>(smem + 640);
    SUnitL* list = reinterpret_cast<SUnitL*>(smem + SS_UNITS);
    unsigned char* buf = smem + SS_HDR;
    const u32 buf0 = smem_u32(buf);
    const size_t row_bytes = (size_t)h_in * 2;
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) mbar_init(bar0 + 8 * s, 1);
        fence_barrier_init();
    }
    for (int i = threadIdx.x; i < 128; i += blockDim.x) red[i] = 0.0f;
    const int n = gather_units(list, count, num_tiles * nchunks, [&](int u) {
        SUnitL e;
        static_cast<SUnit&>(e) = s_unit(table, tiles, segs, u, nchunks, ch, h_in);
        return e;
    });
    if (threadIdx.x == 0) {
        for (int j = 0; j < stages && j < n; ++j) {
            const u32 bytes = (u32)(list[j].nr * row_bytes);
            mbar_expect_tx(bar0 + 8 * j, bytes);
            bulk_g2s(buf0 + j * stage_bytes, list[j].a, bytes, bar0 + 8 * j);
        }
    }
    pdl_enter();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nvec = h_in >> 3;
    uint4* xs = reinterpret_cast<uint4*>(buf + (size_t)stages * stage_bytes);
    int xrow = -1;
    for (int j = 0; j < n; ++j) {
        const int s = j % stages;
        const SUnit su = list[j];
        float* rj = red + 64 * (j & 1);
        for (int r = 0; r < su.nrows; ++r) {
            if (xrow != su.row0 + r) {
                // The row's x into shared memory: every load in flight at once.
                if (xrow >= 0) __syncthreads();
                xrow = su.row0 + r;
                const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)xrow * h_in);
                for (int i0 = threadIdx.x; i0 < nvec; i0 += 4 * SS_WARPS * 32) {
                    uint4 t[4];
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const int i = i0 + q * SS_WARPS * 32;
                        if (i < nvec) t[q] = __ldg(xr + i);
                    }
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const int i = i0 + q * SS_WARPS * 32;
                        if (i < nvec) xs[i] = t[q];
                    }
                }
                __syncthreads();
            }
            mbar_wait(bar0 + 8 * s, (u32)((j / stages) & 1));
            const uint4* st = reinterpret_cast<const uint4*>(buf + (size_t)s * stage_bytes);
            if (su.nr >= SS_WARPS) {
                for (int k = warp; k < su.nr; k += SS_WARPS) {
                    float sum = 0.0f;
#pragma unroll 4
                    for (int i = lane; i < nvec; i += 32) sum += dot8<T>(st[k * nvec + i], xs[i]);
                    sum = warp_sum(sum);
                    if (lane == 0) atomicAdd(&rj[k], sum);
                }
            } else {
                const int parts = SS_WARPS / su.nr;
                if (warp < su.nr * parts) {
                    const int k = warp % su.nr, p = warp / su.nr;
                    const int i0 = p * nvec / parts, i1 = (p + 1) * nvec / parts;
                    float sum = 0.0f;
#pragma unroll 4
                    for (int i = i0 + lane; i < i1; i += 32) sum += dot8<T>(st[k * nvec + i], xs[i]);
                    sum = warp_sum(sum);
                    if (lane == 0) atomicAdd(&rj[k], sum);
                }
            }
            __syncthreads();
            if (r + 1 == su.nrows && threadIdx.x == 0 && j + stages < n) {
                const SUnit& sp = list[j + stages];
                const u32 bytes = (u32)(sp.nr * row_bytes);
                mbar_expect_tx(bar0 + 8 * s, bytes);
                bulk_g2s(buf0 + s * stage_bytes, sp.a, bytes, bar0 + 8 * s);
            }
            if (threadIdx.x < su.nr) {
                v[(size_t)(su.row0 + r) * v_stride + su.r0 + threadIdx.x] = rj[threadIdx.x];
                rj[threadIdx.x] = 0.0f;
            }
            if (su.nrows > 1) __syncthreads();
        }
    }
}

// --- expand: unit = (tile, chunk of `cc` output columns of the group) ---
struct EUnit {
    const u16* b[3];
    int row0, nrows, c0, c1;
    int pr[3], ps[3], pe[3], po[3], pv[3];  // per part: rank (0: none), columns, piece, v offset
    u32 bytes;
    __device__ bool live() const { return bytes > 0; }
};

__device__ __forceinline__ EUnit e_unit(const LoraSlot* table, const u32* tiles, const u32* segs,
                                        int u, int nchunks, int cc, int end0, int end1,
                                        int end2) {
    EUnit eu;
    const int t = u / nchunks, c = u % nchunks;
    const TileSeg ts = tile_seg(tiles, segs, t);
    eu.row0 = ts.row0;
    eu.nrows = min(16, ts.end - ts.row0);
    const int c0 = c * cc, c1 = min(end2, c0 + cc);
    eu.c0 = c0;
    eu.c1 = c1;
    eu.bytes = 0;
    const LoraSlot* s = table + ts.slot;
    int start = 0;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
        const int end = j == 0 ? end0 : (j == 1 ? end1 : end2);
        const int a = max(c0, start), b = min(c1, end);
        const u16* bj = eu.nrows > 0 ? reinterpret_cast<const u16*>(s->b[j]) : nullptr;
        const bool live = a < b && bj != nullptr;
        const int r = live ? (int)s->prank[j] : 0;
        eu.pr[j] = r;
        eu.ps[j] = a;
        eu.pe[j] = live ? b : a;
        eu.po[j] = (int)eu.bytes;
        eu.pv[j] = live ? (int)s->voff[j] : 0;
        eu.b[j] = live ? bj + (size_t)(a - start) * r : nullptr;
        if (live) eu.bytes += (u32)((b - a) * r * 2);
        start = end;
    }
    return eu;
}

__device__ __forceinline__ void e_issue(const EUnit& eu, u32 dst, u32 bar) {
    mbar_expect_tx(bar, eu.bytes);
#pragma unroll
    for (int j = 0; j < 3; ++j) {
        if (eu.pr[j] > 0)
            bulk_g2s(dst + eu.po[j], eu.b[j], (u32)((eu.pe[j] - eu.ps[j]) * eu.pr[j] * 2), bar);
    }
}

template <typename T, typename VT, int RL>
__device__ __forceinline__ void sgmv_expand_stream_impl(
    const VT* __restrict__ v, int v_stride, T* __restrict__ y, int y_stride, int col_offset,
    int end0, int end1, int end2, const LoraSlot* __restrict__ table,
    const u32* __restrict__ tiles, const u32* __restrict__ segs, int num_tiles, int cc,
    int stages, int stage_bytes, int flags) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 bar0 = smem_u32(smem);
    int* count = reinterpret_cast<int*>(smem + 640);
    EUnit* list = reinterpret_cast<EUnit*>(smem + SS_UNITS);
    unsigned char* buf = smem + SS_HDR;
    const u32 buf0 = smem_u32(buf);
    const int nchunks = (end2 + cc - 1) / cc;
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) mbar_init(bar0 + 8 * s, 1);
        fence_barrier_init();
    }
    const int n = gather_units(list, count, num_tiles * nchunks, [&](int u) {
        return e_unit(table, tiles, segs, u, nchunks, cc, end0, end1, end2);
    });
    if (threadIdx.x == 0) {
        for (int j = 0; j < stages && j < n; ++j) e_issue(list[j], buf0 + j * stage_bytes, bar0 + 8 * j);
    }
    pdl_enter();
    // flags & 8: the old y of the block's first YU units (one row each) in one round of bulk
    // copies, at YB bytes a unit past the stages.
    const u32 ybar = bar0 + 8 * 15;
    const u32 ysm = buf0 + (u32)(stages * stage_bytes);
    const bool ytma = (flags & 8) != 0;
    if (ytma && threadIdx.x == 0) {
        mbar_init(ybar, 1);
        fence_barrier_init();
        u32 total = 0;
        for (int j = 0; j < n && j < YU; ++j) total += (u32)((list[j].c1 - list[j].c0) * 2);
        mbar_expect_tx(ybar, total);
        for (int j = 0; j < n && j < YU; ++j) {
            const EUnit& e = list[j];
            bulk_g2s(ysm + j * YB, y + (size_t)e.row0 * y_stride + col_offset + e.c0,
                     (u32)((e.c1 - e.c0) * 2), ybar);
        }
    }
    constexpr int CPS = 32 / RL;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % RL, cg = lane / RL, kk = sub * 8;
    constexpr int VN = VVec<VT>::n;
    const bool vvec = (v_stride & (VN - 1)) == 0;
    const int nw = blockDim.x >> 5;
    for (int j = 0; j < n; ++j) {
        const int s = j % stages;
        if (flags & 1) {
            mbar_wait(bar0 + 8 * s, (u32)((j / stages) & 1));
            __syncthreads();
            if (threadIdx.x == 0 && j + stages < n)
                e_issue(list[j + stages], buf0 + s * stage_bytes, bar0 + 8 * s);
            continue;
        }
        const EUnit eu = list[j];  // in registers
        const int c0 = eu.c0, c1 = eu.c1;
        const u32 st = buf0 + (u32)(s * stage_bytes);
        const int nk = (c1 - c0 + nw * CPS - 1) / (nw * CPS);
        for (int r = 0; r < eu.nrows; ++r) {
            const VT* vr = v + (size_t)(eu.row0 + r) * v_stride;
            T* yr = y + (size_t)(eu.row0 + r) * y_stride + col_offset;
            float w[3][8];
#pragma unroll
            for (int q = 0; q < 3; ++q) {
                if (kk < eu.pr[q] && !(flags & 4)) {
                    load_v8_l1(vr + eu.pv[q], kk, eu.pr[q], vvec && (eu.pv[q] & (VN - 1)) == 0, w[q]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) w[q][e] = 0.0f;
                }
            }
            // Per step: the column, its part's rank (0: not written), piece offset.
            float yv[ES_K], part[ES_K];
            int rk[ES_K];
            u32 addr[ES_K];
#pragma unroll
            for (int k = 0; k < ES_K; ++k) {
                const int col = c0 + (k * nw + warp) * CPS + cg;
                const int q = (col >= eu.pe[0]) + (col >= eu.pe[1]);
                const int rank = q == 0 ? eu.pr[0] : (q == 1 ? eu.pr[1] : eu.pr[2]);
                const int pe_q = q == 0 ? eu.pe[0] : (q == 1 ? eu.pe[1] : eu.pe[2]);
                const int ps_q = q == 0 ? eu.ps[0] : (q == 1 ? eu.ps[1] : eu.ps[2]);
                const int po_q = q == 0 ? eu.po[0] : (q == 1 ? eu.po[1] : eu.po[2]);
                const bool live = k < nk && col < c1 && col < pe_q && rank > 0;
                rk[k] = live ? (q + 1) : 0;
                addr[k] = st + (u32)(po_q + ((col - ps_q) * rank + kk) * 2);
                rk[k] = (live && kk < rank) ? rk[k] : -rk[k];
                if (ytma && j < YU && eu.nrows == 1) {
                    yv[k] = 0.0f;  // read from shared memory below
                } else {
                    yv[k] = (live && sub == 0 && !(flags & 2)) ? to_f32(yr[col]) : 0.0f;
                }
            }
            if (r == 0) mbar_wait(bar0 + 8 * s, (u32)((j / stages) & 1));
            if (ytma && j < YU && eu.nrows == 1) {
                if (j == 0) mbar_wait(ybar, 0u);
#pragma unroll
                for (int k = 0; k < ES_K; ++k) {
                    const int col = c0 + (k * nw + warp) * CPS + cg;
                    if (sub == 0 && rk[k] != 0) {
                        u16 h;
                        asm volatile("ld.shared.u16 %0, [%1];" : "=h"(h) : "r"(ysm + j * YB + (u32)(col - c0) * 2));
                        T t;
                        t.bits = h;
                        yv[k] = to_f32(t);
                    }
                }
            }
#pragma unroll
            for (int k = 0; k < ES_K; ++k) {
                uint4 b = make_uint4(0u, 0u, 0u, 0u);
                if (rk[k] > 0)
                    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                                 : "=r"(b.x), "=r"(b.y), "=r"(b.z), "=r"(b.w)
                                 : "r"(addr[k]));
                const int q = rk[k] - 1;
                part[k] = q <= 0 ? dot8f<T>(w[0], b) : (q == 1 ? dot8f<T>(w[1], b) : dot8f<T>(w[2], b));
            }
#pragma unroll
            for (int k = 0; k < ES_K; ++k) {
#pragma unroll
                for (int o = RL / 2; o > 0; o >>= 1)
                    part[k] += __shfl_xor_sync(0xffffffffu, part[k], o);
            }
#pragma unroll
            for (int k = 0; k < ES_K; ++k) {
                const int col = c0 + (k * nw + warp) * CPS + cg;
                if (sub == 0 && rk[k] != 0) {
                    if (!(flags & 2)) yr[col] = from_f32<T>(yv[k] + part[k]);
                    else if (part[k] == 12345.0f) yr[0] = from_f32<T>(part[k]);
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0 && j + stages < n)
            e_issue(list[j + stages], buf0 + s * stage_bytes, bar0 + 8 * s);
    }
}

extern "C" __global__ void __launch_bounds__(SS_WARPS * 32)
    sgmv_shrink_stream_bf16(const bf16* __restrict__ x, int h_in, float* __restrict__ v,
                            int v_stride, const LoraSlot* __restrict__ table,
                            const u32* __restrict__ tiles, const u32* __restrict__ segs,
                            int num_tiles, int nchunks, int ch, int stages, int stage_bytes) {
    sgmv_shrink_stream_impl<bf16>(x, h_in, v, v_stride, table, tiles, segs, num_tiles, nchunks,
                                  ch, stages, stage_bytes);
}

#define DEFINE_EXPAND_STREAM(VNAME, VTYPE, RL)                                                \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        sgmv_expand_stream_bf16##VNAME##_l##RL(                                               \
            const VTYPE* __restrict__ v, int v_stride, bf16* __restrict__ y, int y_stride,    \
            int col_offset, int end0, int end1, int end2, const LoraSlot* __restrict__ table, \
            const u32* __restrict__ tiles, const u32* __restrict__ segs, int num_tiles,       \
            int cc, int stages, int stage_bytes, int flags) {                                 \
        sgmv_expand_stream_impl<bf16, VTYPE, RL>(v, v_stride, y, y_stride, col_offset, end0,  \
                                                 end1, end2, table, tiles, segs, num_tiles,   \
                                                 cc, stages, stage_bytes, flags);             \
    }
DEFINE_EXPAND_STREAM(, float, 2)
DEFINE_EXPAND_STREAM(, float, 8)
DEFINE_EXPAND_STREAM(_vh, bf16, 2)
DEFINE_EXPAND_STREAM(_vh, bf16, 8)

// Read probe: every block copies `per_block` bytes from src + blockIdx.x * per_block into shared
// memory in pieces of `piece` bytes, all issued at once (mode 0: bulk copies, one mbarrier), or
// reads them with 16-byte loads (mode 1), and adds one word so nothing is dead.
extern "C" __global__ void __launch_bounds__(128)
    read_probe(const uint4* __restrict__ src, int per_block, int piece, int mode, float* out) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 bar = smem_u32(smem);
    unsigned char* buf = smem + 1024;
    const unsigned char* base = reinterpret_cast<const unsigned char*>(src) + (size_t)blockIdx.x * per_block;
    float acc = 0.0f;
    if (mode == 0) {
        if (threadIdx.x == 0) {
            mbar_init(bar, 1);
            fence_barrier_init();
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            mbar_expect_tx(bar, (u32)per_block);
            for (int off = 0; off < per_block; off += piece)
                bulk_g2s(smem_u32(buf + off), base + off, (u32)piece, bar);
        }
        pdl_enter();
        mbar_wait(bar, 0);
        acc = reinterpret_cast<const float*>(buf)[threadIdx.x];
    } else if (mode == 2) {
        // bulk copies issued by 32 lanes of warp 0 (one piece each at a time)
        if (threadIdx.x == 0) {
            mbar_init(bar, 1);
            fence_barrier_init();
        }
        __syncthreads();
        if (threadIdx.x == 0) mbar_expect_tx(bar, (u32)per_block);
        __syncwarp();
        if (threadIdx.x < 32)
            for (int off = threadIdx.x * piece; off < per_block; off += 32 * piece)
                bulk_g2s(smem_u32(buf + off), base + off, (u32)piece, bar);
        pdl_enter();
        mbar_wait(bar, 0);
        acc = reinterpret_cast<const float*>(buf)[threadIdx.x];
    } else {
        pdl_enter();
        const uint4* p = reinterpret_cast<const uint4*>(base);
        const int n = per_block / 16;
        for (int i0 = threadIdx.x; i0 < n; i0 += 128 * 8) {
            uint4 t[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) t[q] = (i0 + q * 128 < n) ? __ldg(p + i0 + q * 128) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int q = 0; q < 8; ++q) acc += __uint_as_float(t[q].x);
        }
    }
    if (acc == 12345.0f) out[0] = acc;
}


// The row kernels of kernels/sgmv.cu instantiated with other constants (KU loads in flight a
// lane, NW warps a block, launch bounds MINB blocks an SM).
#define PROBE_EXPAND(VNAME, VTYPE, RL, KU, NW, MINB)                                            \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                \
        probe_expand_rows##VNAME##_l##RL##_k##KU##_w##NW##_b##MINB(                            \
            const VTYPE* __restrict__ v, int v_stride, bf16* __restrict__ y, int y_stride,     \
            int col_offset, int end0, int end1, int end2, const LoraSlot* __restrict__ table,  \
            const u32* __restrict__ tiles, const u32* __restrict__ segs) {                     \
        sgmv_expand_rows_impl<bf16, VTYPE, RL, KU, NW, false>(v, v_stride, y, y_stride, col_offset,   \
                                                       end0, end1, end2, table, tiles, segs);  \
    }
#define PROBE_EXPANDS(KU, NW, MINB)            \
    PROBE_EXPAND(_vh, bf16, 2, KU, NW, MINB)   \
    PROBE_EXPAND(, float, 2, KU, NW, MINB)     \
    PROBE_EXPAND(, float, 8, KU, NW, MINB)
PROBE_EXPANDS(4, 4, 6)
PROBE_EXPANDS(1, 8, 6)
PROBE_EXPANDS(1, 16, 4)
PROBE_EXPANDS(1, 16, 3)
PROBE_EXPANDS(2, 8, 6)
PROBE_EXPANDS(2, 4, 12)
PROBE_EXPANDS(2, 16, 3)
PROBE_EXPANDS(1, 32, 2)

// kernels/sgmv.cu's grid-stride row expand with other warps and launch bounds. (Session 14
// also measured it with the slot's parts held in registers, with v kept across column blocks,
// and a one-row variant with two column groups a lane: bench/results/sgmv-row-expand-gs-*-s14*
// and -after-gemm-*-s14g; their code is in git at 337245f.)
#define PROBE_EXPAND_GS(VNAME, VTYPE, RL, NW, MINB)                                             \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                \
        probe_expand_rows_gs##VNAME##_l##RL##_w##NW##_b##MINB(                                 \
            const VTYPE* __restrict__ v, int v_stride, bf16* __restrict__ y, int y_stride,     \
            int col_offset, int end0, int end1, int end2, const LoraSlot* __restrict__ table,  \
            const u32* __restrict__ tiles, const u32* __restrict__ segs, int ntiles, int ncb) { \
        sgmv_expand_rows_gs_impl<bf16, VTYPE, RL, NW>(v, v_stride, y, y_stride, col_offset,    \
                                                      end0, end1, end2, table, tiles, segs,    \
                                                      ntiles, ncb);                            \
    }
#define PROBE_EXPANDS_GS(NW, MINB)              \
    PROBE_EXPAND_GS(_vh, bf16, 2, NW, MINB)     \
    PROBE_EXPAND_GS(, float, 2, NW, MINB)       \
    PROBE_EXPAND_GS(, float, 8, NW, MINB)
PROBE_EXPANDS_GS(8, 4)
PROBE_EXPANDS_GS(4, 12)
PROBE_EXPANDS_GS(8, 8)
PROBE_EXPANDS_GS(16, 4)
PROBE_EXPANDS_GS(4, 16)

#define PROBE_SHRINK(KU, NW, MINB)                                                              \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                \
        probe_shrink_rows_k##KU##_w##NW##_b##MINB(                                             \
            const bf16* __restrict__ x, int h_in, float* __restrict__ v, int v_stride,         \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,                 \
            const u32* __restrict__ segs, int ksplit, int acc_rank, float* __restrict__ acc,   \
            u32* __restrict__ counters) {                                                      \
        sgmv_shrink_rows_impl<bf16, 1, KU, NW>(x, h_in, v, v_stride, table, tiles, segs,       \
                                               ksplit, acc_rank, acc, counters);               \
    }
PROBE_SHRINK(4, 4, 8)
PROBE_SHRINK(8, 4, 4)
PROBE_SHRINK(2, 4, 8)
PROBE_SHRINK(4, 8, 4)

// The streamed LoRA kernel of kernels/sgmv.cu (`sgmv_lora_stream_impl`) with other options:
// NAME, a cluster of C blocks a row, MINB blocks an SM, then the impl's options after C (MATH,
// MMA).
#define PROBE_STREAM(NAME, C, MINB, ...)                                                        \
    extern "C" __global__ void __cluster_dims__(C, 1, 1)                                        \
        __launch_bounds__((STREAM_CONSUMERS + 1) * 32, MINB) NAME(                              \
            const bf16* __restrict__ x, int h_in, bf16* __restrict__ y, int y_stride,           \
            int col_offset, int end0, int end1, int end2, const LoraSlot* __restrict__ table,   \
            const u32* __restrict__ tiles, const u32* __restrict__ segs, int num_tiles,         \
            int stages, int stage_bytes, int y_cap) {                                           \
        sgmv_lora_stream_impl<bf16, C, __VA_ARGS__>(x, h_in, y, y_stride, col_offset, end0,     \
                                                    end1, end2, table, tiles, segs, num_tiles,  \
                                                    stages, stage_bytes, y_cap);                \
    }

// Consumers doing no arithmetic (they wait for each stage and release it): the copies alone.
PROBE_STREAM(probe_lora_stream_nomath, 1, 1, false)
// Two blocks an SM (a smaller ring: the next kernel's blocks fit beside this one's and prefetch
// while it finishes).
PROBE_STREAM(probe_lora_stream_2bps, 1, 2, true)
PROBE_STREAM(probe_lora_stream_2bps_c2, 2, 2, true)
PROBE_STREAM(probe_lora_stream_2bps_c4, 4, 2, true)
PROBE_STREAM(probe_lora_stream_nomath_c2, 2, 1, false)
PROBE_STREAM(probe_lora_stream_nomath_c3, 3, 1, false)
PROBE_STREAM(probe_lora_stream_nomath_c4, 4, 1, false)
// The `_mma` kernel with shrink units of 128 or 256 vectors (fewer to a row, whose sums they add
// with compare-and-swap loops; session 18, not yet run).
PROBE_STREAM(probe_lora_stream_mma_u128_c1, 1, 1, true, true, 128)
PROBE_STREAM(probe_lora_stream_mma_u128_c2, 2, 1, true, true, 128)
PROBE_STREAM(probe_lora_stream_mma_u256_c1, 1, 1, true, true, 256)
PROBE_STREAM(probe_lora_stream_mma_u256_c2, 2, 1, true, true, 256)
// The first row's x asked for after 1 or 3 stages, or once the ring is full (0; production:
// STREAM_X_AFTER), session 19.
PROBE_STREAM(probe_lora_stream_xa0_c3, 3, 1, true, false, 64, 1, 0)
PROBE_STREAM(probe_lora_stream_xa1_c3, 3, 1, true, false, 64, 1, 1)
PROBE_STREAM(probe_lora_stream_xa3_c3, 3, 1, true, false, 64, 1, 3)
PROBE_STREAM(probe_lora_stream_mma_xa0_c2, 2, 1, true, true, 64, 1, 0)
PROBE_STREAM(probe_lora_stream_mma_xa1_c2, 2, 1, true, true, 64, 1, 1)
PROBE_STREAM(probe_lora_stream_mma_xa0_c1, 1, 1, true, true, 64, 1, 0)
PROBE_STREAM(probe_lora_stream_mma_xa1_c1, 1, 1, true, true, 64, 1, 1)
// The `_mma` kernel with units of 64 vectors adding into four copies of the row sums in turn.
PROBE_STREAM(probe_lora_stream_mma_s4_c1, 1, 1, true, true, 64, 4)
PROBE_STREAM(probe_lora_stream_mma_s4_c2, 2, 1, true, true, 64, 4)

// The long-segment expand of kernels/sgmv.cu (`sgmv_expand_long_impl`) with CH chunks of NTW * 8
// columns a block, DEPTH of them in registers at once and launch bounds of MINB blocks an SM.
#define PROBE_EXPAND_LONG(KT, CH, DEPTH, MINB, NTW)                                             \
    extern "C" __global__ void __launch_bounds__(EXPAND_WARPS * 32, MINB)                       \
        probe_expand_long_k##KT##_c##CH##_d##DEPTH##_b##MINB##_w##NTW(                          \
            const float* __restrict__ v, int v_stride, bf16* __restrict__ y, int y_stride,      \
            int col_offset, int part0, int end0, int end1, int end2,                            \
            const LoraSlot* __restrict__ table, const u32* __restrict__ tiles,                  \
            const u32* __restrict__ segs, int y_early, int num_tiles) {                         \
        sgmv_expand_long_impl<bf16, float, KT, CH, DEPTH, NTW>(                                 \
            v, v_stride, y, y_stride, col_offset, part0, end0, end1, end2, table, tiles, segs,  \
            y_early, num_tiles);                                                                \
    }
PROBE_EXPAND_LONG(2, 4, 4, 1, 4)
PROBE_EXPAND_LONG(2, 2, 2, 3, 4)
PROBE_EXPAND_LONG(2, 4, 2, 4, 2)
PROBE_EXPAND_LONG(2, 4, 2, 5, 2)
PROBE_EXPAND_LONG(2, 8, 2, 4, 2)
PROBE_EXPAND_LONG(1, 8, 8, 1, 4)
