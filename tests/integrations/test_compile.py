"""torch.compile: a compiled PeftModel saves the same keys, extra state included, as the uncompiled one.

Guards https://github.com/huggingface/peft/issues/1732 and /issues/2099 for compiled models. The compiled
model trains through ``aot_eager`` (AOTAutograd functionalizes the in-place running-statistics updates, as
inductor does, without a C++ toolchain); the saving path does not depend on the backend.
"""

from __future__ import annotations

import peft.utils
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from ._tiny import STEM_NORM, logits, lora_config, resnet, train_steps

FILE = "adapter_model.safetensors"
EXTRA = {f"base_model.model.{STEM_NORM}.{name}" for name in ("running_mean", "running_var",
                                                                "num_batches_tracked", "weight")}


def trained(compile_model: bool):
    model = get_peft_model(resnet(0), lora_config())
    model.get_submodule(f"base_model.model.{STEM_NORM}").weight.requires_grad_(True)
    runner = torch.compile(model, backend="aot_eager") if compile_model else model
    train_steps(runner, seed=1, steps=2)
    return model, runner


# https://github.com/huggingface/peft/issues/1732 and /issues/2099
def test_compiled_model_saves_the_same_keys_and_values(enabled, tmp_path):
    plain, _ = trained(compile_model=False)
    model, compiled = trained(compile_model=True)
    plain.save_pretrained(tmp_path / "plain", safe_serialization=True)  # PEFT < 0.7 defaults to .bin
    compiled.save_pretrained(tmp_path / "compiled", safe_serialization=True)

    plain_file = load_file(str(tmp_path / "plain" / FILE))
    compiled_file = load_file(str(tmp_path / "compiled" / FILE))
    # looked up at call time: a name imported before enable() is PEFT's unpatched function
    unwrapped = peft.utils.get_peft_model_state_dict(compiled, unwrap_compiled=True)

    assert EXTRA <= set(plain_file)
    assert set(compiled_file) == set(plain_file) == set(unwrapped)
    assert all(torch.equal(compiled_file[k], unwrapped[k]) for k in compiled_file)
    loaded = PeftModel.from_pretrained(resnet(0), tmp_path / "compiled")
    assert torch.equal(logits(loaded), logits(model))
