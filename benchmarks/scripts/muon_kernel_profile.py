"""GPU kernel-time breakdown of one Muon step (small, small-moe params), streams off for clean attribution.

CUDA only. From the repository root: PYTHONPATH=$PWD python benchmarks/scripts/muon_kernel_profile.py
(prints the tables (saved as benchmarks/results/s7_muon_kernel_profile*.txt)).
"""
import torch
from torch.profiler import profile, ProfilerActivity
from moespeed.bench import muon as B
from moespeed.optim.muon import Muon
dev = torch.device("cuda")
for preset in ("small", "small-moe"):
    params = B._make(B.preset_shapes(preset), dev)
    opt = Muon(params, **{**B.HP, **B.OURS, "streams": 0})
    for _ in range(3): opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2): opt.step()
        torch.cuda.synchronize()
    print(preset, "(2 steps, streams 0)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
