"""The LoRA expand of a 7B decode layer as cuBLAS GEMMs: each group's arena GEMM (base weight
plus every placed adapter's A rows), then a masking copy of the intermediates into part-major
order and one strided-batched GEMM per group adding v . B into the output (beta = 1). 32
layers of distinct weights in one CUDA graph; the cost of the expand is the difference to the
arena GEMMs alone."""
import torch

from graph_timing import timed

dev, M, L, R = "cuda", 32, 32, 16
# group: (k, part widths)
groups = {"qkv": (4096, [4096, 4096, 4096]), "o": (4096, [4096]), "gate|up": (4096, [11008, 11008]),
          "down": (11008, [4096])}




for slots in (32, 1):
    total_base = total_new = 0.0
    for name, (k, parts) in groups.items():
        P, n = len(parts), sum(parts)
        arena = slots * P * R
        W = n + arena
        ws = [torch.randn(W, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)]
        bs = [torch.randn(P, parts[0], slots * R, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)]
        x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(M, W, device=dev, dtype=torch.bfloat16)
        vm = torch.empty(P, M, slots * R, device=dev, dtype=torch.bfloat16)
        # row i uses slot i % slots
        mask = torch.zeros(M, slots, device=dev, dtype=torch.bfloat16)
        mask[torch.arange(M), torch.arange(M) % slots] = 1
        v4 = out[:, n:].view(M, slots, P, R).permute(2, 0, 1, 3)
        vm4 = vm.view(P, M, slots, R)
        y = out[:, :n].view(M, P, parts[0]).permute(1, 0, 2)

        def base():
            for w in ws:
                torch.mm(x, w.t(), out=out)

        def new():
            for w, b in zip(ws, bs):
                torch.mm(x, w.t(), out=out)
                torch.mul(v4, mask[None, :, :, None], out=vm4)
                y.baddbmm_(vm, b.transpose(1, 2))

        tb, tn = timed(base, L), timed(new, L)
        total_base += tb
        total_new += tn
        mb = P * parts[0] * slots * R * 2 / 1e6
        print(f"slots {slots:2d} {name:8s} arena GEMM {tb:6.2f} us, + mask + batched expand {tn:6.2f} us: "
              f"expand {tn - tb:5.2f} us for {mb:5.1f} MB of B", flush=True)
    print(f"slots {slots:2d} per layer: expand {total_new - total_base:6.2f} us "
          f"= {(total_new - total_base) * L / 1000:.2f} ms a step", flush=True)

from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as p:
    torch.mul(v4, mask[None, :, :, None], out=vm4)
    y.baddbmm_(vm, bs[0].transpose(1, 2))
    torch.cuda.synchronize()
print([e.name[:80] for e in p.events() if e.device_type.name == "CUDA"])
