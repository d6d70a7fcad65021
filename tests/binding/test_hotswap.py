"""Hotswapping adapters that carry extra state: the values go into the same tensors, validated and atomic.

PEFT's ``hotswap_adapter`` (how one ``torch.compile``d model serves many adapters without recompiling) counts
only ``lora_`` keys: a file with running statistics raises a bare ``KeyError`` with stock PEFT.
"""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

from peft_buffers import IncompatibleExtraState

from .._compat import PEFT_VERSION
from ..zoo import ZOO, logits, train, tuner_config

pytestmark = pytest.mark.skipif(PEFT_VERSION < Version("0.14"), reason="peft.utils.hotswap is new in PEFT 0.14")

SPEC = ZOO["mixed_norms"]
X = SPEC.inputs(seed=99)
FILE = "adapter_model.safetensors"


@pytest.fixture
def adapters(tmp_path):
    """Three adapters trained from the seeded base, saved with peft_buffers; their logits."""
    from peft import get_peft_model

    import peft_buffers

    was = peft_buffers.is_enabled()
    peft_buffers.enable()
    outputs = {}
    for name, seed in (("a", 1), ("b", 7), ("c", 13)):
        model = get_peft_model(SPEC.make(), tuner_config("lora", SPEC))
        train(model, SPEC, seed=seed)
        model.save_pretrained(tmp_path / name)
        outputs[name] = logits(model.eval(), X)
    if not was:
        peft_buffers.disable()
    return tmp_path, outputs


def served(folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(SPEC.make(), folder / "a").eval()


def base_logits():
    return logits(SPEC.make().eval(), X)


def test_hotswap_swaps_the_extra_state_in_a_compiled_model_without_recompiling(enabled, adapters):
    from peft.utils.hotswap import hotswap_adapter

    folder, expected = adapters
    model = served(folder)
    torch._dynamo.reset()  # no compiled code of other tests: this one counts recompilations
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(logits(compiled, X), expected["a"])
            for name in ("b", "c", "a", "c"):
                hotswap_adapter(compiled, str(folder / name), adapter_name="default", torch_device="cpu")
                assert torch.equal(logits(compiled, X), expected[name]), name
        with model.disable_adapter():  # PEFT's own disable flag recompiles: outside the patch
            assert torch.equal(logits(compiled, X), base_logits())
        assert torch.equal(logits(compiled, X), expected["c"])


def test_stock_hotswap_cannot_take_a_file_with_extra_state(stock, adapters):
    from peft.utils.hotswap import hotswap_adapter

    folder, _ = adapters
    model = served(folder)
    with pytest.raises(KeyError, match=r"base_model\.model\.bn"):
        hotswap_adapter(model, str(folder / "b"), adapter_name="default", torch_device="cpu")


def test_after_a_hotswap_switching_stays_exact(enabled, adapters):
    from peft.utils.hotswap import hotswap_adapter

    folder, expected = adapters
    model = served(folder)
    model.load_adapter(folder / "c", adapter_name="other")
    hotswap_adapter(model, str(folder / "b"), adapter_name="default", torch_device="cpu")
    for name, out in (("other", "c"), ("default", "b"), ("other", "c")):
        model.set_adapter(name)
        assert torch.equal(logits(model, X), expected[out]), name


def test_a_hotswapped_file_without_extra_state_brings_back_the_base_values(enabled, adapters, tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    folder, _ = adapters
    model = served(folder)
    stock_b = tmp_path / "stock_b"
    stock_b.mkdir()
    (stock_b / "adapter_config.json").write_bytes((folder / "b" / "adapter_config.json").read_bytes())
    save_file({k: v for k, v in load_file(str(folder / "b" / FILE)).items() if "lora_" in k}, str(stock_b / FILE))
    hotswap_adapter(model, str(stock_b), adapter_name="default", torch_device="cpu")
    stats = {k: v for k, v in model.get_base_model().state_dict().items() if "running" in k}
    base = {k: v for k, v in SPEC.make().state_dict().items() if "running" in k}
    assert stats.keys() == base.keys() and all(torch.equal(stats[k], base[k]) for k in base)


def test_a_refused_hotswap_names_the_tensor_and_leaves_the_adapter_exactly(enabled, adapters, tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    folder, expected = adapters
    model = served(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((folder / "b" / "adapter_config.json").read_bytes())
    tensors = load_file(str(folder / "b" / FILE))
    tensors["base_model.model.bn1d.running_mean"] = torch.zeros(5)  # the model's has 16 values
    save_file(tensors, str(bad / FILE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleExtraState, match=r"bn1d\.running_mean: running statistic has another shape"):
        hotswap_adapter(model, str(bad), adapter_name="default", torch_device="cpu")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, X), expected["a"])
