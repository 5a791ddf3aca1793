"""Summarize a torch.profiler chrome trace: GPU idle gaps and what the CPU was doing, host syncs."""
import json, sys, collections, bisect
tr = json.load(open(sys.argv[1]))
ev = [e for e in tr["traceEvents"] if e.get("ph") == "X"]
kern = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
busy = []
for s, t in kern:
    if busy and s <= busy[-1][1]:
        busy[-1][1] = max(busy[-1][1], t)
    else:
        busy.append([s, t])
t0, t1 = busy[0][0], busy[-1][1]
busy_us = sum(t - s for s, t in busy)
print(f"window {(t1-t0)/1e3:.1f} ms, GPU busy {busy_us/1e3:.1f} ms ({busy_us/(t1-t0):.0%})")
cpu = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")]
main_tid = collections.Counter(e["tid"] for e in cpu if e.get("cat") == "cpu_op").most_common(1)[0][0]
cpu = sorted([e for e in cpu if e["tid"] == main_tid], key=lambda e: e["ts"])
starts = [e["ts"] for e in cpu]
def stack_at(ts):
    i = bisect.bisect_right(starts, ts)
    out = [e for e in cpu[max(0, i - 3000):i] if e["ts"] + e["dur"] >= ts]
    return out
top = collections.Counter(); inner = collections.Counter(); n = 0
for (s0, e0), (s1, e1) in zip(busy, busy[1:]):
    gap = s1 - e0
    if gap < 30:
        continue
    n += 1
    st = stack_at(e0 + gap / 2)
    ann = [e["name"] for e in st if e.get("cat") == "user_annotation"]
    top[(ann[0] if ann else "-")[:60]] += gap
    inner[(st[-1]["name"] if st else "-")[:70]] += gap
print(f"{n} gaps >= 30 us, {sum(top.values())/1e3:.1f} ms in all; by outermost annotation:")
for k, v in top.most_common(12): print(f"  {v/1e3:8.2f} ms  {k}")
print("by innermost CPU event mid-gap:")
for k, v in inner.most_common(25): print(f"  {v/1e3:8.2f} ms  {k}")
syncs = collections.Counter(); syncn = collections.Counter()
for e in cpu:
    if e.get("cat") in ("cuda_runtime", "cuda_driver") and ("Synchronize" in e["name"] or "Memcpy" in e["name"]) and e["dur"] > 20:
        st = [x["name"] for x in stack_at(e["ts"] + 1) if x.get("cat") == "cpu_op"]
        key = (e["name"], "/".join(st[-3:])[:110]); syncs[key] += e["dur"]; syncn[key] += 1
print("host-blocking runtime calls > 20 us:")
for k, v in syncs.most_common(15): print(f"  {v/1e3:8.2f} ms  x{syncn[k]}  {k}")
ann = collections.Counter(); 
for e in cpu:
    if e.get("cat") == "user_annotation": ann[e["name"][:60]] += e["dur"]
print("CPU time of annotations:")
for k, v in ann.most_common(12): print(f"  {v/1e3:8.2f} ms  {k}")
