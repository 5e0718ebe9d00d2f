# Does the KV cache layout matter for decode attention's reads? On a CUDA machine with torch and
# triton: read every (block, head) tile of 16 positions x 128 dims (bf16) of a paged cache,
# blocks in a random order (as block tables are), with the token-major layout
# [blocks, 16, heads, 128] (punica's: 256-byte pieces 8 KB apart) or the head-major one
# [blocks, heads, 16, 128] (4 KB contiguous), and report the time and GB/s of one launch.
# Usage: python3 bench/scripts/kv_layout_read.py
import torch
import triton
import triton.language as tl


@triton.jit
def rd(x, order, out, s_blk, s_tok, s_head, H: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.load(order + pid // H)
    h = pid % H
    t = tl.arange(0, 16)[:, None]
    d = tl.arange(0, 128)[None, :]
    v = tl.load(x + b * s_blk + h * s_head + t * s_tok + d)
    tl.store(out + pid, tl.sum(tl.sum(v.to(tl.float32), 1), 0))


H = 32
# 96, 32 and 768 tokens a sequence, 32 sequences, K and V.
for nblk in [6 * 32 * 2, 2 * 32 * 2, 48 * 32 * 2]:
    x = torch.randn(nblk, 16, H, 128, device="cuda", dtype=torch.bfloat16)
    order = torch.randperm(nblk, device="cuda", dtype=torch.int32)
    out = torch.empty(nblk * H, device="cuda")
    for name, strides in [
        ("token-major", (16 * H * 128, H * 128, 128)),
        ("head-major", (16 * H * 128, 128, 16 * 128)),
    ]:
        def f():
            rd[(nblk * H,)](x, order, out, strides[0], strides[1], strides[2], H=H)

        ms = triton.testing.do_bench(f, warmup=50, rep=300)
        gb = x.numel() * 2 / 1e9
        print(f"{nblk} blocks ({gb*1e3:.0f} MB) {name}: {ms*1e3:.1f} us, {gb/ms*1e3:.0f} GB/s")
