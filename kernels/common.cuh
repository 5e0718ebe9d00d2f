// Shared device helpers. Header-free on purpose: NVRTC 13 ships no CUDA headers, so half types
// are carried as raw 16-bit patterns and converted with PTX instructions.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v.bits));
    return r;
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

// Two floats -> one packed pair of halves: `lo` in the low 16 bits (the lower element index).
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<bf16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<f16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Unpack element 0 (low) and 1 (high) of a packed pair.
__device__ __forceinline__ float lo_f32(bf16, u32 p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float hi_f32(bf16, u32 p) { return __uint_as_float(p & 0xffff0000u); }
__device__ __forceinline__ float lo_f32(f16, u32 p) { f16 h; h.bits = (u16)(p & 0xffffu); return to_f32(h); }
__device__ __forceinline__ float hi_f32(f16, u32 p) { f16 h; h.bits = (u16)(p >> 16); return to_f32(h); }

// Eight consecutive 16-bit elements starting at `p[k]`, zero past `len`, one at a time.
template <typename T>
__device__ __forceinline__ uint4 load8_scalar(const T* p, int k, int len) {
    u32 w[4];
    const u16* q = reinterpret_cast<const u16*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 lo = (k + 2 * i < len) ? (u32)q[k + 2 * i] : 0u;
        u32 hi = (k + 2 * i + 1 < len) ? (u32)q[k + 2 * i + 1] : 0u;
        w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Eight consecutive 16-bit elements starting at `p[k]`, zero past `len`. Uses one 16-byte load
// when the whole run is in bounds and `vec` (the caller checked 16-byte alignment of rows).
template <typename T>
__device__ __forceinline__ uint4 load8(const T* p, int k, int len, bool vec) {
    if (vec && k + 8 <= len) {
        return __ldg(reinterpret_cast<const uint4*>(p + k));
    }
    return load8_scalar(p, k, len);
}

// Same as load8 but through L2 only (data written earlier in this launch or by a kernel that may
// still be finishing under programmatic dependent launch).
template <typename T>
__device__ __forceinline__ uint4 load8_cg(const T* p, int k, int len, bool vec) {
    if (vec && k + 8 <= len) {
        return __ldcg(reinterpret_cast<const uint4*>(p + k));
    }
    return load8_scalar(p, k, len);
}

// D (16x8 f32) += A (16x16, row) * B (16x8, col), bf16 or f16 operands.
template <typename T>
__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1);
template <>
__device__ __forceinline__ void mma16816<bf16>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<f16>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90). Both are no-ops when the launch did not opt in.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Entry of every kernel the backend may launch with programmatic dependent launch: wait until
// the previous kernel on the stream has completed and its writes are visible, then let the next
// kernel launch (its blocks are scheduled while this one runs and park in their own wait).
//
// Why this is safe:
// - griddepcontrol.wait returns only once the primary grid has fully completed and flushed its
//   memory, whatever that grid is: one of ours, or a cuBLAS GEMM that never heard of PDL (it
//   then triggers implicitly as its blocks exit, and the wait still covers its completion).
// - Waiting before triggering makes the chain transitive: when a kernel starts, every kernel
//   before its immediate predecessor has completed, and after its wait all of them have. So a
//   kernel may read before its wait only data that its immediate predecessor does not write
//   (step metadata, adapter tables and weights copied from the host); it writes nothing before.
// - Every block waits before it can exit (no early return above the wait), so no grid completes
//   while its own predecessor is still running.
// - Only a kernel directly after another kernel in the same stream overlaps it: after a copy or
//   an event wait (the LoRA side stream's fork and join) the launch keeps the full dependency.
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_launch_dependents();
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; `scratch` holds at least 32 floats. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = (lane < nwarps) ? scratch[lane] : 0.0f;
    r = warp_sum(r);
    return r;
}

#define NEG_INF __int_as_float(0xff800000u)

// SiLU(g) * u, as the SwiGLU MLP applies it (ops.cu silu_mul, sgmv.cu's fused expand).
__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Eight halves of a 16-byte vector as floats, element order kept.
template <typename T>
__device__ __forceinline__ void unpack8(uint4 p, float* f) {
    const T d = T{};
    f[0] = lo_f32(d, p.x); f[1] = hi_f32(d, p.x);
    f[2] = lo_f32(d, p.y); f[3] = hi_f32(d, p.y);
    f[4] = lo_f32(d, p.z); f[5] = hi_f32(d, p.z);
    f[6] = lo_f32(d, p.w); f[7] = hi_f32(d, p.w);
}
