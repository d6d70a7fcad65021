"""A failed load changes nothing: peft_buffers.core.atomic around stock PEFT calls.

Guards issue 10 §1 (`issues show 10`): a refused or failing `load_adapter`, `PeftModel.from_pretrained` or
`set_peft_model_state_dict` left wrappers, injected adapters, flipped `training` flags and partly overwritten
weights behind. Each case is run inside `run_atomically` (the model must be exactly as before) and without it
(stock PEFT: the model is shown to change).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import save_and_load  # looked up at call time: binding the name would hide it from the patch
from safetensors.torch import load_file
from torch import nn

from peft_buffers import IncompatibleExtraState, PeftBuffersError
from peft_buffers._errors import CorruptAdapterFile, IncompatibleAdapterWeights
from peft_buffers.core import active_transaction, atomic, check_adapter_path, run_atomically

from .._atomic import assert_changed, assert_unchanged, extra_state_of_every_adapter, model_fingerprint
from .._compat import requires_low_cpu_mem_usage
from .._load_failures import (
    ADAPTER_FILE,
    CASES,
    NEEDS_ENABLED,
    NEW_ADAPTER_CASES,
    SPECS,
    Net,
    adapter_name_of,
    b_config,
    empty_file,
    expected_for,
    header_too_large,
    header_too_small,
    model_with_default,
    save_adapter,
    truncated,
    wrong_shape_into_existing_adapter,
    wrong_shape_lora_weight,
    wrong_shape_modules_to_save_statistic,
)


def _stock_refusal_for(case, monkeypatch) -> None:
    """Stock PEFT (peft_buffers disabled) with the refusal of a NEEDS_ENABLED case raised where peft_buffers
    raises it: from set_peft_model_state_dict, after PEFT injected the adapter. Independent of whether the
    load hooks are atomic (once they are, an enabled load no longer shows the stock behaviour)."""
    import peft.peft_model

    import peft_buffers

    peft_buffers.disable()
    if case in NEEDS_ENABLED:
        def refuse(model, state_dict, adapter_name="default", *args, **kwargs):
            raise IncompatibleExtraState(adapter_name, [])

        monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", refuse)


def _enable_for(case):
    import peft_buffers

    if case in NEEDS_ENABLED:
        peft_buffers.enable()


# https://github.com/huggingface/peft_buffers/issues/10 (§1): load_adapter either succeeds or changes nothing
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_failed_load_adapter_leaves_model_unchanged(tmp_path, spec_name, case):
    spec = SPECS[spec_name]
    expected = expected_for(case, case(spec, tmp_path))
    _enable_for(case)
    model = model_with_default(spec)
    x = spec.inputs()
    logits = model(x)
    # Per-adapter extra state exists only where peft_buffers attached to the model (created while enabled).
    extra = extra_state_of_every_adapter if case in NEEDS_ENABLED else None
    before = model_fingerprint(model, extra=extra)

    with pytest.raises(expected) as raised:
        run_atomically(model, lambda: model.load_adapter(tmp_path, adapter_name_of(case)),
                       describe=f"adapter {adapter_name_of(case)!r} from {tmp_path}")

    assert_unchanged(before, model, extra=extra)
    assert torch.equal(model(x), logits)
    assert any(str(tmp_path) in note for note in raised.value.__notes__)


# https://github.com/huggingface/peft_buffers/issues/10 (§1): the same loads change the model without it
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_stock_failed_load_adapter_changes_the_model(tmp_path, monkeypatch, spec_name, case):
    spec = SPECS[spec_name]
    case(spec, tmp_path)
    _stock_refusal_for(case, monkeypatch)
    model = model_with_default(spec)
    before = model_fingerprint(model)

    with pytest.raises(Exception):  # noqa: B017 - stock raises whatever the failing layer raises
        model.load_adapter(tmp_path, adapter_name_of(case))

    assert_changed(before, model)


# https://github.com/huggingface/peft_buffers/issues/10 (§1): PeftModel.from_pretrained on the base it is given
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("case", NEW_ADAPTER_CASES, ids=lambda c: c.__name__)
def test_failed_from_pretrained_leaves_base_unchanged(tmp_path, monkeypatch, spec_name, case):
    spec = SPECS[spec_name]
    expected = case(spec, tmp_path)
    _enable_for(case)
    base = spec.base().eval()
    x = spec.inputs()
    logits = base(x)
    before = model_fingerprint(base)

    with pytest.raises(expected):
        run_atomically(base, lambda: PeftModel.from_pretrained(base, tmp_path), describe=f"{tmp_path}")

    assert_unchanged(before, base)
    assert torch.equal(base(x), logits)

    _stock_refusal_for(case, monkeypatch)
    with pytest.raises(Exception):  # noqa: B017 - stock, for contrast: the base keeps PEFT's injected layers
        PeftModel.from_pretrained(base, tmp_path)
    assert_changed(before, base)


# https://github.com/huggingface/peft_buffers/issues/10 (§1): a direct set_peft_model_state_dict call
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("atomically", [True, False], ids=["atomic", "stock"])
def test_failed_set_peft_model_state_dict_into_existing_adapter(tmp_path, spec_name, atomically):
    spec = SPECS[spec_name]
    wrong_shape_into_existing_adapter(spec, tmp_path)
    state_dict = load_file(str(tmp_path / ADAPTER_FILE))
    model = model_with_default(spec)
    before = model_fingerprint(model)

    def load():
        return save_and_load.set_peft_model_state_dict(model, state_dict, adapter_name="default")

    if atomically:
        with pytest.raises(IncompatibleAdapterWeights, match="lora_B"):
            run_atomically(model, load)
        assert_unchanged(before, model)
    else:
        with pytest.raises(RuntimeError, match="size mismatch"):
            load()
        changed = assert_changed(before, model)
        assert any("lora_A" in line and "values differ" in line for line in changed)  # partly overwritten


# https://github.com/huggingface/peft_buffers/issues/10 (§1): the validator refuses before anything is written
def test_wrong_shape_is_refused_by_name_before_writing(tmp_path):
    spec = SPECS["net"]
    wrong_shape_lora_weight(spec, tmp_path)
    model = model_with_default(spec)

    with pytest.raises(IncompatibleAdapterWeights) as raised:
        run_atomically(model, lambda: model.load_adapter(tmp_path, "b"))

    (mismatch,) = raised.value.mismatches
    assert mismatch.key == "base_model.model.mid.lora_B.b.weight"  # PEFT's own renaming, seen by the check
    assert (mismatch.expected, mismatch.found) == ("shape (8, 2)", "shape (8, 3)")


# https://github.com/huggingface/peft_buffers/issues/10 (§1): the file check names each header problem
@pytest.mark.parametrize("case, problem", [
    (truncated, "shorter than the header says"),
    (header_too_large, "runs past the end of the file"),
    (header_too_small, "not valid UTF-8 JSON"),
    (empty_file, "too short to hold a safetensors header"),
])
def test_file_problems_are_named_before_peft_touches_the_model(tmp_path, case, problem):
    case(SPECS["net"], tmp_path)
    with pytest.raises(CorruptAdapterFile, match=problem) as raised:
        check_adapter_path(tmp_path)
    assert raised.value.path == str(tmp_path / ADAPTER_FILE)


# https://github.com/huggingface/peft_buffers/issues/10: a successful load inside the transaction is stock
@pytest.mark.parametrize("spec_name", SPECS)
def test_successful_load_is_untouched_by_the_transaction(tmp_path, spec_name):
    spec = SPECS[spec_name]
    save_adapter(spec, tmp_path, **b_config(spec))
    atomic_model, stock_model = model_with_default(spec), model_with_default(spec)

    run_atomically(atomic_model, lambda: atomic_model.load_adapter(tmp_path, "b"))
    stock_model.load_adapter(tmp_path, "b")

    assert active_transaction(atomic_model) is None
    assert all("load_state_dict" not in m.__dict__ for m in atomic_model.modules())  # interception removed
    assert atomic_model.state_dict().keys() == stock_model.state_dict().keys()
    for key, value in stock_model.state_dict().items():
        assert torch.equal(atomic_model.state_dict()[key], value), key
    atomic_model.set_adapter("b")
    stock_model.set_adapter("b")
    x = spec.inputs()
    assert torch.equal(atomic_model(x), stock_model(x))


# https://github.com/huggingface/peft_buffers/issues/10: the original exception keeps its type, with a note
def test_original_exception_is_re_raised_with_a_note():
    net = Net().eval()
    before = model_fingerprint(net)
    error = KeyError("boom")

    def fail():
        net.mid = nn.Sequential(net.mid)
        net.bn2.train()
        net.fc1.weight.requires_grad_(False)
        raise error

    with pytest.raises(KeyError) as raised:
        run_atomically(net, fail, describe="adapter 'b' from /some/path")

    assert raised.value is error
    assert raised.value.__notes__ == [
        "peft_buffers: adapter 'b' from /some/path failed; the model was rolled back to its state before it."
    ]
    assert_unchanged(before, net)


class _Store:
    """An object with its own snapshot protocol, like the per-adapter ExtraStateStore."""

    def __init__(self):
        self.values = {"a": 1}

    def __peft_buffers_snapshot__(self):
        saved = dict(self.values)
        return lambda: (self.values.clear(), self.values.update(saved))


# https://github.com/huggingface/peft_buffers/issues/10: named tensors, snapshot objects, nesting
def test_extra_tensors_snapshot_objects_and_nesting_are_restored():
    net = Net().eval()
    net.store = _Store()
    before = model_fingerprint(net)

    def fail():
        with atomic(net, extra_tensors={"bn1.running_mean": net.bn1.running_mean}) as inner:
            assert inner is active_transaction(net)  # joins the outer transaction
            with torch.no_grad():
                net.bn1.running_mean.add_(1)
            net.store.values["b"] = 2
            raise ValueError("late failure")

    with pytest.raises(ValueError, match="late failure"):
        run_atomically(net, fail)

    assert_unchanged(before, net)
    assert net.store.values == {"a": 1}


def test_a_failing_rollback_raises_rollback_failed():
    class Broken:
        def __peft_buffers_snapshot__(self):
            def restore():
                raise OSError("disk gone")

            return restore

    net = Net()
    net.broken = Broken()
    with pytest.raises(PeftBuffersError, match="rolling the model back failed") as raised:
        run_atomically(net, lambda: 1 / 0)
    assert isinstance(raised.value.original, ZeroDivisionError)
    assert isinstance(raised.value.__cause__, OSError)



# https://github.com/huggingface/peft_buffers/issues/10 (§1): low_cpu_mem_usage=True loads (assign=True, meta init)
@requires_low_cpu_mem_usage
@pytest.mark.parametrize("case", [truncated, wrong_shape_lora_weight, wrong_shape_modules_to_save_statistic,
                                  wrong_shape_into_existing_adapter], ids=lambda c: c.__name__)
def test_failed_low_cpu_mem_usage_load_leaves_model_unchanged(tmp_path, case):
    spec = SPECS["net"]
    expected = expected_for(case, case(spec, tmp_path))
    model = model_with_default(spec)
    before = model_fingerprint(model)

    with pytest.raises(expected):
        run_atomically(model, lambda: model.load_adapter(tmp_path, adapter_name_of(case), low_cpu_mem_usage=True))

    assert_unchanged(before, model)


# https://github.com/huggingface/peft_buffers/issues/10: prompt learning loads through the prompt encoder's own
# load_state_dict (a submodule): intercepted and checked there too
def test_prompt_learning_load_is_checked_in_the_prompt_encoder():
    from peft import PromptTuningConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    before = model_fingerprint(model)

    with pytest.raises(IncompatibleAdapterWeights, match="weight"):
        run_atomically(model, lambda: save_and_load.set_peft_model_state_dict(
            model, {"prompt_embeddings": torch.zeros(5, 16)}))

    assert_unchanged(before, model)


# https://github.com/huggingface/peft_buffers/issues/10: from_pretrained wired as PeftModel.from_pretrained will
# be: a transaction on the base around one on the new PeftModel (nested, different roots)
def test_nested_transactions_on_base_and_peft_model(tmp_path):
    spec = SPECS["net"]
    truncated(spec, tmp_path)
    base = spec.base().eval()
    before = model_fingerprint(base)

    def from_pretrained():
        model = PeftModel(base, LoraConfig.from_pretrained(tmp_path))
        return run_atomically(model, lambda: model.load_adapter(tmp_path, "default"), describe="inner")

    with pytest.raises(Exception) as raised:  # noqa: B017 - safetensors' own error for the truncated file
        run_atomically(base, from_pretrained, describe="outer")

    assert_unchanged(before, base)
    assert [note.split(" ")[1] for note in raised.value.__notes__] == ["inner", "outer"]


# https://github.com/huggingface/peft_buffers/issues/10: PEFT deep-copies modules during a load
# (modules_to_save); a copy's load_state_dict must load into the copy, not into the original
def test_a_module_copied_during_the_transaction_loads_into_itself():
    import copy

    net = Net().eval()
    with atomic(net):
        twin = copy.deepcopy(net.bn2)
        twin.load_state_dict({"running_mean": torch.full((8,), 7.0)}, strict=False)
        assert torch.equal(twin.running_mean, torch.full((8,), 7.0))
        assert torch.equal(net.bn2.running_mean, torch.zeros(8))
    twin.load_state_dict({"running_mean": torch.full((8,), 3.0)}, strict=False)  # after it: a plain load
    assert torch.equal(twin.running_mean, torch.full((8,), 3.0))


def test_a_rebound_data_tensor_is_rebound_back():
    net = Net()
    before = model_fingerprint(net)

    def fail():
        net.mid.weight.data = torch.zeros(3, 3, dtype=torch.float64)  # what some tuners do when moving weights
        raise RuntimeError("late")

    with pytest.raises(RuntimeError, match="late"):
        run_atomically(net, fail, extra_tensors=[net.mid.weight])

    assert_unchanged(before, net)
