"""The least time Muon's step can take on a GPU with the current design, per preset (arithmetic, any machine).

The design: Newton–Schulz runs one GEMM per launch (Gram A = X Xᵀ, B = b A + c A², X ← a X + B X, every
operand and result in HBM between launches; cuBLAS or Triton alike), and the state kernels (momentum
before NS, update after it) stream the optimizer state. For each NS product the floor is the larger of
its FLOPs at the bf16 matmul ceiling and its least HBM traffic at the copy ceiling (each operand read
once, the result written once; the D of "+ beta D" assumed an L2 hit), summed over the preset's blocks
and steps. Its HBM traffic and the state's at the copy ceiling bound it whatever runs concurrently (traffic
does not hide under traffic); also given with only X's traffic (A and B kept in L2 between launches).
The state floor is its bytes per Muon element at the copy ceiling: read the fp32 grad (4),
read and write the bf16 momentum (2 + 2), write the bf16 NS input (2), read the NS output (2), read and
write the fp32 param (4 + 4) = 20 bytes; 16 if NS's input and output never touched HBM.
The budget for the issue's goal (optimizer ≤ 5% of the step) is 0.05 / 0.95 of forward+backward, read
from a train-step result file.

    python benchmarks/scripts/muon_floor.py --train-step benchmarks/results/s19_train_step_auto_1_h100.json \
        [--matmul-tflops 797 --copy-gbps 3002] [--json out.json]

The default ceilings are the H100's best measured ones (`python -m moespeed.bench.muon`, its ceiling
rows: 8192³ bf16 matmul 797 TFLOP/s in s7_muon_norm.json, fp32 copy 3,002-3,006 GB/s read + write).
"""
import argparse
import collections
import json
import math

from moespeed.bench.muon import preset_shapes

STATE_BYTES = 20  # per Muon element and step (see the docstring)
STATE_BYTES_FUSED = 16  # the same without NS's bf16 input and output


def ns_products(rows: int, cols: int) -> list[tuple[str, int, int]]:
    """(name, FLOPs, least HBM bytes) of the three bf16 products of one NS step on a (rows, cols) block;
    m = the short side, n = the long one."""
    m, n = min(rows, cols), max(rows, cols)
    return [("gram", 2 * m * m * n, 2 * (m * n + m * m)),  # read X, write A
            ("b A + c A^2", 2 * m**3, 2 * 2 * m * m),  # read A (D = A from L2), write B
            ("a X + B X", 2 * m * m * n, 2 * (m * m + 2 * m * n))]  # read B and X (D = X from L2), write X


def floor(preset: str, steps: int, matmul_flops: float, copy_bytes: float) -> dict:
    """The preset's Muon floor in ms: NS (roofline per product), state, and the NS FLOPs and bytes."""
    blocks, numel = collections.Counter(), 0
    for shape in preset_shapes(preset):
        numel += math.prod(shape)
        blocks[shape[-2:]] += math.prod(shape[:-2])  # stacked experts: one block each
    ns_ms = flops = traffic = x_traffic = 0.0
    for (rows, cols), count in blocks.items():
        x_traffic += count * steps * 3 * 2 * rows * cols  # X read by two products, written by one; bf16
        for _, f, b in ns_products(rows, cols):
            ns_ms += count * steps * max(f / matmul_flops, b / copy_bytes) * 1e3
            flops += count * steps * f
            traffic += count * steps * b
    state_ms = STATE_BYTES * numel / copy_bytes * 1e3
    return {"preset": preset, "muon_elements": numel, "ns_steps": steps, "ns_tflop": flops / 1e12,
            "ns_gb": traffic / 1e9, "ns_x_gb": x_traffic / 1e9, "ns_compute_ms": flops / matmul_flops * 1e3,
            "ns_traffic_ms": traffic / copy_bytes * 1e3, "ns_floor_ms": ns_ms, "state_floor_ms": state_ms,
            "state_floor_fused_ms": STATE_BYTES_FUSED * numel / copy_bytes * 1e3, "floor_ms": ns_ms + state_ms,
            # HBM traffic cannot hide under HBM traffic: whatever runs concurrently, the design moves these bytes
            "hbm_floor_ms": traffic / copy_bytes * 1e3 + state_ms,
            # the same if every A and B stayed in L2 between launches (only X's traffic left)
            "hbm_x_only_floor_ms": x_traffic / copy_bytes * 1e3 + state_ms,
            "blocks": {f"{r}x{c}": n for (r, c), n in blocks.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-step", required=True, help="a moespeed.bench.train_step result JSON (Muon rows)")
    parser.add_argument("--matmul-tflops", type=float, default=797.0)
    parser.add_argument("--copy-gbps", type=float, default=3002.0, help="read + write bytes per second of a copy")
    parser.add_argument("--steps", type=int, default=4, help="NS steps (the small presets run 4)")
    parser.add_argument("--json")
    args = parser.parse_args()
    with open(args.train_step) as f:
        measured = json.load(f)
    rows = []
    for result in measured["results"]:
        preset, optimizer = result["bench"].split(".")[1:3]
        if optimizer != "muon":
            continue
        row = floor(preset, args.steps, args.matmul_tflops * 1e12, args.copy_gbps * 1e9)
        row.update(device=measured["device"], measured_optimizer_ms=result["optimizer_ms"],
                   fwd_bwd_ms=result["fwd_bwd_ms"], budget_ms=0.05 / 0.95 * result["fwd_bwd_ms"])
        rows.append(row)
        print(f"{preset} ({measured['device']}): budget {row['budget_ms']:.2f} ms (5% of the step); measured "
              f"{row['measured_optimizer_ms']:.2f} ms; HBM traffic alone {row['hbm_floor_ms']:.2f} ms "
              f"({row['hbm_x_only_floor_ms']:.2f} with A and B in L2); floor {row['floor_ms']:.2f} ms = NS {row['ns_floor_ms']:.2f} "
              f"({row['ns_tflop']:.3f} TFLOP: {row['ns_compute_ms']:.2f} ms of compute; {row['ns_gb']:.2f} GB: "
              f"{row['ns_traffic_ms']:.2f} ms of traffic) + state {row['state_floor_ms']:.2f} "
              f"({row['state_floor_fused_ms']:.2f} with NS's input and output on chip)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/scripts/muon_floor.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json" and v is not None),
                "matmul_tflops": args.matmul_tflops, "copy_gbps": args.copy_gbps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
