"""Muon step on small-moe's parameters with the small presets' NS settings (4 Polar Express steps):
time per step with and without side streams and with fp32 / bf16 momentum, and the kernel-time
breakdown (side streams off, fp32 momentum). CUDA only:

    PYTHONPATH=$PWD python benchmarks/scripts/muon_step_profile.py   # session 10: s10_muon_step_profile.txt
The timed loop runs optimizer steps back to back, so CPU launch time shows up in it (the train
step hides it behind the backward); the profile's CUDA times are GPU work alone.
"""
import torch
from torch.profiler import profile, ProfilerActivity
from moespeed.bench import muon as B
from moespeed.optim.muon import Muon
from moespeed.optim.polar_express import polar_express_coefficients
from moespeed.config import Config
tc = Config().train
coef = polar_express_coefficients(4, tc.muon_ns_lowest)
dev = torch.device("cuda")
for preset in ("small-moe",):
    for streams in (0, None):
        for mdt in (torch.float32, torch.bfloat16):
            params = B._make(B.preset_shapes(preset), dev)
            opt = Muon(params, **{**B.HP, **B.OURS, "streams": streams, "ns_steps": 4, "ns_coefficients": coef,
                                  "momentum_dtype": mdt})
            for _ in range(3): opt.step()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10): opt.step()
            e.record(); torch.cuda.synchronize()
            print(f"{preset} streams={streams} momentum={mdt}: {s.elapsed_time(e)/10:.3f} ms per step (wall, GPU events)")
            if streams == 0 and mdt == torch.float32:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(2): opt.step()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
            del opt, params; torch.cuda.empty_cache()
