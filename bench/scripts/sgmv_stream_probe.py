# Probe of the SGMV kernels for segments of one row (distinct adapters), bf16, on a CUDA machine
# with torch: CUDA-graph replay over rotated inputs (~200 MiB), programmatic dependent launch as
# the backend launches them, every result checked against torch.
# - The row kernels of kernels/sgmv.cu against instances with other constants (loads in flight a
#   lane, warps a block, launch bounds: `probe_*_rows_*` in sgmv_stream_probe.cu), and the
#   grid-stride row expand with other shapes and grids (`probe_expand_rows_gs*`; session 14,
#   bench/results/sgmv-row-expand-gs-*-s14a/b.txt, where it was the `gsl` variant).
#   The expand-only cases chain expand after expand with PDL; in the engine a wide expand
#   follows its GEMM instead, which this chain does not model: the grid-stride expand's 1.2 and
#   2.2 us here came to 0.06 ms a step there (bench/results/profile-7b-h200-*-s14d*.txt).
# - With `stream`: shrink and expand fed by bulk copies (TMA) into shared-memory stages of
#   persistent blocks (`sgmv_*_stream_*`); flags 1 = no compute, 2 = y untouched, 4 = no v
#   loads, 8 = the old y by bulk copies too.
# - With `gemm`: the engine's order, each expand right after the GEMM that writes its y.
# - With `silu`: the gate|up GEMM, then its expand and SiLU-mul, or kernels/sgmv.cu's fused
#   `sgmv_expand_silu_rows_*` (session 15 measured the probe's own first version of it against
#   the two kernels: bench/results/sgmv-expand-silu-probe-h200-2026-11-30-s15.txt).
# - With `fused`, `fusedwhy`, `fusedgrid` (session 16): kernels/sgmv.cu's streamed LoRA kernel
#   (`sgmv_lora_stream_*`, shrink and expand of one-row segments in one kernel) against the row
#   kernels: ring shapes and cluster sizes, its copies alone (`no math`), cluster grids that fit
#   at once, two blocks an SM (bench/results/sgmv-lora-stream-probe-*-s16*.txt; x widened to f32
#   was the `fusedxf` mode of git 9b83378, and a first tensor-core version the `fusedtc` mode of
#   git d81d23e: `-tc-*-s17a.txt`).
# - With `fusedmma` [quick] (session 18): the plain kernel against its `_mma` twin (shrink and
#   expand on tensor cores), cluster sizes around the plan's, the `_mma` shrink with wider
#   units or its sums in four copies (`probe_lora_stream_mma_u*`, `_s4_*`), and the copies
#   alone.
# - With `fusedc3` [quick] (session 19): clusters of three blocks a row against pairs and fours
#   (rows of 17 to 44, where pairs leave SMs idle and fours do not all fit at once).
# - With `trace` (session 18): the streamed kernel's timeline, compiled with
#   bench/scripts/stream_trace.cuh (clock64 at each event of each block: stages landed, pieces
#   issued, v exchanged), medians over blocks.
# - With `tile` (session 17): the tile kernels on long segments (Punica's 512-row workloads),
#   shrink and expand timed alone and together against cuBLAS, with other split-K counts, probe
#   instances of the shrink and the long-segment expand (bench/results/sgmv-tile-probe-*-s17*.txt;
#   the warps-by-tile shrink of `-s17a` was git d81d23e's).
# Usage: python3 bench/scripts/sgmv_stream_probe.py [expand] [stream]
#        python3 bench/scripts/sgmv_stream_probe.py gemm
#        python3 bench/scripts/sgmv_stream_probe.py silu
#        python3 bench/scripts/sgmv_stream_probe.py read   (bulk copies vs 16-byte loads, reads only)
#        python3 bench/scripts/sgmv_stream_probe.py ncu    (plain launches for a profiler)
#        python3 bench/scripts/sgmv_stream_probe.py fused|fusedwhy|fusedgrid|fusedmma|trace
#        python3 bench/scripts/sgmv_stream_probe.py fusedc3 [quick]   (clusters of three, session 19)
#        python3 bench/scripts/sgmv_stream_probe.py fusedxa   (when x is asked for, session 19)
#        python3 bench/scripts/sgmv_stream_probe.py tile [quick]   (tile kernels on long segments, session 17)
#        python3 bench/scripts/sgmv_stream_probe.py tilencu   (plain launches of them for a profiler)
import ctypes
import glob
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_nvrtc():
    cands = []
    for pat in [
        "/usr/local/cuda*/lib64/libnvrtc.so*",
        "/usr/lib/x86_64-linux-gnu/libnvrtc.so*",
        os.path.join(os.path.dirname(torch.__file__), "lib", "libnvrtc*.so*"),
    ]:
        cands += glob.glob(pat)
    for p in sys.path:
        cands += glob.glob(os.path.join(p, "nvidia", "*", "lib", "libnvrtc.so*"))
    cands = [c for c in cands if "builtins" not in c and "alt" not in c]
    for c in sorted(cands, reverse=True):
        try:
            return ctypes.CDLL(c), c
        except OSError:
            pass
    raise SystemExit(f"no libnvrtc among {cands}")


nvrtc, nvrtc_path = load_nvrtc()
cuda = ctypes.CDLL("libcuda.so.1")


def ck(rc, what):
    if rc != 0:
        raise SystemExit(f"{what} failed: {rc}")


def compile_module(files):
    src = "".join(open(os.path.join(ROOT, f)).read() + "\n" for f in ["kernels/common.cuh", *files])
    prog = ctypes.c_void_p()
    ck(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"probe.cu", 0, None, None), "create")
    opts = [b"--gpu-architecture=sm_90a", b"--std=c++17", b"-lineinfo"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        raise SystemExit(log.value.decode())
    nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    ck(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
    mod = ctypes.c_void_p()
    ck(cuda.cuModuleLoadData(ctypes.byref(mod), cubin), "load")
    return mod


class LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("val", ctypes.c_char * 64)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint),
        ("bx", ctypes.c_uint), ("by", ctypes.c_uint), ("bz", ctypes.c_uint),
        ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttr)), ("nattrs", ctypes.c_uint),
    ]


PDL_ATTR = LaunchAttr()
PDL_ATTR.id = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
PDL_ATTR.val = (1).to_bytes(4, "little") + bytes(60)

torch.zeros(1, device="cuda")
MOD = compile_module(["kernels/sgmv.cu", "bench/scripts/sgmv_stream_probe.cu"])
OPS = []  # kernels/ops.cu, compiled when a kernel of it is first asked for (`silu` mode)
FUNCS = {}


def func(name, smem=0):
    if name not in FUNCS:
        f = ctypes.c_void_p()
        if name.startswith("silu_mul_"):
            if not OPS:
                OPS.append(compile_module(["kernels/ops.cu"]))
            mod = OPS[0]
        else:
            mod = MOD
        ck(cuda.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), name)
        FUNCS[name] = f
    f = FUNCS[name]
    if smem > 48 * 1024:
        ck(cuda.cuFuncSetAttribute(f, 8, smem), "smem attr")
    return f


USE_PDL = [True]


class U64(int):
    """A size_t kernel argument."""


def cluster_attr(c):
    a = LaunchAttr()
    a.id = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    a.val = c.to_bytes(4, "little") + (1).to_bytes(4, "little") * 2 + bytes(52)
    return a


