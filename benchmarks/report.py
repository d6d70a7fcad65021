"""Turn the results record into the markdown report, the target check and the PNG plots."""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["check_targets", "render_markdown", "render_plots"]

STRATEGY_LABELS = {
    "stock": "stock PEFT",
    "workaround": "PEFT + modules_to_save",
    "peft_buffers": "peft_buffers",
    "full": "full checkpoint",
}
# The targets (benchmarks/README.md): what exactness may cost.
LOAD_TOLERANCE, LOAD_FLOOR_MS = 0.03, 3.0  # a load of a file with extra state: <= max(3% of stock, 3 ms)
SAVE_TOLERANCE, SAVE_FLOOR_MS = 0.05, 4.0  # a save: <= max(5% of stock, 4 ms)
STOCK_FILE_LIMIT_MS = 1.0  # from_pretrained of a stock file with enable(): <= stock + 1 ms
SCALING_FACTOR, SCALING_SLACK_MS = 1.2, 1.0  # scaling: overhead <= 1.2 x reading/writing the extra tensors + 1 ms
SERVING_GROWTH, SERVING_TOLERANCE = 1.10, 0.03  # 50th load <= 1.1 x the first, and <= stock's 50th + 3%
ZERO_EXTRA_MODELS = ("convnext_tiny", "llama_1b")
ATTACH_LIMIT_MS, ATTACH_MODELS = 2.0, ("llama_1b",)  # attaching to the 1.1B bf16 model adds <= 2 ms
# issue 20: the base identity of the 1.1B bf16 model in <= 2 ms on the GPU; on the CPU <= 1.2x reading its bytes
IDENTITY_GPU_LIMIT_MS, IDENTITY_MODELS, IDENTITY_CPU_FLOOR_RATIO = 2.0, ("llama_1b",), 1.2
ATTACH_CALLS = {"get_peft_model": "get_peft_model", "from_pretrained": "PeftModel.from_pretrained (stock file)"}


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "–"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


def _ms(stats: dict) -> str:
    return f"{stats['median']:.1f} ({stats['min']:.1f}–{stats['max']:.1f})"


def _pct(value: float, reference: float) -> str:
    return f"{(value / reference - 1) * 100:+.1f}%"


def _dlogits(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return "0" if x == 0 else f"{x:.3g}"


def ratio_ci(runs: list, reference_runs: list, draws: int = 2000, seed: int = 0) -> tuple:
    """95% bootstrap interval of median(runs) / median(reference_runs) - 1 (runs resampled independently)."""
    import random
    import statistics

    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(runs, k=len(runs))) / statistics.median(rng.choices(reference_runs,
                                                                                      k=len(reference_runs))) - 1
        for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def _worse(overhead: dict) -> float:
    # Met only when both the difference of medians and the median of paired differences are within the bar:
    # on a noisy machine either alone can flatter.
    return max(overhead["median_difference"], overhead["paired_median"])


def paired_change(runs: list, reference_runs: list) -> float:
    """Median over repetitions of run / reference run - 1: both ran in the same repetition, so slow phases of
    the machine (which hit every strategy of a repetition alike) cancel out."""
    import statistics

    return statistics.median(a / b - 1 for a, b in zip(runs, reference_runs))


# ----------------------------------------------------------------------------------------------- targets


