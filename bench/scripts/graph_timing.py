"""Shared by the torch probes: time a function of `layers` launches as one CUDA graph."""
import torch


def timed(fn, layers, reps=20):
    """Microseconds per layer of `fn` (which issues `layers` layers' work), captured into one
    CUDA graph after a warm-up on a side stream and replayed `reps` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / layers * 1000.0
