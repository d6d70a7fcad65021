"""The project's behaviour scenarios, runnable two ways on one PEFT (issue 11).

``native``: PEFT's own ``save_running_stats`` / ``parameters_to_save`` config fields (the patched PEFT of
``patches/peft-v0.22.0``), peft_buffers disabled. ``peft_buffers``: stock config, ``peft_buffers.enable()``.
Training is the same seeded CPU run in both, so outputs and saved tensors can be compared bitwise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.utils import save_and_load  # the module, not its functions: binding those would hide them from enable()

import peft_buffers
from tests.zoo import ZOO, logits, train, tuner_config, unfreeze_embeddings

MODES = ("native", "peft_buffers")
VIT_PARAMETERS = ["position_embeddings", "cls_token"]  # suffixes of vit.embeddings.{position_embeddings,cls_token}


def set_mode(mode: str) -> None:
    """peft_buffers on for ``peft_buffers``, off for ``native`` (PEFT then works alone)."""
    if mode == "peft_buffers":
        peft_buffers.enable()
    elif mode == "native":
        peft_buffers.disable()
    else:
        raise ValueError(f"mode must be one of {MODES}, found {mode!r}")


def config_for(mode: str, spec, parameters: bool = False):
    """The LoRA config of ``spec``; in ``native`` mode with the new fields turned on."""
    if mode == "native":
        return tuner_config("lora", spec, save_running_stats=True,
                            **({"parameters_to_save": VIT_PARAMETERS} if parameters else {}))
    return tuner_config("lora", spec)


def trained(mode: str, model_name: str, seed: int = 1):
    """A PEFT model of ``model_name`` trained three SGD steps; the ViT trains its embeddings too (#2099)."""
    spec = ZOO[model_name]
    vit = model_name == "vit"
    model = get_peft_model(spec.make(), config_for(mode, spec, parameters=vit))
    if vit and mode == "peft_buffers":
        unfreeze_embeddings(model)
    train(model, spec, seed=seed)
    return model


def write(mode: str, out: Path) -> dict[str, torch.Tensor]:
    """Train and save every scenario under ``out``; return (and save) the outputs a reload must reproduce."""
    expected: dict[str, torch.Tensor] = {}
    for model_name in ("resnet", "vit"):
        model = trained(mode, model_name)
        expected[model_name] = logits(model, ZOO[model_name].inputs(seed=99))
        model.save_pretrained(out / model_name)
    spec = ZOO["mixed_norms"]
    x = spec.inputs(seed=99)
    for adapter, seed in (("A", 1), ("B", 50)):
        model = trained(mode, "mixed_norms", seed=seed)
        expected[f"two_adapters/{adapter}"] = logits(model, x)
        model.save_pretrained(out / "two_adapters" / adapter)
    expected["two_adapters/base"] = logits(spec.make().eval(), x)
    torch.save(expected, out / "expected.pt")
    return expected


def _load_second(mode: str, model, path: Path, spec, name: str) -> None:
    file_config = type(config_for(mode, spec)).from_pretrained(path)
    if mode == "native" and not getattr(file_config, "save_running_stats", False):
        # A file without the fields in its config (written with peft_buffers): turn them on at load time, so that
        # PEFT keeps its statistics per adapter instead of loading them into the live model.
        model.add_adapter(name, config_for(mode, spec))
        save_and_load.set_peft_model_state_dict(model, save_and_load.load_peft_weights(str(path)), adapter_name=name)
    else:
        model.load_adapter(path, adapter_name=name)


def reload_outputs(mode: str, src: Path) -> dict[str, torch.Tensor]:
    """Load every scenario saved under ``src`` onto fresh bases; the outputs, keyed as ``write`` keys them."""
    outputs: dict[str, torch.Tensor] = {}
    for model_name in ("resnet", "vit"):
        spec = ZOO[model_name]
        loaded = PeftModel.from_pretrained(spec.make(), src / model_name).eval()
        outputs[model_name] = logits(loaded, spec.inputs(seed=99))
    spec = ZOO["mixed_norms"]
    x = spec.inputs(seed=99)
    base = spec.make()
    config = None
    if mode == "native":
        config = type(config_for(mode, spec)).from_pretrained(src / "two_adapters" / "A")
        config.save_running_stats = True  # see _load_second
    model = PeftModel.from_pretrained(base, src / "two_adapters" / "A", adapter_name="A", config=config).eval()
    outputs["two_adapters/A"] = logits(model, x)
    _load_second(mode, model, src / "two_adapters" / "B", spec, "B")
    outputs["two_adapters/A after loading B"] = logits(model, x)
    model.set_adapter("B")
    outputs["two_adapters/B"] = logits(model, x)
    with model.disable_adapter():
        outputs["two_adapters/base"] = logits(model, x)
    model.set_adapter("A")
    outputs["two_adapters/A again"] = logits(model, x)
    return outputs


def mismatches(expected: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> list[str]:
    """Each output that is not bitwise equal to what it must reproduce, as a line of text."""
    problems = []
    for key, output in outputs.items():
        reference = expected[key.split(" ")[0]]
        if not torch.equal(output, reference):
            problems.append(f"{key}: max |Δ| = {(output - reference).abs().max().item():.3e}")
    return problems