def check_targets(results: dict) -> list:
    """One row per target and model: what was measured, the bar, and whether it was met."""
    rows = []

    def add(target: str, model: str, measured: str, bar: str, met: bool) -> None:
        rows.append({"target": target, "model": model, "measured": measured, "bar": bar, "met": bool(met)})

    for m in results["models"]:
        strategies = m["strategies"]
        if "peft_buffers" not in strategies or "stock" not in strategies:
            continue
        ours, stock, extra = strategies["peft_buffers"], strategies["stock"], m["extra_state"]
        over = ours["file_bytes"] - extra["floor_bytes"]
        add("file bytes = the floor (stock + the extra tensors and their header entries)", m["label"],
            f"{over:+d} B over the floor", "0 B", over == 0)
        for what, tolerance, floor_ms in (("load", LOAD_TOLERANCE, LOAD_FLOOR_MS),
                                          ("save", SAVE_TOLERANCE, SAVE_FLOOR_MS)):
            mine, theirs = ours[f"{what}_ms"], stock[f"{what}_ms"]
            overhead = mine["median"] - theirs["median"]
            bar = max(tolerance * theirs["median"], floor_ms)
            low, high = ratio_ci(mine["runs"], theirs["runs"])
            paired = paired_change(mine["runs"], theirs["runs"])
            add(f"{what} overhead ≤ max({tolerance:.0%} of stock, {floor_ms:g} ms)", m["label"],
                f"{overhead:+.1f} ms ({overhead / theirs['median'] * 100:+.1f}%; 95% CI {low * 100:+.1f} … "
                f"{high * 100:+.1f}%; paired {paired * 100:+.1f}%)", f"≤ {bar:.1f} ms", overhead <= bar)
        added = ours["added_trainable_params"]
        add("no added trainable parameters", m["label"], f"{added:+d}", "0", added == 0)
        if m["name"] in ZERO_EXTRA_MODELS:
            same = extra["identical_to_stock_save"]
            add("zero extra bytes (byte-identical file)", m["label"],
                f"{ours['extra_bytes_over_stock']:+d} B, identical: {same}", "0 B, identical", same)
        add("reloaded logits equal the trained model's", m["label"], _dlogits(ours.get("max_abs_dlogits")),
            "0", ours.get("max_abs_dlogits") == 0)
        if "attach" in m:
            overhead = m["attach"]["from_pretrained"]["overhead_ms"]
            add(f"a stock file with enable(): from_pretrained ≤ stock + {STOCK_FILE_LIMIT_MS:g} ms", m["label"],
                f"{overhead['median_difference']:+.2f} ms (paired {overhead['paired_median']:+.2f} ms)",
                f"≤ {STOCK_FILE_LIMIT_MS:g} ms", _worse(overhead) <= STOCK_FILE_LIMIT_MS)
        if m["name"] in ATTACH_MODELS and "attach" in m:
            for call, label in ATTACH_CALLS.items():
                overhead = m["attach"][call]["overhead_ms"]
                add(f"{label}: enable() adds ≤ {ATTACH_LIMIT_MS:g} ms", m["label"],
                    f"{overhead['median_difference']:+.2f} ms (paired {overhead['paired_median']:+.2f} ms)",
                    f"≤ {ATTACH_LIMIT_MS:g} ms", _worse(overhead) <= ATTACH_LIMIT_MS)
        identity = m.get("base_identity")
        if identity is not None and results["settings"].get("device") == "cuda" and m["name"] in IDENTITY_MODELS:
            add(f"base identity ≤ {IDENTITY_GPU_LIMIT_MS:g} ms", m["label"], _ms2(identity["identity"]),
                f"≤ {IDENTITY_GPU_LIMIT_MS:g} ms", identity["identity"]["median"] <= IDENTITY_GPU_LIMIT_MS)
        elif identity is not None and results["settings"].get("device") == "cpu":
            add(f"base identity ≤ {IDENTITY_CPU_FLOOR_RATIO:g} × reading the bytes", m["label"],
                f"{identity['identity_over_floor']:.2f} ×", f"≤ {IDENTITY_CPU_FLOOR_RATIO:g} ×",
                identity["identity_over_floor"] <= IDENTITY_CPU_FLOOR_RATIO)
    for entry in results.get("scaling", []):
        for what in ("save", "load"):
            overhead = entry[f"{what}_overhead_ms"]
            bar = SCALING_FACTOR * overhead["extra_only_median"] + SCALING_SLACK_MS
            add(f"{what} overhead ≤ {SCALING_FACTOR:g} × the extra tensors alone + {SCALING_SLACK_MS:g} ms",
                f"{entry['norm_layers']:,} norm layers", f"{overhead['median_difference']:.1f} ms",
                f"≤ {bar:.1f} ms", overhead["median_difference"] <= bar)
    serving = results.get("serving")
    if serving:
        ours = serving["strategies"]["peft_buffers"]["load_ms"]
        stock = serving["strategies"]["stock"]["load_ms"]
        n = serving["adapters"]
        add(f"load #{n} ≤ {SERVING_GROWTH:g} × load #1", serving["model"], f"{ours[-1]:.1f} / {ours[0]:.1f} ms",
            f"≤ {SERVING_GROWTH * ours[0]:.1f} ms", ours[-1] <= SERVING_GROWTH * ours[0])
        add(f"load #{n} ≤ stock's load #{n} + {SERVING_TOLERANCE:.0%}", serving["model"],
            f"{ours[-1]:.1f} vs {stock[-1]:.1f} ms", f"≤ {(1 + SERVING_TOLERANCE) * stock[-1]:.1f} ms",
            ours[-1] <= (1 + SERVING_TOLERANCE) * stock[-1])
    return rows


