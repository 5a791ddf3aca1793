"""CPU time of one Muon step on CUDA (small-moe params) with the GPU kept busy, then a cProfile of 2 steps."""
import cProfile, pstats, time, torch
from moespeed.bench import muon as B
from moespeed.optim.muon import Muon
dev = torch.device("cuda")
for preset in ("small-moe",):
    params = B._make(B.preset_shapes(preset), dev)
    opt = Muon(params, **B.HP, **B.OURS)
    for _ in range(3): opt.step()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # keep the GPU busy: CPU time only
    t = time.perf_counter()
    for _ in range(2): opt.step()
    print(preset, "CPU ms/step", (time.perf_counter() - t) / 2 * 1e3, flush=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2): opt.step()
    pr.disable(); torch.cuda.synchronize()
    st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(30); st.sort_stats("cumtime").print_stats(30)
