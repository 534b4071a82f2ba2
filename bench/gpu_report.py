"""
The report of scripts/gpu_check.sh: reads the steps' exit codes, JSON results and logs in its work folder and
writes two files to the output folder (a lent GPU machine sends back only a few): gpu_check.json (every
result, and the last lines of every step's log) and summary.md (the figures and the project's targets).

    python bench/gpu_report.py WORK_DIR [OUT_DIR]     # OUT_DIR defaults to WORK_DIR
"""

import json
import os
import sys

TARGETS = ("Triton >= 1.10x grouped_mm forward+backward at the release's layer; emo_small >= 420k tokens/s on "
           "one H100; EMO step time within 5% of the standard MoE's")


def read_json(folder, name):
    path = os.path.join(folder, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def steps(folder):
    """[(name, exit code, seconds)] in the order they ran (exit 124: past its time limit)."""
    with open(os.path.join(folder, "steps.txt")) as f:
        return [(name, int(rc), int(s)) for name, rc, s in (line.split() for line in f if line.strip())]


def log_tail(folder, name, n_lines=40):
    """The last n_lines of a step's log: enough to see why it failed."""
    path = os.path.join(folder, name + ".log")
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n_lines:])


def throughput_lines(name, result):
    if result is None:
        return [f"| {name} | no result | | | |"]
    lines = []
    for router, r in result["routers"].items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        lines.append(f"| {name} ({router}, compile {result['compile']}) | {r['tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.1f} | {mfu} | {r['first_step_s']:.1f} |")
    lines.append(f"| {name}: EMO / std step time | {result['emo_over_std_step_time']:.3f} | | | |")
    return lines


def kernel_lines(result):
    if result is None:
        return ["no kernel benchmark result"]
    lines = [f"device {result['device']}, {result['dtype']}", "",
             "| shape | path | ms (fwd+bwd) | TFLOP/s | x grouped_mm |", "|---|---|---|---|---|"]
    for shape, r in result["shapes"].items():
        for path, ms in r["ms"].items():
            lines.append(f"| {shape} | {path} | {ms:.2f} | {r['tflops'][path]:.1f} | "
                         f"{r['speedup_vs_grouped_mm'][path]:.2f} |")
        lines.append(f"| {shape} | whole MoE layer (EMO router) | {r['moe_layer_ms']:.2f} | | |")
    return lines


def main():
    folder = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else folder
    os.makedirs(out, exist_ok=True)
    names = ("kernels", "small", "small_compiled", "full_slice", "full_slice_compiled")
    results = {name: read_json(folder, name) for name in names}
    ran = steps(folder)
    lines = ["# scripts/gpu_check.sh", "", f"Targets: {TARGETS}.", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {rc}{' (time limit)' if rc == 124 else ''} | {s} |" for name, rc, s in ran]
    lines += ["", "## Expert kernels", ""] + kernel_lines(results["kernels"])
    lines += ["", "## Training throughput", "", "| run | tokens/s | ms/step | MFU | first step (s) |",
              "|---|---|---|---|---|"]
    for name in names[1:]:
        if name in {n for n, _, _ in ran}:
            lines += throughput_lines(name, results[name])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    logs = {name: log_tail(folder, name) for name, _, _ in ran}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"steps": ran, **results, "logs": logs}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
