"""Decode GEMMs at 7B shapes, batch 32: cuBLAS's own choice against split-K done as a strided
batched GEMM (the partial sums left for the next kernel to add), each timed as 32 distinct
layers' weights replayed in a CUDA graph so no weight stays in L2."""
import torch

from graph_timing import timed

torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
dev = "cuda"
M, L = 32, 32
shapes = {"qkv": (4096, 12288), "o": (4096, 4096), "gate|up": (4096, 22016), "down": (11008, 4096),
          "expand gate|up K=512": (512, 22016), "expand qkv K=512": (512, 12288), "expand o K=512": (512, 4096)}




for name, (k, n) in shapes.items():
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
    out = torch.empty(M, n, device=dev, dtype=torch.bfloat16)

    def base():
        for w in ws:
            torch.mm(x, w.t(), out=out)

    t0 = timed(base, L)
    mb = n * k * 2 / 1e6
    line = f"{name:22s} K={k:5d} N={n:5d} {mb:6.1f} MB  cublas {t0:6.2f} us ({mb / t0:.2f} TB/s)"
    for s in (2, 3, 4, 8):
        if k % s:
            continue
        kk = k // s
        # weights as [s, n, kk] views: w[:, j*kk:(j+1)*kk]
        wv = [w.view(n, s, kk).permute(1, 0, 2) for w in ws]  # [s, n, kk], strides (kk, k, 1)
        xv = x.view(M, s, kk).permute(1, 0, 2)  # [s, M, kk]
        part = torch.empty(s, M, n, device=dev, dtype=torch.bfloat16)

        def split():
            for w in wv:
                torch.bmm(xv, w.transpose(1, 2), out=part)

        try:
            t = timed(split, L)
            line += f" | S={s} {t:6.2f}"
        except Exception as e:  # noqa: BLE001
            line += f" | S={s} err {type(e).__name__}"
    print(line, flush=True)

# which kernels cuBLAS runs for o and down
from torch.profiler import profile, ProfilerActivity
for name in ("o", "down", "qkv"):
    k, n = shapes[name]
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
    torch.mm(x, w.t())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        torch.mm(x, w.t())
        torch.cuda.synchronize()
    names = [e.name for e in p.events() if e.device_type.name == "CUDA"]
    print(name, names, flush=True)
