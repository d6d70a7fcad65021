"""``python -m benchmarks --device cuda|cpu [--quick]``: run everything, write JSON, markdown and plots.

Run from the repository root. ``--quick`` uses tiny models and few repetitions (the CI smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from configs: never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["main"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parse(argv: list) -> argparse.Namespace:
    from .models import MODELS

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if _cuda() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, help="timed repetitions (default 21; quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up repetitions (default 2; quick: 1)")
    parser.add_argument("--models", nargs="*", choices=[m.name for m in MODELS] + ["none"],
                        help="default: all; 'none': only the scaling sweep")
    parser.add_argument("--scaling", type=int, nargs="*",
                        help="norm-layer counts of the scaling sweep (default 10 100 1000 10000; quick: 10 100 1000;"
                             " 0: skip)")
    parser.add_argument("--serving", type=int, metavar="N",
                        help="adapters loaded one after another into one ResNet-50 (default 50; quick: 10; 0: skip)")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<device>[-quick])")
    parser.add_argument("--render", metavar="RESULTS_JSON", nargs="+",
                        help="measure nothing: rewrite results.md and the plots from results.json file(s) "
                             "(several: models and scaling points are merged, the first one's stamp is kept)")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _render(paths: list, out_dir: str) -> int:
    from .report import check_targets, render_markdown, render_plots

    results = None
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if results is None:
            results = part
            continue
        results["models"] += [m for m in part["models"] if m["name"] not in {x["name"] for x in results["models"]}]
        known = {e["norm_layers"] for e in results["scaling"]}
        results["scaling"] = sorted(results["scaling"] + [e for e in part["scaling"] if e["norm_layers"] not in known],
                                    key=lambda e: e["norm_layers"])
        results["serving"] = results.get("serving") or part.get("serving")
        results.setdefault("merged_from", []).append(part["meta"])
    results["targets"] = check_targets(results)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(render_markdown(results))
    render_plots(results, out_dir)
    print(f"rendered {out_dir}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.render:
        return _render(args.render, args.out or os.path.dirname(os.path.abspath(args.render[0])))
    import torch

    from .env import machine_stamp, scratch_dir
    from .models import MODELS
    from .report import check_targets, render_markdown, render_plots
    from .run import run_model, run_scaling
    from .serving import run_serving

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        # Deterministic kernels, so a bitwise-equal reload shows as max |Δ logits| = 0.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    reps = args.reps if args.reps is not None else (3 if args.quick else 21)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    sizes = args.scaling if args.scaling is not None else ([10, 100, 1000] if args.quick else [10, 100, 1000, 10000])
    specs = [m for m in MODELS if not args.models or m.name in args.models]
    sizes = [n for n in sizes if n > 0]
    out_dir = args.out or os.path.join(RESULTS_DIR, args.device + ("-quick" if args.quick else ""))
    os.makedirs(out_dir, exist_ok=True)

    started = time.perf_counter()
    results = {"meta": machine_stamp(device, argv), "settings": {}, "models": [], "scaling": [], "targets": []}
    print(json.dumps(results["meta"], indent=1), flush=True)

    def write() -> None:
        results["targets"] = check_targets(results)
        results["settings"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(render_markdown(results))

    with scratch_dir(min_free_gib=2 if args.quick else 12) as scratch:
        results["settings"] = {
            "device": args.device, "quick": args.quick, "reps": reps, "warmup": warmup,
            "scratch": "RAM (/dev/shm)" if scratch.startswith("/dev/shm") else "disk (temp folder)",
            "cudnn_deterministic": device.type == "cuda",
        }
        for spec in specs:
            results["models"].append(run_model(spec, args.quick, device, reps, warmup, scratch))
            write()
        if sizes:
            def progress(entry: dict) -> None:
                results["scaling"].append(entry)
                write()

            run_scaling(sizes, device, reps, warmup, scratch, progress=progress)
            write()
        serving = args.serving if args.serving is not None else (10 if args.quick else 50)
        if serving:
            resnet = next(m for m in MODELS if m.name == "resnet50")
            results["serving"] = run_serving(resnet, args.quick, device, 2 if args.quick else 5, scratch, serving)
            write()
    write()
    plots = render_plots(results, out_dir)
    print(render_markdown(results), flush=True)
    print(f"wrote {out_dir}/results.json, results.md, " + ", ".join(os.path.basename(p) for p in plots))
    print(f"elapsed {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
