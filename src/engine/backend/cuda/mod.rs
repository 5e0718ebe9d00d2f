//! The CUDA backend (cudarc, NVRTC-compiled kernels from kernels/, cuBLAS).