def launch(name, grid, args, smem=0, threads=128, cluster=1):
    f = func(name, smem)
    attrs = (LaunchAttr * 2)(PDL_ATTR, cluster_attr(cluster))
    n = 1 if USE_PDL[0] else 0
    if cluster > 1:
        if n == 0:
            attrs[0] = attrs[1]
        n += 1
    cfg = LaunchConfig(grid[0], grid[1], grid[2], threads, 1, 1, smem,
                       ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                       ctypes.cast(attrs, ctypes.POINTER(LaunchAttr)), n)
    vals = []
    for a in args:
        if isinstance(a, torch.Tensor):
            vals.append(ctypes.c_uint64(a.data_ptr()))
        elif isinstance(a, U64):
            vals.append(ctypes.c_uint64(int(a)))
        else:
            vals.append(ctypes.c_int(a))
    ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    ck(cuda.cuLaunchKernelEx(ctypes.byref(cfg), f, ptrs, None), name)


SMS = torch.cuda.get_device_properties(0).multi_processor_count


class Set:
    """One rotation set: rows one-row segments, each with its own slot."""

    def __init__(self, rows, h_in, parts, rank, v_half):
        self.rows, self.h_in, self.parts, self.rank = rows, h_in, parts, rank
        np_ = len(parts)
        g = torch.Generator(device="cuda")
        self.x = torch.randn(rows, h_in, device="cuda", dtype=torch.bfloat16)
        self.a = (torch.randn(rows, rank * np_, h_in, device="cuda") / h_in**0.5).to(torch.bfloat16)
        self.b = [(torch.randn(rows, n, rank, device="cuda") / rank**0.5).to(torch.bfloat16) for n in parts]
        self.y = torch.randn(rows, sum(parts), device="cuda", dtype=torch.bfloat16)
        self.v = torch.zeros(rows, rank * np_, device="cuda")
        self.vh = (torch.randn(rows, rank * np_, device="cuda")).to(torch.bfloat16)
        self.acc = torch.zeros(rows * 16 * rank * np_, device="cuda")
        self.counters = torch.zeros(rows, device="cuda", dtype=torch.int32)
        tab = bytearray(64 * rows)
        for i in range(rows):
            e = bytearray(64)
            e[0:8] = self.a[i].data_ptr().to_bytes(8, "little")
            e[8:12] = (rank * np_).to_bytes(4, "little")
            for j in range(3):
                if j < np_:
                    e[16 + 8 * j:24 + 8 * j] = self.b[j][i].data_ptr().to_bytes(8, "little")
                    e[40 + 4 * j:44 + 4 * j] = rank.to_bytes(4, "little")
                    e[52 + 4 * j:56 + 4 * j] = (rank * j).to_bytes(4, "little")
            tab[64 * i:64 * i + 64] = e
        self.table = torch.frombuffer(tab, dtype=torch.uint8).cuda()
        self.tiles = torch.tensor([[i, i] for i in range(rows)], dtype=torch.int32).flatten().cuda()
        self.segs = torch.tensor([[i, i + 1, i] for i in range(rows)], dtype=torch.int32).flatten().cuda()
        ends = [sum(parts[:j + 1]) for j in range(np_)]
        while len(ends) < 3:
            ends.append(ends[-1])
        self.ends = ends

    def add_gemm(self):
        # The decode GEMM that writes y before the expand (engine order), x [rows, h_in] . W^T.
        n = sum(self.parts)
        self.xg = torch.randn(self.rows, self.h_in, device="cuda", dtype=torch.bfloat16)
        self.w = (torch.randn(n, self.h_in, device="cuda") / self.h_in**0.5).to(torch.bfloat16)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in [self.x, self.a, self.y, *self.b])

    def reference(self, y0, v_half):
        # y0 + v . B^T per part, v from x . A^T (shrink+expand) or self.vh (expand only)
        if v_half:
            v = self.vh.float()
        else:
            v = torch.einsum("rk,rnk->rn", self.x.float(), self.a.float())
        out = y0.float().clone()
        c = 0
        for j, n in enumerate(self.parts):
            vj = v[:, self.rank * j:self.rank * (j + 1)]
            out[:, c:c + n] += torch.einsum("rk,rnk->rn", vj, self.b[j].float())
            c += n
        return out


