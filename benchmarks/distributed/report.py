"""results.json of ``python -m benchmarks.distributed`` -> results.md."""

from __future__ import annotations

from typing import Optional


def _yes(value: Optional[bool]) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def _same(value: Optional[bool]) -> str:
    """For facts that are expected either way (plain BatchNorm: ranks differ; SyncBatchNorm: they agree)."""
    return "–" if value is None else ("equal" if value else "differ")


def _ms(entry: dict, call: str, variant: str) -> str:
    stats = entry.get("timings_ms", {}).get(call, {}).get(variant)
    return "–" if not stats else f"{stats['median']:.1f}"


def _stamp(meta: dict) -> list:
    machine = (f"{meta.get('gpus_visible')}× {meta['gpu']} ({meta.get('gpu_memory_gib')} GiB), driver "
               f"{meta.get('driver')}, CUDA {meta.get('cuda')}, NCCL {meta.get('nccl')}" if meta.get("gpu")
               else f"CPU {meta['cpu']} ×{meta['cpu_count']} (gloo)")
    return [
        f"- **Machine:** {machine}; {meta['platform']}",
        f"- **Versions:** python {meta['python']}, torch {meta['torch']}, peft {meta['peft']}, transformers "
        f"{meta['transformers']}, accelerate {meta['accelerate']}, safetensors {meta['safetensors']}, DeepSpeed "
        f"{meta.get('deepspeed')}; peft_buffers {meta['peft_buffers']} (commit {meta['git_commit']}"
        f"{', dirty' if meta['git_dirty'] else ''}, sources {meta['peft_buffers_source_sha256']})",
        f"- **Run:** `{meta['command']}`, world size {meta['world_size']}, model `{meta['model']}`, "
        f"{meta['date_utc']}, {meta.get('elapsed_s')} s; NVLink multicast off (NCCL_NVLS_ENABLE="
        f"{meta.get('NCCL_NVLS_ENABLE')})",
    ]


def render(results: dict) -> str:
    meta = results["meta"]
    lines = ["# peft_buffers: multi-process save and reload (issue 13)", ""] + _stamp(meta) + [
        "",
        "Every rank trains the same LoRA ResNet 3 SGD steps on its own data (stem BatchNorm weight unfrozen: a "
        "direct parameter); rank 0 saves with the state dict the framework gathers through "
        "`save_pretrained(state_dict=...)`, with peft_buffers and with stock PEFT, and reloads on its own device. "
        "*Reload = gathered*: the reloaded model's eval logits equal, bitwise, those of a plain model loaded from "
        "the gathered state dict; *= rank 0 live*: equal, bitwise, to rank 0's trained model itself (sharded "
        "models: its forward with every rank taking part). *Stats vs reference*: the file's running statistics "
        "against one process doing the same training (SyncBatchNorm: the ranks' batches concatenated; plain "
        "BatchNorm: DDP emulated, rank 0's buffers kept): the largest max |Δ| / max |reference| over the "
        "tensors, and whether all are within the tolerance.",
        "",
        "## Checks",
        "",
        "| run | distributed type | world | stat keys saved | direct param saved | reload = gathered | "
        "reload = rank 0 live | stock reload = rank 0 | file stats vs rank r | ranks' stats after training "
        "| … after one more DDP forward (eval) | stats vs reference (max \\|Δ\\| / max \\|ref\\|) |",
        "|---|---|---:|---:|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for run in results["runs"]:
        r = run.get("result")
        if run.get("not_run"):
            notes.append(f"- **{run['name']}**: not run: {run['not_run']}")
            continue
        if r is None:
            notes.append(f"- **{run['name']}**: failed (rc {run.get('returncode')}): `"
                         + " / ".join(run.get("error", [])[-3:]) + "`")
            continue
        if "prepare_failed" in r:
            notes.append(f"- **{run['name']}**: `accelerator.prepare` failed: `{r['prepare_failed'][:300]}`")
            continue
        if r.get("scenario") == "accelerate_fsdp2_repro":
            notes.append(f"- **{run['name']}** (accelerate {r['accelerate']}, no PEFT, "
                         "`benchmarks/distributed/accelerate_fsdp2_repro.py`):")
            notes += [f"  - `{call}`: `{outcome}`" for call, outcome in r["outcomes"].items()]
            continue
        ref = r.get("stats_vs_reference")
        ref_text = "–" if not ref else (f"{_yes(ref['within_tolerance'])} ({ref['max_rel_diff']:.2e}; "
                                        f"{ref['tolerance']})")
        equal_rank = r.get("saved_stats_equal_rank")
        lines.append(
            f"| {run['name']} | {r['distributed_type']} | {r['world_size']} | {r['saved_stat_keys']}/"
            f"{r['base_stat_modules']} | {_yes(r['saved_direct_parameter'])} | "
            f"{_yes(r['reload_equals_gathered_state'])} | {_yes(r.get('reload_equals_rank0_live'))} | "
            f"{'yes (control failed)' if r['stock_reload_equals_rank0'] else 'no (as expected)'} | "
            f"{'–' if equal_rank is None else ', '.join(f'r{i}: {_same(e)}' for i, e in enumerate(equal_rank))} | "
            f"{_same(r.get('ranks_equal_after_training'))} | "
            f"{_same(r.get('ranks_equal_after_one_more_ddp_forward'))} "
            f"| {ref_text} |"
        )
    lines += ["", "## Times (rank 0, median ms)", "",
              "Gather = the framework's full state dict (every rank; the same call for both). Save = "
              "`save_pretrained(state_dict=...)`; load = `PeftModel.from_pretrained` onto a fresh base on rank 0's "
              "device; stock and peft_buffers interleaved in the same run.", "",
              "| run | gather | save stock | save peft_buffers | load stock | load peft_buffers | runs |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        r = run.get("result") or {}
        if "timings_ms" not in r:
            continue
        n = r["timings_ms"]["save_pretrained"]["stock"]["n"]
        lines.append(f"| {run['name']} | {r['gather_ms']:.1f} | {_ms(r, 'save_pretrained', 'stock')} "
                     f"| {_ms(r, 'save_pretrained', 'peft_buffers')} | {_ms(r, 'from_pretrained', 'stock')} "
                     f"| {_ms(r, 'from_pretrained', 'peft_buffers')} | {n} |")
    if notes:
        lines += ["", "## Not run, failed, reproductions", ""] + notes
    return "\n".join(lines) + "\n"
