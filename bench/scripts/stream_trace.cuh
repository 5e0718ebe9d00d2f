// The streamed LoRA kernel's timeline hook (kernels/sgmv.cu, STREAM_TRACE), for the probe's
// `trace` mode: clock64 at each event into stream_trace[block][slot] while stream_trace_on.
// Slots: 0 consumers start, 1 x landed (per row: the last), 2..57 stage waits of consumer warp 0,
// 59 the block's threads past their first barrier,
// 60 shrink done (all warps), 62 v ready, 61 expand done, 63 row written, 64.. pieces issued,
// 124/125 clock64 and 126/127 globaltimer at the block's start and end.
__device__ unsigned long long stream_trace[264 * 128];
__device__ int stream_trace_on;
#define STREAM_TRACE(slot)                                                                      \
    do {                                                                                        \
        if (stream_trace_on) stream_trace[blockIdx.x * 128 + (slot)] = clock64();               \
    } while (0)
#define STREAM_TRACE_GT(slot)                                                                   \
    do {                                                                                        \
        if (stream_trace_on) {                                                                  \
            unsigned long long t_;                                                              \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                              \
            stream_trace[blockIdx.x * 128 + (slot)] = t_;                                       \
        }                                                                                       \
    } while (0)
