"""A failed load changes nothing: peft_buffers._transaction around stock PEFT calls.

Guards issue 10 §1 (`issues show 10`): a refused or failing `load_adapter`, `PeftModel.from_pretrained` or
`set_peft_model_state_dict` left wrappers, injected adapters, flipped `training` flags and partly overwritten
weights behind. Each case is run inside `run_atomically` (the model must be exactly as before) and without it
(stock PEFT: the model is shown to change).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import save_and_load  # looked up at call time: binding the name would hide it from the patch
from safetensors.torch import load_file, save_file
from torch import nn

from peft_buffers import IncompatibleExtraState, PeftBuffersError
from peft_buffers._adapter_file import check_adapter_path
from peft_buffers._errors import CorruptAdapterFile, IncompatibleAdapterWeights
from peft_buffers._transaction import active_transaction, atomic, run_atomically
from tests.zoo import MixedNorms

from ._atomic import assert_changed, assert_unchanged, extra_state_of_every_adapter, model_fingerprint
from ._compat import requires_low_cpu_mem_usage

ADAPTER_FILE = "adapter_model.safetensors"


class Net(nn.Module):
    """The model of issue 10: fc1 -> bn1 -> mid -> bn2 -> head."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.mid = nn.Linear(8, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.mid(torch.relu(self.bn1(self.fc1(x)))))))


class FlatMixedNorms(MixedNorms):
    def forward(self, x):
        return super().forward(x.reshape(-1, 3, 2, 2).repeat(1, 1, 4, 4))


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[], nn.Module]
    in_features: int
    default_targets: tuple[str, ...]  # adapter "default", already in the model
    new_target: str  # a layer no other adapter targets
    norm: str  # a BatchNorm for modules_to_save

    def base(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make()

    def inputs(self) -> torch.Tensor:
        return torch.randn(6, self.in_features, generator=torch.Generator().manual_seed(3))


SPECS = {
    "net": Spec("net", Net, 4, ("fc1",), "mid", "bn2"),
    "mixed_norms": Spec("mixed_norms", FlatMixedNorms, 12, ("fc1",), "fc2", "bn1d"),
}


def _train(model: nn.Module, spec: Spec) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(2):
        model(spec.inputs() * (step + 2)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def model_with_default(spec: Spec) -> nn.Module:
    """A trained PEFT model in eval mode holding adapter "default" (LoRA on the default targets)."""
    model = get_peft_model(spec.base(), LoraConfig(r=2, lora_alpha=4, target_modules=list(spec.default_targets)))
    _train(model, spec)
    return model


def _save(spec: Spec, folder: Path, **config) -> Path:
    model = get_peft_model(spec.base(), LoraConfig(r=2, lora_alpha=4, **config))
    _train(model, spec)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _rewrite(folder: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(str(folder / ADAPTER_FILE))
    edit(tensors)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})


def _key(tensors: dict, *parts: str) -> str:
    return next(k for k in tensors if all(p in k for p in parts))


def _header_len(folder: Path) -> int:
    return int.from_bytes((folder / ADAPTER_FILE).read_bytes()[:8], "little")


def _set_header_len(folder: Path, value: int) -> None:
    data = bytearray((folder / ADAPTER_FILE).read_bytes())
    data[:8] = value.to_bytes(8, "little")
    (folder / ADAPTER_FILE).write_bytes(bytes(data))


# --------------------------------------------------------------------------- the failure cases of issue 10 §1
# Each builds the adapter folder for "b" and names the exception the load raises with the transaction.


def refused_new_layer(spec, folder):
    """A config targeting a layer no other adapter targets, with a file peft_buffers refuses."""
    _save(spec, folder, target_modules=[spec.new_target])
    _rewrite(folder, lambda t: t.update({f"base_model.model.{spec.norm}.running_mean": torch.zeros(5)}))
    return IncompatibleExtraState


def refused_modules_to_save(spec, folder):
    """A config with modules_to_save=[a BatchNorm], with a file peft_buffers refuses."""
    _save(spec, folder, target_modules=[spec.new_target], modules_to_save=[spec.norm])
    other_norm = "bn1" if spec.norm == "bn2" else "bn2d"
    _rewrite(folder, lambda t: t.update({f"base_model.model.{other_norm}.running_var": torch.ones(3)}))
    return IncompatibleExtraState


def truncated(spec, folder):
    _save(spec, folder, target_modules=[spec.new_target])
    data = (folder / ADAPTER_FILE).read_bytes()
    (folder / ADAPTER_FILE).write_bytes(data[: len(data) - 20])
    return Exception


def header_too_large(spec, folder):
    _save(spec, folder, target_modules=[spec.new_target])
    _set_header_len(folder, (folder / ADAPTER_FILE).stat().st_size)
    return Exception


def header_too_small(spec, folder):
    _save(spec, folder, target_modules=[spec.new_target])
    _set_header_len(folder, _header_len(folder) - 7)
    return Exception


def empty_file(spec, folder):
    _save(spec, folder, target_modules=[spec.new_target])
    (folder / ADAPTER_FILE).write_bytes(b"")
    return Exception


def wrong_shape_lora_weight(spec, folder):
    _save(spec, folder, target_modules=[spec.new_target])
    _rewrite(folder, lambda t: t.update({_key(t, "lora_B"): torch.zeros(t[_key(t, "lora_B")].shape[0], 3)}))
    return RuntimeError


def wrong_shape_modules_to_save_statistic(spec, folder):
    _save(spec, folder, target_modules=[spec.new_target], modules_to_save=[spec.norm])
    _rewrite(folder, lambda t: t.update({_key(t, spec.norm, "running_mean"): torch.zeros(5)}))
    return RuntimeError


def wrong_shape_into_existing_adapter(spec, folder):
    """A file for adapter "default" (loaded under that name) whose second LoRA weight has the wrong shape."""
    _save(spec, folder, target_modules=list(spec.default_targets))

    def edit(tensors):
        lora_a, lora_b = _key(tensors, "lora_A"), _key(tensors, "lora_B")
        tensors[lora_a] = tensors[lora_a] + 1  # differs from the live adapter: a partial write shows
        tensors[lora_b] = torch.zeros(tensors[lora_b].shape[0], 3)

    _rewrite(folder, edit)
    return RuntimeError


NEW_ADAPTER_CASES = [refused_new_layer, refused_modules_to_save, truncated, header_too_large, header_too_small,
                     empty_file, wrong_shape_lora_weight, wrong_shape_modules_to_save_statistic]
CASES = NEW_ADAPTER_CASES + [wrong_shape_into_existing_adapter]
NEEDS_ENABLED = {refused_new_layer, refused_modules_to_save}  # refused by peft_buffers' own load


MODULES_TO_SAVE_CASES = {refused_modules_to_save, wrong_shape_modules_to_save_statistic}


@functools.cache
def _peft_adds_a_modules_to_save_adapter() -> bool:
    """False on PEFT releases (0.6) whose add_adapter crashes (AttributeError on ``None.update``) when the
    model's first adapter has no modules_to_save: there the load fails inside PEFT, before our refusal."""
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["fc1"]))
    try:
        model.add_adapter("x", LoraConfig(r=2, target_modules=["mid"], modules_to_save=["bn2"]))
    except AttributeError:
        return False
    return True


