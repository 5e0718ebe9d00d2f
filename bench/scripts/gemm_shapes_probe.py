# Times the decode GEMMs of a 7B step at batch 32 (bf16, f32 accumulate) through torch's cuBLAS /
# cuBLASLt, with and without the LoRA arena's extra rows (32 slots x rank 16 a projection), each
# replayed from a CUDA graph over rotated weights (~1.5 GiB, so no weight stays in L2).
# Usage: python3 bench/scripts/gemm_shapes_probe.py   (on a CUDA machine with torch)
#        PYTORCH_TUNABLEOP_ENABLED=1 PYTORCH_TUNABLEOP_TUNING=1 python3 bench/scripts/gemm_shapes_probe.py
#        (the same with torch's GEMM autotuning, TunableOp: the warm-up calls before the graph
#        capture try the cuBLAS / cuBLASLt algorithms of each shape and keep the fastest; whether
#        another algorithm than cuBLAS's heuristic pick would run the arena GEMMs faster)
import torch

ROWS = 32
SHAPES = [  # name, n (base), k, arena rows
    ("q|k|v", 12288, 4096, 32 * 48),
    ("o", 4096, 4096, 32 * 16),
    ("gate|up", 22016, 4096, 32 * 32),
    ("down", 4096, 11008, 32 * 16),
]


def timed(n, k, reps=20):
    sets = max(2, int(1.5 * 2**30 // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    x = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(ROWS, n, device="cuda", dtype=torch.bfloat16)
    for w in ws:
        torch.matmul(x, w.t(), out=out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for w in ws:
                torch.matmul(x, w.t(), out=out)
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        t0.record()
        for _ in range(reps):
            g.replay()
        t1.record()
        torch.cuda.synchronize()
        best = min(best, t0.elapsed_time(t1) * 1000 / (reps * sets))
    del ws
    torch.cuda.empty_cache()
    return best


print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, rows {ROWS}")
print("| GEMM | n | k | us | TB/s | with arena: n | us | TB/s | extra us | extra bytes at the base rate us |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, n, k, extra in SHAPES:
    a = timed(n, k)
    b = timed(n + extra, k)
    ra, rb = n * k * 2 / a / 1e6, (n + extra) * k * 2 / b / 1e6
    print(f"| {name} | {n} | {k} | {a:.2f} | {ra:.2f} | {n + extra} | {b:.2f} | {rb:.2f} | {b - a:.2f} | {extra * k * 2 / ra / 1e6:.2f} |")