def _stamp_lines(meta: dict) -> list:
    if meta.get("gpu"):
        machine = (
            f"{meta['gpu']} ({meta.get('gpu_memory_gib')} GiB), driver {meta.get('driver')}, CUDA {meta.get('cuda')}, "
            f"cuDNN {meta.get('cudnn')}; CPU {meta['cpu']} ×{meta['cpu_count']}"
        )
    else:
        machine = f"CPU only: {meta['cpu']} ×{meta['cpu_count']} ({meta['torch_threads']} torch threads)"
    commit = meta.get("git_commit") or "unknown"
    return [
        f"- **Machine:** {machine}",
        f"- **Software:** torch {meta['torch']}, peft {meta['peft']}, transformers {meta['transformers']}, "
        f"safetensors {meta['safetensors']}, peft_buffers {meta['peft_buffers']} (commit {commit}"
        f"{', dirty' if meta.get('git_dirty') else ''}), Python {meta['python']}",
        f"- **Date:** {meta['date_utc']}",
        f"- **Command:** `{meta['command']}`",
    ]


def _merged_lines(results: dict) -> list:
    lines = []
    for meta in results.get("merged_from", []):
        lines.append(
            f"- **Merged in:** `{meta['command']}` ({meta['date_utc']}, {meta.get('gpu') or meta['cpu']}, "
            f"peft_buffers sources {meta.get('peft_buffers_source_sha256')})"
        )
    if lines:
        lines.append(
            f"- peft_buffers sources of the first run: {results['meta'].get('peft_buffers_source_sha256')} "
            "(digest of peft_buffers/*.py)"
        )
    return lines


