# Whether kernels/<file> compiles to the same PTX at two git revisions (NVRTC, sm_90a), apart from
# line info and label names: a change that leaves it so needs no new GPU run. libnvrtc from the
# CUDA toolkit or `pip install nvidia-cuda-nvrtc` (then LD_LIBRARY_PATH to its lib folder).
# Usage: python3 bench/scripts/ptx_same.py REV_A [REV_B|worktree] [sgmv.cu]
import ctypes
import re
import subprocess
import sys


def source(rev, path):
    if rev == "worktree":
        return open(path).read()
    return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def ptx(rev, name):
    lib = ctypes.CDLL("libnvrtc.so.13")
    src = source(rev, "kernels/common.cuh") + "\n" + source(rev, f"kernels/{name}")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None) == 0
    opts = [b"--gpu-architecture=sm_90a", b"--std=c++17"]
    if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) != 0:
        raise SystemExit(f"{rev}: {name} does not compile")
    n = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, buf)
    text = re.sub(r"\.loc.*\n", "", buf.value.decode())
    text = re.sub(r"\$L__BB\d+_\d+", "L", text)
    return re.sub(r"WAIT_\d+", "W", text)


def main():
    a = sys.argv[1]
    b = sys.argv[2] if len(sys.argv) > 2 else "worktree"
    name = sys.argv[3] if len(sys.argv) > 3 else "sgmv.cu"
    same = ptx(a, name) == ptx(b, name)
    print(f"kernels/{name}: {a} and {b} give {'the same' if same else 'different'} PTX")
    sys.exit(0 if same else 1)


main()