def old_ops(s, v_half, shrink=True, expand=True):
    rank_all = s.rank * len(s.parts)
    if shrink:
        nvec = s.h_in // 8
        rank_blocks = (rank_all + 3) // 4
        base = (nvec + 255) // 256
        per_split = s.rows * rank_blocks
        fill = (8 * SMS + per_split // 2) // per_split
        ksplit = max(1, min(max(base, fill), max(1, nvec // 32)))
        launch("sgmv_shrink_rows_bf16", (ksplit, rank_blocks, s.rows),
               [s.x, s.h_in, s.v, rank_all, s.table, s.tiles, s.segs, ksplit, rank_all, s.acc, s.counters])
    if not expand:
        return
    # kernels/sgmv.cu's row expand: EXPAND_ROWS_WARPS (8) warps of EXPAND_ROWS_KU (1) step
    rl = max(1, s.rank // 8)
    cols = 8 * 1 * (32 // rl)
    h_out = s.ends[2]
    vt, vn = (s.vh, "_vh") if v_half else (s.v, "")
    launch(f"sgmv_expand_rows_bf16{vn}_l{rl}", ((h_out + cols - 1) // cols, s.rows, 1),
           [vt, rank_all, s.y, h_out, 0, s.ends[0], s.ends[1], s.ends[2], s.table, s.tiles, s.segs],
           threads=256)


ROW_VARIANTS = [(4, 4, 6), (1, 8, 6), (2, 4, 12)]
# kernels/sgmv.cu's grid-stride expand: (warps, launch bounds, grid); (8, 6) is the kernel itself,
# the others its instances in sgmv_stream_probe.cu. Grid "wave" = one wave of blocks a tile (the
# backend's), "bal" = the column blocks spread evenly over as few rounds as one wave needs,
# "full" = a block a column block.
GS_VARIANTS = [(8, 6, g) for g in ("wave", "bal", "full")] + [(4, 12, "wave"), (8, 8, "wave")]
SHRINK_VARIANTS = []


def row_ops(s, v_half, ev=None, sv=None, shrink=True):
    """The row kernels with other constants: ev/sv = (KU, NW, MINB) of the expand/shrink."""
    rank_all = s.rank * len(s.parts)
    if shrink:
        if sv is None:
            old_ops(s, v_half, shrink=True, expand=False)
        else:
            ku, nw, mb = sv
            nvec = s.h_in // 8
            rank_blocks = (rank_all + nw - 1) // nw
            base = (nvec + 255) // 256
            per_split = s.rows * rank_blocks
            target = mb * SMS
            fill = (target + per_split // 2) // per_split
            ksplit = max(1, min(max(base, fill), max(1, nvec // 32)))
            launch(f"probe_shrink_rows_k{ku}_w{nw}_b{mb}", (ksplit, rank_blocks, s.rows),
                   [s.x, s.h_in, s.v, rank_all, s.table, s.tiles, s.segs, ksplit, rank_all, s.acc, s.counters],
                   threads=32 * nw)
    if ev is None:
        return old_ops(s, v_half, shrink=False)
    ku, nw, mb = ev
    rl = max(1, s.rank // 8)
    cols = nw * ku * (32 // rl)
    h_out = s.ends[2]
    vt, vn = (s.vh, "_vh") if v_half else (s.v, "")
    launch(f"probe_expand_rows{vn}_l{rl}_k{ku}_w{nw}_b{mb}", ((h_out + cols - 1) // cols, s.rows, 1),
           [vt, rank_all, s.y, h_out, 0, s.ends[0], s.ends[1], s.ends[2], s.table, s.tiles, s.segs],
           threads=32 * nw)


def gs_ops(s, v_half, nw, mb, grid="wave", shrink=True):
    """The old row shrink, then the grid-stride row expand (nw warps, launch bounds mb)."""
    if shrink:
        old_ops(s, v_half, shrink=True, expand=False)
    rank_all = s.rank * len(s.parts)
    rl = max(1, s.rank // 8)
    h_out = s.ends[2]
    ncb = (h_out + nw * (32 // rl) - 1) // (nw * (32 // rl))
    wave = max(1, mb * SMS // s.rows)
    if grid == "full":
        per_tile = ncb
    elif grid == "bal":
        rounds = (ncb + wave - 1) // wave
        per_tile = (ncb + rounds - 1) // rounds
    else:
        per_tile = min(ncb, wave)
    vt, vn = (s.vh, "_vh") if v_half else (s.v, "")
    name = f"sgmv_expand_rows_gs_bf16{vn}_l{rl}" if (nw, mb) == (8, 6) else f"probe_expand_rows_gs{vn}_l{rl}_w{nw}_b{mb}"
    launch(name, (per_tile * s.rows, 1, 1),
           [vt, rank_all, s.y, h_out, 0, s.ends[0], s.ends[1], s.ends[2], s.table, s.tiles, s.segs,
            s.rows, ncb], threads=32 * nw)


def stream_ops(s, v_half, p, shrink=True):
    rank_all = s.rank * len(s.parts)
    if shrink:
        sb = p["ssb"]
        ch = max(1, sb // (s.h_in * 2))
        ch = 1 << (ch.bit_length() - 1)
        nchunks = (rank_all + ch - 1) // ch
        nunits = s.rows * nchunks
        grid = max(min(nunits, p["sbps"] * SMS), (nunits + 31) // 32)
        launch("sgmv_shrink_stream_bf16", (grid, 1, 1),
               [s.x, s.h_in, s.v, rank_all, s.table, s.tiles, s.segs, s.rows, nchunks, ch, p["sst"], sb],
               smem=4608 + p["sst"] * sb + s.h_in * 2)
    sb = p["esb"]
    rl = max(1, s.rank // 8)
    nw = p.get("nw", 4)
    cc = min(sb // (s.rank * 2), 8 * nw * (32 // rl))
    h_out = s.ends[2]
    nunits = s.rows * ((h_out + cc - 1) // cc)
    grid = max(min(nunits, p["ebps"] * SMS), (nunits + 31) // 32)
    rl = max(1, s.rank // 8)
    vt, vn = (s.vh, "_vh") if v_half else (s.v, "")
    launch(f"sgmv_expand_stream_bf16{vn}_l{rl}", (grid, 1, 1),
           [vt, rank_all, s.y, h_out, 0, s.ends[0], s.ends[1], s.ends[2], s.table, s.tiles, s.segs,
            s.rows, cc, p["est"], sb, p.get("flags", 0)],
           smem=4608 + p["est"] * sb + 16384, threads=32 * nw)


def fused_ops(s, p):
    """kernels/sgmv.cu's streamed LoRA: shrink and expand in one kernel, clusters of p["c"]."""
    c, stages, sb = p["c"], p["st"], p["sb"]
    y_cap = sum(8 * -(-(n // 8) // c) for n in s.parts)
    x_bytes = (2 * s.h_in + 127) // 128 * 128
    fixed = 5120 + x_bytes + 2 * ((2 * y_cap + 127) // 128 * 128)
    stages = min(stages, (232448 - fixed) // sb)  # 227 KB a block at most
    smem = fixed + stages * sb
    ncl = min(s.rows, p.get("blocks", SMS) // c)
    USE_PDL[0] = not p.get("nopdl", False)
    launch(p.get("kernel", f"sgmv_lora_stream_bf16_c{c}"), (ncl * c, 1, 1),
           [s.x, s.h_in, s.y, s.ends[2], 0, s.ends[0], s.ends[1], s.ends[2], s.table, s.tiles,
            s.segs, s.rows, stages, sb, y_cap], smem=smem, threads=544)
    USE_PDL[0] = True


def fused_why_main():
    # Why the streamed kernel is slow: copies alone, two blocks an SM, a profile of each.
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; streamed LoRA, why")
    ps = [("fused c1 12x16k", dict(c=1, st=12, sb=16384)),
          ("no math c1 12x16k", dict(c=1, st=12, sb=16384, kernel="probe_lora_stream_nomath")),
          ("no math c1 6x32k", dict(c=1, st=6, sb=32768, kernel="probe_lora_stream_nomath")),
          ("2 blocks an SM c1 5x16k", dict(c=1, st=5, sb=16384, blocks=2 * SMS, kernel="probe_lora_stream_2bps")),
          ("fused c2 12x16k, no PDL", dict(c=2, st=12, sb=16384, nopdl=True))]
    for rows, h, r in [(8, 4096, 64), (128, 4096, 64)]:
        vs = [("old row kernels", lambda s: old_ops(s, False))]
        for nm, p in ps:
            vs.append((nm, (lambda p: lambda s: fused_ops(s, p))(p)))
        run_case("shrink+expand distinct", rows, h, [h], r, False, vs)
    if "ncu" in sys.argv:
        st = Set(128, 4096, [4096], 64, False)
        for nm, p in ps[:2]:
            fused_ops(st, p)
        torch.cuda.synchronize()


def fused_grid_main():
    # Cluster grids that fit at once (a cluster of c needs c free SMs of one GPC) and two
    # blocks an SM with half the ring.
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; streamed LoRA grids")
    for rows, h, r in [(8, 4096, 16), (64, 4096, 16), (32, 4096, 64), (64, 4096, 64), (128, 4096, 64),
                       (512, 4096, 64), (64, 8192, 64)]:
        vs = [("old row kernels", lambda s: old_ops(s, False))]
        for c, blocks in [(1, SMS), (2, SMS), (2, 128), (4, 128), (4, 112), (8, 128), (8, 96)]:
            if c > 1 and rows * c > 2 * SMS:
                continue
            p = dict(c=c, st=6, sb=32768, blocks=blocks)
            vs.append((f"fused c{c} 6x32k blocks {blocks}", (lambda p: lambda s: fused_ops(s, p))(p)))
        for st, sb in [(5, 16384), (3, 24576)]:
            p = dict(c=1, st=st, sb=sb, blocks=2 * SMS, kernel="probe_lora_stream_2bps")
            vs.append((f"2 blocks an SM c1 {st}x{sb // 1024}k", (lambda p: lambda s: fused_ops(s, p))(p)))
        run_case("shrink+expand distinct", rows, h, [h], r, False, vs)


def fused_mma_main():
    # The streamed kernel's shrink and expand on tensor cores (its `_mma` twin) against the plain
    # kernel and the copies alone.
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; streamed LoRA, MMA")
    quick = "quick" in sys.argv
    cases = [(32, 4096, [4096], 64), (64, 4096, [4096], 64), (128, 4096, [4096], 64),
             (64, 8192, [8192], 64), (512, 4096, [4096], 64), (32, 4096, [4096], 32),
             (32, 4096, [4096], 128), (64, 4096, [4096], 16), (8, 4096, [4096], 64),
             (32, 4096, [4096, 1024, 1024], 64), (32, 576, [576, 192, 192], 64),
             (64, 576, [576], 32), (40, 5120, [5120], 64), (16, 4096, [4096], 64)]
    if quick:
        cases = cases[:4]
    for rows, h, parts, r in cases:
        c = 1 if rows >= 100 else (2 if rows > 16 else 4)
        f = lambda p: lambda s: fused_ops(s, p)
        vs = [("old row kernels", lambda s: old_ops(s, False))]
        for cc in sorted({c, max(1, c // 2), min(4, 2 * c)}):
            if rows * cc > 2 * SMS:
                continue
            vs.append((f"fused c{cc} 6x32k", f(dict(c=cc, st=6, sb=32768))))
            vs.append((f"mma c{cc} 6x32k", f(dict(c=cc, st=6, sb=32768, kernel=f"sgmv_lora_stream_mma_bf16_c{cc}"))))
            if cc <= 2:
                for uv in (128, 256):
                    vs.append((f"mma, units of {uv} c{cc} 6x32k",
                               f(dict(c=cc, st=6, sb=32768, kernel=f"probe_lora_stream_mma_u{uv}_c{cc}"))))
                vs.append((f"mma, sums in 4 copies c{cc} 6x32k",
                           f(dict(c=cc, st=6, sb=32768, kernel=f"probe_lora_stream_mma_s4_c{cc}"))))
        nm = "probe_lora_stream_nomath" + ("" if c == 1 else f"_c{c}")
        vs.append((f"no math c{c} 6x32k", f(dict(c=c, st=6, sb=32768, kernel=nm))))
        run_case("shrink+expand distinct", rows, h, parts, r, False, vs)


def max_clusters(name, c, smem):
    """Clusters of `name` (compile-time clusters of c blocks, 544 threads, smem bytes of shared
    memory) that the device runs at once."""
    f = func(name, smem)
    cfg = LaunchConfig(c * SMS, 1, 1, 544, 1, 1, smem,
                       ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), None, 0)
    n = ctypes.c_int()
    ck(cuda.cuOccupancyMaxActiveClusters(ctypes.byref(n), f, ctypes.byref(cfg)), name)
    return n.value


def fused_c3_main():
    # Clusters of three (session 19): rows of 17 to 44 in clusters of 2, 3 and 4, plain and on
    # tensor cores, and the copies alone; with how many clusters of each size fit at once.
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; streamed LoRA, clusters of 3")
    for c in (1, 2, 3, 4):
        y_cap = 8 * -(-(4096 // 8) // c)
        smem = 5120 + 8192 + 2 * ((2 * y_cap + 127) // 128 * 128) + 6 * 32768
        print(f"# clusters of {c} that fit at once (7B r=64 shared memory, {smem} bytes): "
              f"{max_clusters(f'sgmv_lora_stream_bf16_c{c}', c, smem)}")
    cases = [(32, 4096, [4096], 64), (24, 4096, [4096], 64), (40, 4096, [4096], 64),
             (44, 4096, [4096], 64), (17, 4096, [4096], 64), (32, 4096, [4096], 16),
             (32, 4096, [4096], 32), (32, 8192, [8192], 64), (32, 5120, [5120], 64),
             (32, 4096, [4096, 1024, 1024], 64)]
    if "quick" in sys.argv:
        cases = cases[:3]
    f = lambda p: lambda s: fused_ops(s, p)
    for rows, h, parts, r in cases:
        vs = [("old row kernels", lambda s: old_ops(s, False))]
        for cc in (2, 3, 4):
            vs.append((f"fused c{cc} 6x32k", f(dict(c=cc, st=6, sb=32768))))
            vs.append((f"mma c{cc} 6x32k", f(dict(c=cc, st=6, sb=32768, kernel=f"sgmv_lora_stream_mma_bf16_c{cc}"))))
        # Smaller stages, more of them: the last B stage goes out before the shrink ends.
        for st, sb in ((8, 24576), (13, 16384), (5, 40960), (4, 49152)):
            vs.append((f"fused c3 {st}x{sb // 1024}k", f(dict(c=3, st=st, sb=sb))))
        for cc in (2, 3):
            vs.append((f"no math c{cc} 6x32k", f(dict(c=cc, st=6, sb=32768, kernel=f"probe_lora_stream_nomath_c{cc}"))))
        run_case("shrink+expand distinct", rows, h, parts, r, False, vs)


def fused_xa_main():
    # When the producer asks for the first row's x (session 19): after 1 or 3 stages, or once
    # the ring is full (0). Run at git ff79ee6, when production asked after 2 stages; since,
    # clusters of three ask after 3 and the others at a full ring (kernels/sgmv.cu
    # STREAM_X_AFTER).
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; streamed LoRA, x early")
    f = lambda p: lambda s: fused_ops(s, p)
    for rows, c, mma in [(32, 3, False), (24, 3, False), (64, 2, True), (128, 1, True), (512, 1, True)]:
        kind = "mma_" if mma else ""
        prod = f"sgmv_lora_stream_{kind}bf16_c{c}"
        vs = [("old row kernels", lambda s: old_ops(s, False)),
              (f"{kind}c{c} production", f(dict(c=c, st=6, sb=32768, kernel=prod)))]
        for xa in (0, 1, 3):
            name = f"probe_lora_stream_{kind}xa{xa}_c{c}"
            if xa == 3 and mma:
                continue
            vs.append((f"{kind}c{c} x after {xa or 'a full ring'}", f(dict(c=c, st=6, sb=32768, kernel=name))))
        run_case("shrink+expand distinct", rows, 4096, [4096], 64, False, vs)


def trace_main():
    # The streamed kernel's timeline (bench/scripts/stream_trace.cuh): per block, clock64 at its
    # events; medians over blocks, in us from the block's start.
    global MOD
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; streamed LoRA timeline")
    MOD = compile_module(["bench/scripts/stream_trace.cuh", "kernels/sgmv.cu",
                          "bench/scripts/sgmv_stream_probe.cu"])
    FUNCS.clear()

    def gptr(name):
        p, n = ctypes.c_uint64(), ctypes.c_size_t()
        ck(cuda.cuModuleGetGlobal_v2(ctypes.byref(p), ctypes.byref(n), MOD, name.encode()), name)
        return p.value, n.value

    tr, trn = gptr("stream_trace")
    on, _ = gptr("stream_trace_on")
    f = lambda p: lambda s: fused_ops(s, p)
    for rows, h, r, c, variants in [
            (64, 4096, 64, 2, [("mma", "sgmv_lora_stream_mma_bf16_c2"), ("plain", "sgmv_lora_stream_bf16_c2"),
                               ("mma u256", "probe_lora_stream_mma_u256_c2"),
                               ("mma s4", "probe_lora_stream_mma_s4_c2"),
                               ("no math", "probe_lora_stream_nomath_c2")]),
            (128, 4096, 64, 1, [("mma", "sgmv_lora_stream_mma_bf16_c1"), ("no math", "probe_lora_stream_nomath")]),
            (32, 4096, 64, 2, [("mma", "sgmv_lora_stream_mma_bf16_c2"), ("mma u256", "probe_lora_stream_mma_u256_c2")]),
            (32, 4096, 64, 3, [("plain", "sgmv_lora_stream_bf16_c3"), ("no math", "probe_lora_stream_nomath_c3")])]:
        sets = [Set(rows, h, [h], r, False) for _ in range(3)]
        for name, kern in variants:
            p = dict(c=c, st=6, sb=32768, kernel=kern)
            for st in sets:
                fused_ops(st, p)
            torch.cuda.synchronize()
            ck(cuda.cuMemsetD8_v2(ctypes.c_uint64(tr), 0, trn), "memset")
            ck(cuda.cuMemsetD32_v2(ctypes.c_uint64(on), 1, 1), "memset")
            for st in sets + sets[:1]:
                fused_ops(st, p)
            ck(cuda.cuMemsetD32_v2(ctypes.c_uint64(on), 0, 1), "memset")
            torch.cuda.synchronize()
            buf = (ctypes.c_uint64 * (trn // 8))()
            ck(cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(tr), trn), "copy")
            t = torch.tensor(list(buf), dtype=torch.float64).view(-1, 128)
            nb = min(rows, SMS // c) * c
            t = t[:nb]
            rate = ((t[:, 125] - t[:, 124]) / (t[:, 127] - t[:, 126])).median().item()  # cycles/ns
            rel = (t - t[:, 124:125]) / rate / 1e3
            med = lambda k: rel[:, k][t[:, k] > 0].median().item() if (t[:, k] > 0).any() else float("nan")
            gs, ge = t[:, 126], t[:, 127]
            print(f"## rows {rows} h {h} r {r} c{c} {name}: {nb} blocks, clock {rate:.2f} GHz, block starts "
                  f"spread {(gs.max() - gs.min()).item() / 1e3:.2f} us, ends {(ge.max() - ge.min()).item() / 1e3:.2f} us, "
                  f"median block time {((ge - gs).median().item()) / 1e3:.2f} us")
            waits = [med(2 + i) for i in range(56) if (t[:, 2 + i] > 0).any()]
            issues = [med(64 + i) for i in range(59) if (t[:, 64 + i] > 0).any()]
            print(f"  past first barrier {med(59):.2f}, consumers start {med(0):.2f}, x landed (last row) {med(1):.2f}, shrink done {med(60):.2f}, "
                  f"v ready {med(62):.2f}, expand done {med(61):.2f}, row written {med(63):.2f}, end {med(125):.2f}")
            print("  stage waits done: " + " ".join(f"{x:.2f}" for x in waits))
            print("  pieces issued:    " + " ".join(f"{x:.2f}" for x in issues))


def fused_main():
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; streamed LoRA")
    cases = [(8, 4096, 16), (32, 4096, 16), (64, 4096, 16), (512, 4096, 16),
             (32, 4096, 64), (64, 4096, 64), (128, 4096, 64), (512, 4096, 64), (64, 8192, 64)]
    for rows, h, r in cases:
        vs = [("old row kernels", lambda s: old_ops(s, False))]
        cs = [1] + [c for c in (2, 4, 8) if rows * c <= 2 * SMS]
        for c in cs:
            for st, sb in [(12, 16384), (6, 32768)]:
                p = dict(c=c, st=st, sb=sb)
                vs.append((f"fused c{c} {st}x{sb // 1024}k", (lambda p: lambda s: fused_ops(s, p))(p)))
        run_case("shrink+expand distinct", rows, h, [h], r, False, vs)
    # More than one part (q|k|v at 7B shapes) and mixed widths, for correctness.
    for parts, r in [([4096, 1024, 1024], 16), ([11008, 11008], 16), ([576, 192, 192], 8)]:
        h = 4096 if parts[0] != 576 else 576
        vs = [("old row kernels", lambda s: old_ops(s, False))]
        for c in (1, 2, 4):
            p = dict(c=c, st=8, sb=16384)
            vs.append((f"fused c{c}", (lambda p: lambda s: fused_ops(s, p))(p)))
        run_case("shrink+expand distinct", 32, h, parts, r, False, vs)


def bench(sets, fn, reps=20, out=lambda s: s.y):
    y0 = sets[0].y.clone()
    fn(sets[0])
    torch.cuda.synchronize()
    got = out(sets[0]).float()
    sets[0].y.copy_(y0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for st in sets:
            fn(st)  # warm
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for st in sets:
                fn(st)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / len(sets))
    times.sort()
    return times[len(times) // 2], got, y0


def run_case(name, rows, h_in, parts, rank, v_half, variants, gemm=False):
    one = Set(rows, h_in, parts, rank, v_half)
    nsets = max(2, min(64, int(200e6 // one.nbytes())))
    sets = [one] + [Set(rows, h_in, parts, rank, v_half) for _ in range(nsets - 1)]
    if gemm:
        for st in sets:
            st.add_gemm()
    moved = one.nbytes() - one.x.numel() * 2 if v_half else one.nbytes()
    if v_half:
        moved -= one.a.numel() * 2
    floor = moved / 4186e9 * 1e6
    print(f"## {name}: rows {rows} h_in {h_in} parts {parts} r {rank} v_half {v_half}; "
          f"{moved/1e6:.1f} MB, floor {floor:.1f} us, {nsets} sets", flush=True)
    for vname, fn in variants:
        try:
            us, got, y0 = bench(sets, fn)
        except SystemExit as e:
            print(f"  {vname}: failed: {e}", flush=True)
            continue
        if gemm:
            base = (one.xg.float() @ one.w.float().t()).to(torch.bfloat16)
            ref = one.reference(base, v_half) if "gemm only" not in vname else base.float()
        else:
            ref = one.reference(y0, v_half)
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"  {vname:40s} {us:8.2f} us  {moved/us/1e3:7.0f} GB/s  rel err {err:.1e}", flush=True)


def read_main():
    src = torch.empty(int(240e6), dtype=torch.uint8, device="cuda")
    out = torch.zeros(4, device="cuda")
    for total in [4.5e6, 24e6, 134e6]:
        for mode, mname in [(1, "ldg.128 x8"), (0, "bulk, thread 0"), (2, "bulk, 32 lanes")]:
            for bps in [1, 2, 4, 8]:
                for piece in ([16384] if mode == 1 else [1024, 4096, 16384]):
                    grid = bps * SMS
                    per = int(total // grid) // 16384 * 16384 or 16384
                    if per > 200 * 1024 // bps or per % piece:
                        continue
                    nsets = int(200e6 // (per * grid))
                    def fn(k):
                        launch("read_probe", (grid, 1, 1), [src[k * per * grid:], per, piece, mode, out],
                               smem=(1024 + per) if mode != 1 else 0)
                    g = torch.cuda.CUDAGraph()
                    st = torch.cuda.Stream()
                    with torch.cuda.stream(st):
                        for k in range(nsets):
                            fn(k)
                        torch.cuda.synchronize()
                        with torch.cuda.graph(g, stream=st):
                            for k in range(nsets):
                                fn(k)
                    g.replay()
                    torch.cuda.synchronize()
                    ts = []
                    for _ in range(10):
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
                        ts.append(e0.elapsed_time(e1) * 1e3 / nsets)
                    ts.sort()
                    us = ts[5]
                    b = per * grid
                    print(f"read {b/1e6:6.1f} MB {mname:16s} bps {bps} piece {piece:6d} per block {per//1024:4d} KB: "
                          f"{us:7.2f} us {b/us/1e3:6.0f} GB/s", flush=True)


def ncu_main():
    # plain launches (no graph) for a profiler: old and stream expand, o and gate|up
    for parts in [[4096], [11008, 11008]]:
        st = Set(32, 4096, parts, 16, True)
        for _ in range(2):
            old_ops(st, True, shrink=False)
            stream_ops(st, True, dict(esb=32768, est=2, ebps=3), shrink=False)
    st = Set(64, 4096, [4096], 16, False)
    for _ in range(2):
        old_ops(st, False)
        stream_ops(st, False, dict(ssb=32768, sst=2, esb=32768, est=2, sbps=2, ebps=2))
    torch.cuda.synchronize()


def gemm_main():
    # Each expand right after the GEMM that writes its y, as in an arena decode step (v from
    # the GEMM's extra columns: here a tensor of its own). Times are of GEMM + expand; the
    # "gemm only" line is the GEMM alone.
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; GEMM then expand")

    def gemm(s):
        torch.matmul(s.xg, s.w.t(), out=s.y)

    def plain(s, pdl=True, early_y=True):
        # sgmv.cu's row expand (a one-row segment's old y loaded beside v), or its instance
        # that loads the old y after the sum (the kernel before session 14, 6 blocks an SM).
        USE_PDL[0] = pdl
        rank_all = s.rank * len(s.parts)
        h_out = s.ends[2]
        name = "sgmv_expand_rows_bf16_vh_l2" if early_y else "probe_expand_rows_vh_l2_k1_w8_b6"
        launch(name, ((h_out + 127) // 128, s.rows, 1),
               [s.vh, rank_all, s.y, h_out, 0, s.ends[0], s.ends[1], s.ends[2], s.table, s.tiles, s.segs],
               threads=256)
        USE_PDL[0] = True

    vs = [("gemm only", gemm),
          ("gemm + plain, y after the sum, no PDL", lambda s: (gemm(s), plain(s, pdl=False, early_y=False))),
          ("gemm + plain, y after the sum", lambda s: (gemm(s), plain(s, early_y=False))),
          ("gemm + plain", lambda s: (gemm(s), plain(s))),
          ("gemm + grid-stride", lambda s: (gemm(s), gs_ops(s, True, 8, 6, shrink=False)))]
    for nm, parts in [("q|k|v", [4096] * 3), ("o", [4096]), ("gate|up", [11008] * 2), ("down", [4096])]:
        run_case(f"gemm + expand {nm}", 32, 4096 if nm != "down" else 11008, parts, 16, True, vs, gemm=True)


def silu_main():
    # The gate|up GEMM, then its expand and SiLU-mul as the engine runs them (two kernels) or
    # fused into one (kernels/sgmv.cu `sgmv_expand_silu_rows_*`); 7B at batch 32, r=16, one adapter a row.
    rows, h_in, n, rank = 32, 4096, 11008, 16
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; "
          f"gate|up GEMM, expand and SiLU-mul, rows {rows}, r {rank}")
    one = Set(rows, h_in, [n, n], rank, True)
    sets = [one] + [Set(rows, h_in, [n, n], rank, True) for _ in range(5)]
    for st in sets:
        st.add_gemm()
        st.act = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    total = rows * n

    def gemm(s):
        torch.matmul(s.xg, s.w.t(), out=s.y)

    def silu(s):
        launch("silu_mul_bf16", (min((total + 255) // 256, 32 * SMS), 1, 1),
               [s.y, 2 * n, n, U64(total), s.act], threads=256)

    # Every row has an adapter (slot + 1 a row): no blocks for rows without one.
    row_lora = torch.arange(1, rows + 1, dtype=torch.int32, device="cuda")

    def fused(s):
        # As cuda/plan.rs `fused_expand_plan`: 8 warps of 16 columns, 4 blocks an SM.
        ncb = (n + 8 * 16 - 1) // (8 * 16)
        per_tile = max(1, min(ncb, 4 * SMS // s.rows))
        launch("sgmv_expand_silu_rows_bf16_vh_l2", (per_tile * s.rows, 1, 1),
               [s.vh, 2 * rank, s.y, 2 * n, n, s.act, s.table, s.tiles, s.segs, row_lora,
                s.rows, per_tile, ncb],
               threads=256)

    gate_up = (one.xg.float() @ one.w.float().t()).to(torch.bfloat16)
    with_lora = one.reference(gate_up, True).to(torch.bfloat16).float()
    g, u = with_lora[:, :n], with_lora[:, n:]
    ref_lora = g * torch.sigmoid(g) * u
    g, u = gate_up.float()[:, :n], gate_up.float()[:, n:]
    ref_base = g * torch.sigmoid(g) * u
    vs = [("gemm only", gemm, None),
          ("gemm + silu_mul (no LoRA)", lambda s: (gemm(s), silu(s)), ref_base),
          ("gemm + grid-stride expand + silu_mul", lambda s: (gemm(s), gs_ops(s, True, 8, 6, shrink=False), silu(s)), ref_lora)]
    vs.append(("gemm + fused expand+silu (sgmv.cu)", lambda s: (gemm(s), fused(s)), ref_lora))
    for name, fn, ref in vs:
        us, got, _ = bench(sets, fn, out=lambda s: s.act)
        err = "" if ref is None else f"rel err {((got - ref).norm() / ref.norm()).item():.1e}"
        print(f"  {name:44s} {us:8.2f} us  {err}", flush=True)


# --- Session 17: tile kernels for long segments (`tile`, `tilencu`) ---------------------------


def segment_lens(workload, rows):
    # As cuda/bench.rs `segment_lens` (Punica's workloads).
    if workload == "identical":
        return [rows]
    if workload == "distinct":
        return [1] * rows
    if workload == "uniform":
        n = math.ceil(rows ** 0.5)
        lens = [rows // n] * n
        for i in range(rows % n):
            lens[i] += 1
        return [l for l in lens if l > 0]
    lens, a, total = [], 1.0, 0
    while total + int(a) < rows:
        lens.append(int(a))
        total += int(a)
        a *= 1.5
    lens.append(rows - total)
    return sorted(lens, reverse=True)


class TileSet:
    """One rotation set: segments of `lens` rows, segment i on slot i, one part of h_out."""

    def __init__(self, lens, h_in, h_out, rank):
        rows, nseg = sum(lens), len(lens)
        self.rows, self.h_in, self.h_out, self.rank, self.lens = rows, h_in, h_out, rank, lens
        self.x = torch.randn(rows, h_in, device="cuda", dtype=torch.bfloat16)
        self.a = (torch.randn(nseg, rank, h_in, device="cuda") / h_in**0.5).to(torch.bfloat16)
        self.b = (torch.randn(nseg, h_out, rank, device="cuda") / rank**0.5).to(torch.bfloat16)
        self.y = torch.randn(rows, h_out, device="cuda", dtype=torch.bfloat16)
        self.v = torch.zeros(rows, rank, device="cuda")
        tiles, segs, start = [], [], 0
        for i, n in enumerate(lens):
            for r0 in range(start, start + n, 16):
                tiles += [i, r0]
                segs += [start, start + n, i]  # a tile's segment at the tile's index
            start += n
        self.ntiles = len(tiles) // 2
        self.tiles = torch.tensor(tiles, dtype=torch.int32, device="cuda")
        self.segs = torch.tensor(segs, dtype=torch.int32, device="cuda")
        self.acc = torch.zeros(self.ntiles * 16 * 128 * 4, device="cuda")
        self.counters = torch.zeros(self.ntiles * 16, device="cuda", dtype=torch.int32)
        tab = bytearray(64 * nseg)
        for i in range(nseg):
            tab[64 * i:64 * i + 8] = self.a[i].data_ptr().to_bytes(8, "little")
            tab[64 * i + 8:64 * i + 12] = rank.to_bytes(4, "little")
            tab[64 * i + 16:64 * i + 24] = self.b[i].data_ptr().to_bytes(8, "little")
            tab[64 * i + 40:64 * i + 44] = rank.to_bytes(4, "little")
        self.table = torch.frombuffer(tab, dtype=torch.uint8).cuda()
        self.seg_rows = []
        start = 0
        for n in lens:
            self.seg_rows.append((start, start + n))
            start += n
        self.vref = self.shrink_ref()
        self.v.copy_(self.vref)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in [self.x, self.a, self.b]) + 2 * self.y.numel() * 2

    def shrink_ref(self):
        v = torch.empty(self.rows, self.rank, device="cuda")
        for i, (s0, s1) in enumerate(self.seg_rows):
            v[s0:s1] = self.x[s0:s1].float() @ self.a[i].float().t()
        return v

    def reference(self, y0):
        out = y0.float().clone()
        for i, (s0, s1) in enumerate(self.seg_rows):
            out[s0:s1] += self.vref[s0:s1] @ self.b[i].float().t()
        return out


def prod_shrink_plan(s):
    # As cuda/mod.rs `sgmv_shrink` (tile path): (nt, splits, groups).
    t = s.ntiles
    full = s.rows >= 2 * t
    target = SMS * 4
    all_ = 1 << ((-(-s.rank // 8)) - 1).bit_length()
    nt0, g0 = min(all_, 16), -(-all_ // 16)
    max_split = max(1, (-(-s.h_in // 32)) // 4)
    if nt0 <= 2 or t * g0 * max_split >= target:
        nt, g1 = nt0, 1
    else:
        g1 = min(1 << (-(-target // (t * g0 * max_split)) - 1).bit_length(), nt0 // 2)
        nt = nt0 // g1
    groups = g0 * g1
    if full:
        # `shrink_splits_full`: as many splits as one wave of resident blocks holds.
        n = ctypes.c_int()
        ck(cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), func(f"sgmv_shrink_bf16_n{nt}"), 128, ctypes.c_size_t(0)), "occupancy")
        splits = max(1, min(min(n.value, 3) * SMS // (t * groups), max(1, min(max_split, 16))))
    else:
        splits = max(1, min(-(-target // (t * groups)), max(1, min(max_split, 64))))
    return nt, splits, groups


def prod_shrink(s, splits=None, groups=None, kernel=None):
    # The tile shrink as cuda/mod.rs plans it, or with other splits, rank groups or a probe
    # instance (`kernel`, of the same rank tiles).
    nt, sp, g = prod_shrink_plan(s)
    sp = splits or sp
    if groups:
        nt, g = nt // groups, g * groups
    launch(kernel or f"sgmv_shrink_bf16_n{nt}", (s.ntiles, sp, g),
           [s.x, s.h_in, s.v, s.rank, s.table, s.tiles, s.segs, sp, s.acc, s.counters])


def prod_expand(s, ntw=4):
    kt = 1 << ((-(-s.rank // 32)) - 1).bit_length()
    launch(f"sgmv_expand_bf16_k{kt}_w{ntw}", (-(-s.h_out // (32 * ntw)), s.ntiles, 1),
           [s.v, s.rank, s.y, s.h_out, 0, 0, s.h_out, s.h_out, s.h_out, s.table, s.tiles, s.segs, 1])


def long_expand(s, ch=4, depth=None, minb=1, ntw=4):
    # kernels/sgmv.cu's expand for long segments (as cuda/mod.rs launches it for one part), or
    # its probe instance with `ch` chunks of 8 * `ntw` columns a block, `depth` of them in
    # registers at once, launch bounds of `minb` blocks an SM.
    kt = 1 << ((-(-s.rank // 32)) - 1).bit_length()
    name = (f"probe_expand_long_k{kt}_c{ch}_d{depth}_b{minb}_w{ntw}" if depth
            else f"sgmv_expand_long_bf16_k{kt}")
    launch(name, (-(-s.h_out // (8 * ntw * ch)), -(-s.ntiles // 4), 1),
           [s.v, s.rank, s.y, s.h_out, 0, 0, s.h_out, s.h_out, s.h_out, s.table, s.tiles, s.segs,
            1, s.ntiles])


def torch_pair(s):
    # Two cuBLAS GEMMs (identical workload only): a gauge of what a plain GEMM pair costs.
    vb = torch.mm(s.x, s.a[0].t())
    s.y.addmm_(vb, s.b[0].t())


def cublas_shrink(s):
    # cuBLAS's shrink (identical workload only) into v (f32): mm with an f32 result where torch
    # has it (`out_dtype`), else bf16 and a copy.
    try:
        torch.mm(s.x, s.a[0].t(), out_dtype=torch.float32, out=s.v)
    except TypeError:
        s.v.copy_(torch.mm(s.x, s.a[0].t()))


def tile_main():
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}; tile kernels, long segments")
    cases = [("identical", 512, 4096, 64), ("uniform", 512, 4096, 64), ("skewed", 512, 4096, 64),
             ("identical", 512, 4096, 16), ("uniform", 128, 4096, 64), ("skewed", 64, 8192, 64)]
    # `tile quick`: the 512-row r=64 cases, the operator and the long expand's shapes only.
    for wl, rows, h, r in (cases[:3] if "quick" in sys.argv else cases):
        lens = segment_lens(wl, rows)
        one = TileSet(lens, h, h, r)
        nsets = max(2, min(64, int(200e6 // one.nbytes())))
        sets = [one] + [TileSet(lens, h, h, r) for _ in range(nsets - 1)]
        nt, sp, groups = prod_shrink_plan(one)
        floor = one.nbytes() / 4186e9 * 1e6
        print(f"## {wl} rows {rows} h {h} r {r}: {len(lens)} segments, {one.ntiles} tiles; production shrink "
              f"n{nt} x {sp} splits x {groups} groups; {one.nbytes()/1e6:.1f} MB, floor {floor:.1f} us, {nsets} sets",
              flush=True)
        long_ok = one.ntiles >= 32 and rows >= 2 * one.ntiles  # cuda/plan.rs `expand_long`
        expand = long_expand if long_ok else prod_expand
        vs = [("both: production", "y", lambda s: (prod_shrink(s), expand(s))),
              ("both: production, tile expand", "y", lambda s: (prod_shrink(s), prod_expand(s)))]
        for sp2 in [None, 8, 12]:
            vs.append((f"shrink: splits {sp2 or sp}", "v", (lambda sp2: lambda s: prod_shrink(s, sp2))(sp2)))
        if nt == 8:
            for k, sps in [("probe_shrink_n8_u3_b3", [None, 12]), ("probe_shrink_n8_u2_b4", [12, 16]),
                           ("probe_shrink_n8_u4_b2", [8])]:
                for sp2 in sps:
                    vs.append((f"shrink: {k[13:]}, splits {sp2 or sp}", "v",
                               (lambda sp2, k: lambda s: prod_shrink(s, sp2, kernel=k))(sp2, k)))
            for k, sp2 in [("probe_shrink_n8_u3_b3", 12), ("probe_shrink_n8_u2_b4", 16)]:
                vs.append((f"both: shrink {k[13:]}, splits {sp2}, expand long", "y",
                           (lambda sp2, k: lambda s: (prod_shrink(s, sp2, kernel=k), long_expand(s)))(sp2, k)))
        vs += [("expand: tile w4", "y", lambda s: prod_expand(s)),
               ("expand: tile w8", "y", lambda s: prod_expand(s, 8)),
               ("expand: long segments", "y", long_expand)]
        shapes = ([(4, 4, 1, 4), (2, 2, 3, 4), (4, 2, 4, 2), (4, 2, 5, 2), (8, 2, 4, 2)] if r > 32
                  else [(8, 8, 1, 4)])
        for ch, depth, minb, ntw in shapes:
            vs.append((f"expand: long, {ch} x {8 * ntw} columns, {depth} ahead, {minb} blocks/SM", "y",
                       (lambda a: lambda s: long_expand(s, *a))((ch, depth, minb, ntw))))
            if "quick" in sys.argv and ntw == 2:
                vs.append((f"both: production shrink, long {ch} x {8 * ntw}, {minb} blocks/SM", "y",
                           (lambda a: lambda s: (prod_shrink(s), long_expand(s, *a)))((ch, depth, minb, ntw))))
        if "quick" in sys.argv:
            vs = [v for v in vs if v[0].startswith(("both: production", "expand: long"))]
        if wl == "identical":
            vs.append(("both: torch mm + addmm (cuBLAS)", "y", torch_pair))
            if "quick" in sys.argv:
                vs.append(("shrink: production", "v", lambda s: prod_shrink(s)))
            vs += [("shrink: cuBLAS into f32 v", "v", cublas_shrink),
                   ("both: cuBLAS shrink, expand long", "y", lambda s: (cublas_shrink(s), long_expand(s)))]
        for name, what, fn in vs:
            for st in sets:
                st.v.copy_(st.vref)
            out = (lambda st: st.v) if what == "v" else (lambda st: st.y)
            try:
                us, got, y0 = bench(sets, fn, out=out)
            except SystemExit as e:
                print(f"  {name}: failed: {e}", flush=True)
                continue
            ref = one.vref if what == "v" else one.reference(y0)
            err = ((got - ref).norm() / ref.norm()).item()
            print(f"  {name:48s} {us:8.2f} us  rel err {err:.1e}", flush=True)


def tile_ncu_main():
    # Plain launches for a profiler: identical 512 rows r=64, the tile kernels and the long expand.
    s = TileSet([512], 4096, 4096, 64)
    for _ in range(2):
        prod_shrink(s)
        prod_expand(s)
        prod_shrink(s, 16)
        long_expand(s)
    torch.cuda.synchronize()


MODES = {
    "fusedmma": fused_mma_main, "fusedc3": fused_c3_main, "fusedxa": fused_xa_main, "trace": trace_main,
    "gemm": gemm_main, "silu": silu_main, "read": read_main, "ncu": ncu_main,
    "fusedwhy": fused_why_main,
    "fusedgrid": fused_grid_main, "fused": fused_main, "tile": tile_main, "tilencu": tile_ncu_main,
}


def main():
    if len(sys.argv) > 1 and sys.argv[1] in MODES:
        return MODES[sys.argv[1]]()
    print(f"# device {torch.cuda.get_device_name(0)}, {SMS} SMs, nvrtc {nvrtc_path}")
    cfgs = []
    for ssb in [16384, 32768]:
        for sst in [2, 4]:
            for esb in [16384, 32768]:
                for est in [2, 4]:
                    for bps in [2, 3, 4]:
                        if 4608 + max(sst * ssb + 16384, est * esb) > 227 * 1024 // bps:
                            continue
                        cfgs.append(dict(ssb=ssb, sst=sst, esb=esb, est=est, sbps=bps, ebps=bps))
    quick = [c for c in cfgs if c["ssb"] == c["esb"] and c["sst"] == c["est"]]

    def lab(c):
        return f"stream s{c['ssb']//1024}kx{c['sst']} e{c['esb']//1024}kx{c['est']} bps{c['sbps']}"

    for (rows, h, r) in ([] if "expand" in sys.argv else [(64, 4096, 16), (512, 4096, 16), (32, 4096, 64), (128, 4096, 64), (512, 4096, 64), (64, 8192, 64)]):
        vs = [("old row kernels", lambda s: old_ops(s, False))]
        if "stream" in sys.argv:
            for c in quick[:2]:
                for fl in [0, 8]:
                    c2 = dict(c, flags=fl)
                    vs.append((lab(c2) + f" flags{fl}", (lambda c: lambda s: stream_ops(s, False, c))(c2)))
        for ev in ROW_VARIANTS:
            vs.append((f"rows: expand k{ev[0]} w{ev[1]} b{ev[2]}", (lambda ev: lambda s: row_ops(s, False, ev=ev))(ev)))
        for (nw, mb, g) in GS_VARIANTS:
            vs.append((f"rows: grid-stride expand w{nw} b{mb} {g}", (lambda nw, mb, g: lambda s: gs_ops(s, False, nw, mb, g))(nw, mb, g)))
        for sv in SHRINK_VARIANTS:
            vs.append((f"rows: shrink k{sv[0]} w{sv[1]} b{sv[2]}", (lambda sv: lambda s: row_ops(s, False, sv=sv))(sv)))
        run_case("shrink+expand distinct", rows, h, [h], r, False, vs)
    # Engine-like expand only (v of the activations' type): 7B batch 32, r=16.
    for nm, parts in [("q|k|v", [4096] * 3), ("o", [4096]), ("gate|up", [11008] * 2), ("down", [4096])]:
        vs = [("old row expand", lambda s: old_ops(s, True, shrink=False))]
        for ev in ROW_VARIANTS:
            vs.append((f"rows: expand k{ev[0]} w{ev[1]} b{ev[2]}", (lambda ev: lambda s: row_ops(s, True, ev=ev, shrink=False))(ev)))
        for (nw, mb, g) in GS_VARIANTS:
            vs.append((f"rows: grid-stride expand w{nw} b{mb} {g}", (lambda nw, mb, g: lambda s: gs_ops(s, True, nw, mb, g, shrink=False))(nw, mb, g)))
        if "stream" in sys.argv:
            for (esb, est, bps, nw) in [(16384, 2, 3, 4), (16384, 3, 2, 4)]:
                for flags in [0, 8]:
                    c = dict(esb=esb, est=est, ebps=bps, nw=nw, flags=flags)
                    vs.append((f"stream e{esb//1024}kx{est} bps{bps} w{nw} flags{flags}",
                               (lambda c: lambda s: stream_ops(s, True, c, shrink=False))(c)))
        run_case(f"expand {nm}", 32, 4096 if nm != "down" else 11008, parts, 16, True, vs)

main()