def headline_table(results: dict) -> list:
    """The README table: one row per model and strategy."""
    lines = [
        "| model | strategy | adapter file | over stock | over floor | trainable params (added) | peak train mem "
        "| save ms, median (min–max) | load ms, median (min–max) | load vs stock | max \\|Δ logits\\| |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results["models"]:
        strategies = m["strategies"]
        stock = strategies.get("stock")
        for name, s in strategies.items():
            peak = _bytes(s["peak_train_bytes"]) if s.get("peak_train_bytes") is not None else "–"
            added = s.get("added_trainable_params")
            trainable = f"{s['trainable_params']:,}" + (f" ({added:+,})" if added else "")
            vs_stock = _pct(s["load_ms"]["median"], stock["load_ms"]["median"]) if stock and name != "stock" else ""
            lines.append(
                f"| {m['label']} | {STRATEGY_LABELS[name]} | {_bytes(s['file_bytes'])} "
                f"| {_bytes(s.get('extra_bytes_over_stock'))} | {_bytes(s.get('bytes_over_floor'))} | {trainable} "
                f"| {peak} | {_ms(s['save_ms'])} | {_ms(s['load_ms'])} | {vs_stock} "
                f"| {_dlogits(s.get('max_abs_dlogits'))} |"
            )
    return lines


def _header_alone(extra: dict) -> Optional[int]:
    """Bytes a safetensors file holding only the extra tensors spends on its header (0 when there are none)."""
    if not extra.get("tensors"):
        return 0 if extra else None
    return extra["standalone_safetensors_bytes"] - extra["tensor_bytes"]


def readme_table(results: dict) -> list:
    """The condensed table the project README quotes."""
    lines = [
        "| model | strategy | file | over stock | added trainable | save ms | load ms | max \\|Δ logits\\| |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results["models"]:
        for name, s in m["strategies"].items():
            added = s.get("added_trainable_params")
            lines.append(
                f"| {m['label']} | {STRATEGY_LABELS[name]} | {_bytes(s['file_bytes'])} "
                f"| {'–' if name == 'stock' else _bytes(s.get('extra_bytes_over_stock'))} "
                f"| {'–' if name == 'stock' else f'{added:+,}' if added else '0'} "
                f"| {s['save_ms']['median']:.1f} | {s['load_ms']['median']:.1f} "
                f"| {_dlogits(s.get('max_abs_dlogits'))} |"
            )
    return lines


def attach_table(results: dict) -> list:
    """What enable() adds to building the PEFT model: get_peft_model and from_pretrained, stock vs peft_buffers."""
    models = [m for m in results["models"] if "attach" in m]
    if not models:
        return []
    lines = [
        "", "## Attach time", "",
        "`get_peft_model` on a fresh copy of the base, and `PeftModel.from_pretrained` of the stock file of the "
        "same trained model, with peft_buffers disabled (stock) and enabled; the copy is made outside the timed "
        "region. Same file for both, so the difference is what attaching costs.", "",
        "| model | call | runs | stock ms | peft_buffers ms | overhead (median difference) | paired |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        for call, label in ATTACH_CALLS.items():
            entry = m["attach"][call]
            lines.append(
                f"| {m['label']} | {label} | {entry['stock']['n']} | {_ms(entry['stock'])} "
                f"| {_ms(entry['peft_buffers'])} | {entry['overhead_ms']['median_difference']:+.2f} ms "
                f"| {entry['overhead_ms']['paired_median']:+.2f} ms |"
            )
    return lines


def _ms2(stats: dict) -> str:
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})"


def identity_table(results: dict) -> list:
    """What recording / checking the base identity costs, beside reading the base's bytes once."""
    models = [m for m in results["models"] if "base_identity" in m]
    if not models:
        return []
    lines = [
        "", "## Base identity", "",
        "What a save records and a load checks (`peft_buffers_base.json`): the fingerprint of every base tensor, "
        "its dtype and shape, the quantization. *floor*: one `sum` over each base tensor viewed as int64 (reading "
        "its bytes once); *fingerprints*: `peft_buffers.core.fingerprints` of the same tensors; *identity*: "
        "`live_identity(base)` as a load computes it (walk, base values, fingerprints, nothing kept); *kept*: "
        "the same with the fingerprints kept from the previous call (a second `load_adapter`).", "",
        "| model | tensors | bytes | floor ms | fingerprints ms | identity ms | kept ms | identity / floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        entry = m["base_identity"]
        lines.append(
            f"| {m['label']} | {entry['tensors']} | {_bytes(entry['bytes'])} | {_ms2(entry['floor'])} "
            f"| {_ms2(entry['fingerprints'])} | {_ms2(entry['identity'])} | {_ms2(entry['identity_kept'])} "
            f"| {entry['identity_over_floor']:.2f} × |"
        )
    return lines


def render_markdown(results: dict) -> str:
    meta, settings = results["meta"], results["settings"]
    lines = ["# peft_buffers benchmarks", ""]
    if settings.get("quick"):
        lines += ["> **Quick run** (tiny models, few repetitions): a smoke test, not figures to quote.", ""]
    lines += _stamp_lines(meta)
    lines += _merged_lines(results)
    lines += [
        f"- **Repetitions:** {settings['reps']} timed runs after {settings['warmup']} warm-up, strategies "
        f"interleaved (order rotated every repetition); save/load folder: {settings['scratch']}",
        "",
        "Models are random-init from transformers configs. *Floor* = the file stock PEFT would write if it carried "
        "the extra tensors (running statistics and trained direct parameters) under the same keys: the stock file of "
        "the same trained model + those tensors and their safetensors header entries; *over floor* is anything "
        "else written (0 B when nothing is). Load = `PeftModel.from_pretrained` onto "
        "a copy of the base already on the device (full checkpoint: `get_peft_model` + `safetensors.torch."
        "load_model`), synchronized. Peak train mem = peak allocated during "
        f"{results['models'][0]['train_steps'] if results['models'] else 0} AdamW steps, model copy included, "
        "over what was allocated before. max |Δ logits|: trained model vs reloaded one, eval mode.",
        "",
        "## Results",
        "",
    ]
    lines += headline_table(results)
    lines += [
        "", "## Models", "",
        "| model | base params | dtype | input | LoRA | workaround copies | extra state (peft_buffers) "
        "| extra tensor bytes | their safetensors header alone | byte-identical to stock |",
        "|---|---:|---|---|---|---|---|---:|---:|---|",
    ]
    for m in results["models"]:
        extra = m.get("extra_state", {})
        inputs = (f"{m['train_batch']}×{m['image_size']}² px" if "image_size" in m
                  else f"{m['train_batch']}×{m['seq_len']} tokens")
        carried = (f"{extra.get('running_stat_tensors', 0)} running-stat tensors, "
                   f"{extra.get('direct_param_tensors', 0)} direct params, "
                   f"{extra.get('other_buffer_tensors', 0)} other buffers")
        lines.append(
            f"| {m['label']} | {m['base_params']:,} | {m['dtype']} | {inputs} | r={m['lora_r']} on "
            f"{m['lora_targets']} modules | {m['workaround_modules']} ({m['workaround_note']}) | {carried} "
            f"| {_bytes(extra.get('tensor_bytes'))} | {_bytes(_header_alone(extra))} "
            f"| {extra.get('identical_to_stock_save', '–')} |"
        )
    lines += attach_table(results)
    lines += identity_table(results)
    if results.get("scaling"):
        lines += [
            "", "## Scaling: synthetic model with N BatchNorm1d layers", "",
            "One LoRA-targeted Linear + N BatchNorm1d(8). *extra only* = safetensors writing / reading exactly the "
            "extra tensors alone (`save_file` / `load_file`): what any carrier of them pays.", "",
            "| N | runs | extra tensors | stock file | peft_buffers file | save ms stock | save ms peft_buffers "
            "| save overhead | extra only | load ms stock | load ms peft_buffers | load overhead | extra only |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in results["scaling"]:
            sv, ld = e["save_ms"], e["load_ms"]
            lines.append(
                f"| {e['norm_layers']:,} | {sv['stock']['n']} | {e['extra_tensors']:,} "
                f"| {_bytes(e['file_bytes']['stock'])} "
                f"| {_bytes(e['file_bytes']['peft_buffers'])} | {_ms(sv['stock'])} | {_ms(sv['peft_buffers'])} "
                f"| {e['save_overhead_ms']['median_difference']:+.1f} | {sv['extra_only']['median']:.1f} "
                f"| {_ms(ld['stock'])} | {_ms(ld['peft_buffers'])} "
                f"| {e['load_overhead_ms']['median_difference']:+.1f} | {ld['extra_only']['median']:.1f} |"
            )
    serving = results.get("serving")
    if serving:
        ours, stock = serving["strategies"]["peft_buffers"], serving["strategies"]["stock"]
        n = serving["adapters"]
        lines += [
            "", f"## Serving: {n} adapters loaded one after another into one {serving['model']}", "",
            f"A model that starts with one empty adapter; each of {n} adapter files (each with its own running "
            "statistics) is loaded with `load_adapter` into it, every earlier one staying loaded; and, with "
            f"peft_buffers, each file hotswapped in turn into one adapter (`hotswap_adapter`). Median of "
            f"{serving['reps']} repetitions per load; `serving.png` plots every load.", "",
            "| load # | stock `load_adapter` ms | peft_buffers `load_adapter` ms | peft_buffers `hotswap_adapter` ms |",
            "|---:|---:|---:|---:|",
        ]
        for index in sorted({0, 9, 24, n - 1} & set(range(n))):
            lines.append(f"| {index + 1} | {stock['load_ms'][index]:.1f} | {ours['load_ms'][index]:.1f} "
                         f"| {ours['hotswap_ms'][index]:.1f} |")
    if results["models"]:
        lines += ["", "## Condensed (the README's table)", ""] + readme_table(results)
    targets = results.get("targets") or []
    if targets:
        lines += ["", "## Targets", "", "| target | model | measured | bar | met |", "|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['model']} | {t['measured']} | {t['bar']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
        if settings.get("device") != "cuda":
            lines += ["", "The timing targets are set for a GPU (H100/H200); on another device they are informative "
                          "only."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- plots


def _stamp_text(results: dict) -> str:
    meta = results["meta"]
    machine = f"{meta['gpu']}, driver {meta.get('driver')}" if meta.get("gpu") else f"CPU: {meta['cpu']}"
    return (f"{machine} | torch {meta['torch']}, peft {meta['peft']}, transformers {meta['transformers']} | "
            f"{meta['date_utc']} | {meta['command']}")


def render_plots(results: dict, out_dir: str) -> list:
    """Write bytes.png, times.png, scaling.png and serving.png; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    models = results["models"]
    stamp = _stamp_text(results)
    colors = {"stock": "#9e9e9e", "workaround": "#e69f00", "peft_buffers": "#0072b2", "full": "#cc79a7"}
    if models:
        names = list(models[0]["strategies"])
        width = 0.8 / len(names)
        xs = range(len(models))

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
        for i, s in enumerate(names):
            values = [m["strategies"][s]["file_bytes"] for m in models]
            ax.bar([x + i * width for x in xs], values, width, label=STRATEGY_LABELS[s], color=colors[s])
        ax.set_yscale("log")
        ax.set_ylabel("weights file bytes (log)")
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in xs], [m["label"] for m in models],
                      rotation=15, fontsize=8)
        ax.set_title("Adapter / checkpoint file size")
        ax.legend(fontsize=8)

        # Right: what each strategy adds over stock, next to the bytes of exactly the extra tensors.
        extra_names = [s for s in ("workaround", "peft_buffers") if s in names]
        series = [(STRATEGY_LABELS[s], colors[s], [m["strategies"][s].get("extra_bytes_over_stock") or 0
                                                   for m in models]) for s in extra_names]
        series.append(("extra tensors alone (floor − stock)", "#009e73",
                       [m.get("extra_state", {}).get("tensor_bytes") or 0 for m in models]))
        w2 = 0.8 / len(series)
        for i, (label, color, values) in enumerate(series):
            positions = [x + i * w2 for x in xs]
            ax2.bar(positions, [max(v, 1) for v in values], w2, label=label, color=color)
            for pos, v in zip(positions, values):
                if v == 0:
                    ax2.text(pos, 1.3, "0", ha="center", fontsize=7)
        ax2.set_yscale("log")
        ax2.set_ylabel("bytes over the stock PEFT file (log)")
        ax2.set_xticks([x + w2 * (len(series) - 1) / 2 for x in xs], [m["label"] for m in models],
                       rotation=15, fontsize=8)
        ax2.set_title("Extra bytes over stock PEFT")
        ax2.legend(fontsize=8)
        fig.text(0.01, 0.005, stamp, fontsize=6, color="#555555")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, "bytes.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, what, title in zip(axes, ("save_ms", "load_ms"), ("save", "load (from_pretrained)")):
            for i, s in enumerate(names):
                med = [m["strategies"][s][what]["median"] for m in models]
                lo = [m["strategies"][s][what]["median"] - m["strategies"][s][what]["min"] for m in models]
                hi = [m["strategies"][s][what]["max"] - m["strategies"][s][what]["median"] for m in models]
                ax.bar([x + i * width for x in xs], med, width, yerr=[lo, hi], capsize=2, label=STRATEGY_LABELS[s],
                       color=colors[s])
            ax.set_yscale("log")
            ax.set_ylabel("ms, median (bars: min–max, log)")
            ax.set_xticks([x + width * (len(names) - 1) / 2 for x in xs], [m["label"] for m in models],
                          rotation=15, fontsize=8)
            ax.set_title(f"{title} time")
        axes[0].legend(fontsize=8)
        fig.text(0.01, 0.005, stamp, fontsize=6, color="#555555")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, "times.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    scaling = results.get("scaling") or []
    if scaling:
        ns = [e["norm_layers"] for e in scaling]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, what in zip(axes, ("save", "load")):
            for variant, label in (("stock", "stock PEFT"), ("peft_buffers", "peft_buffers"),
                                   ("extra_only", "extra tensors alone (safetensors)")):
                ax.plot(ns, [e[f"{what}_ms"][variant]["median"] for e in scaling], marker="o", label=label,
                        color=colors.get(variant, "#009e73"))
            overhead = [max(e[f"{what}_overhead_ms"]["median_difference"], 1e-3) for e in scaling]
            ax.plot(ns, overhead, marker="s", linestyle="--", color="#d55e00", label="peft_buffers − stock")
            bars = [SCALING_FACTOR * e[f"{what}_overhead_ms"]["extra_only_median"] + SCALING_SLACK_MS for e in scaling]
            ax.plot(ns, bars, color="#d55e00", linewidth=0.8, linestyle=":",
                    label=f"target: {SCALING_FACTOR:g} × extra alone + {SCALING_SLACK_MS:g} ms")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("BatchNorm layers")
            ax.set_ylabel("ms, median (log)")
            ax.set_title(f"{what} time vs number of norm layers")
            ax.legend(fontsize=8)
        fig.text(0.01, 0.005, stamp, fontsize=6, color="#555555")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    serving = results.get("serving")
    if serving:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        loads = range(1, serving["adapters"] + 1)
        for label, color, values in (
                ("stock PEFT load_adapter", colors["stock"], serving["strategies"]["stock"]["load_ms"]),
                ("peft_buffers load_adapter", colors["peft_buffers"], serving["strategies"]["peft_buffers"]["load_ms"]),
                ("peft_buffers hotswap_adapter", "#009e73", serving["strategies"]["peft_buffers"]["hotswap_ms"])):
            ax.plot(loads, values, marker=".", label=label, color=color)
        ax.set_xlabel("adapter loaded (the model holds every earlier one)")
        ax.set_ylabel(f"ms, median of {serving['reps']}")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Serving: {serving['adapters']} adapters into one {serving['model']}")
        ax.legend(fontsize=8)
        fig.text(0.01, 0.005, stamp, fontsize=6, color="#555555")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, "serving.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