def b_config(spec: Spec) -> dict:
    """Adapter "b" of the success and fuzz tests: LoRA on the new layer, its BatchNorm in modules_to_save
    where PEFT can add such an adapter next to "default"."""
    extra = {"modules_to_save": [spec.norm]} if _peft_adds_a_modules_to_save_adapter() else {}
    return {"target_modules": [spec.new_target], **extra}


def _expected(case, expected):
    if case in MODULES_TO_SAVE_CASES and not _peft_adds_a_modules_to_save_adapter():
        return AttributeError  # PEFT's own failure; the rollback is checked all the same
    return expected


def _adapter_name(case) -> str:
    return "default" if case is wrong_shape_into_existing_adapter else "b"


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
    expected = _expected(case, case(spec, tmp_path))
    _enable_for(case)
    model = model_with_default(spec)
    x = spec.inputs()
    logits = model(x)
    before = model_fingerprint(model, extra=extra_state_of_every_adapter)

    with pytest.raises(expected) as raised:
        run_atomically(model, lambda: model.load_adapter(tmp_path, _adapter_name(case)),
                       describe=f"adapter {_adapter_name(case)!r} from {tmp_path}")

    assert_unchanged(before, model, extra=extra_state_of_every_adapter)
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
        model.load_adapter(tmp_path, _adapter_name(case))

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
    _save(spec, tmp_path, **b_config(spec))
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
    expected = _expected(case, case(spec, tmp_path))
    model = model_with_default(spec)
    before = model_fingerprint(model)

    with pytest.raises(expected):
        run_atomically(model, lambda: model.load_adapter(tmp_path, _adapter_name(case), low_cpu_mem_usage=True))

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
