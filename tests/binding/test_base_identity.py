"""The adapter folder records the base model it was trained on; loading onto another base is named.

The seed report (a Gemma-2B QLoRA adapter reloaded with another BitsAndBytesConfig predicted differently) and
every other way to reload onto another base: another seed or revision, one changed element, running
statistics the file does not carry, another dtype, another quantization. Stock PEFT loads all of them silently.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import peft_buffers
from peft_buffers import BaseMismatch, BaseMismatchWarning, PeftBuffersError, PeftBuffersWarning
from peft_buffers.binding import _base_identity
from peft_buffers.cli import main

from .._atomic import assert_unchanged, extra_state_of_every_adapter, model_fingerprint
from .._compat import requires_native_adapters

SIDECAR = "peft_buffers_base.json"
WEIGHTS = "adapter_model.safetensors"
FIX = ('Load it onto the base it was trained on (python -m peft_buffers inspect DIR shows it), or call '
       'peft_buffers.enable(base_check="off") to skip this check.')


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def make_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def trained(train_mode: bool = True, **config) -> nn.Module:
    """A LoRA adapter on ``fc``, two SGD steps; in eval mode the running statistics stay as they were."""
    model = get_peft_model(make_base(), LoraConfig(target_modules=["fc"], init_lora_weights=False, **config))
    model.train(train_mode)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        model(torch.randn(8, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def load_lines(base: nn.Module, folder, **kwargs) -> list[str]:
    """PeftModel.from_pretrained onto ``base``; the lines of the BaseMismatchWarning (none: [])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, folder, **kwargs)
    found = [w for w in caught if issubclass(w.category, BaseMismatchWarning)]
    assert len(found) <= 1, [str(w.message) for w in found]
    if not found:
        return []
    message = str(found[0].message)
    assert found[0].filename == __file__  # it points at the caller's line
    assert message.startswith(f"adapter 'default' from {folder}: the base model differs from the one the adapter "
                              f"was trained on (as recorded in {SIDECAR} when it was saved):\n")
    assert message.endswith("\n" + FIX)
    return [line[2:] for line in message.splitlines()[1:-1]]


@pytest.fixture
def saved(enabled, tmp_path):
    trained().save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def test_the_same_base_loads_without_a_word(saved):
    assert (saved / SIDECAR).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftBuffersWarning)
        PeftModel.from_pretrained(make_base(), saved)


def test_stock_peft_says_nothing_about_another_base(stock, tmp_path):
    trained().save_pretrained(tmp_path, safe_serialization=True)
    assert not (tmp_path / SIDECAR).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(make_base(seed=1), tmp_path)


def test_a_base_of_another_seed_is_named(saved):
    # fc.weight, fc.bias, head.weight, head.bias are random; bn's affine starts at ones and zeros in any seed
    assert load_lines(make_base(seed=1), saved) == [
        "4 of 6 tensors differ in value, e.g. fc.weight, fc.bias: was the adapter trained on another base or "
        "revision?"
    ]


@pytest.mark.parametrize("name", ["fc.weight", "head.weight"], ids=["targeted", "untargeted"])
def test_one_changed_element_is_named(saved, name):
    base = make_base()
    with torch.no_grad():
        weight = base.get_parameter(name)
        weight[1, 2] = torch.nextafter(weight[1, 2], torch.tensor(1.0))  # the smallest change there is
    assert load_lines(base, saved) == [
        f"1 of 6 tensors differ in value, e.g. {name}: was the adapter trained on another base or revision?"
    ]


def test_running_statistics_the_file_does_not_carry_are_named(enabled, tmp_path):
    trained(train_mode=False).save_pretrained(tmp_path, safe_serialization=True)  # eval: statistics stay
    assert json.loads((tmp_path / SIDECAR).read_text())["tensor_count"] == 9
    base = make_base()
    base.bn.running_mean.add_(0.5)  # a base whose statistics were fine-tuned already
    base.bn.num_batches_tracked += 3
    assert load_lines(base, tmp_path) == [
        "running statistics differ: bn.running_mean, bn.num_batches_tracked (the adapter does not carry them)"
    ]


def test_running_statistics_the_file_carries_are_not_compared(saved):
    recorded = json.loads((saved / SIDECAR).read_text())
    assert recorded["not_recorded"] == {
        "carried by the adapter file": ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]}
    base = make_base()
    base.bn.running_mean.add_(0.5)  # the file's statistics replace these: nothing to say
    assert load_lines(base, saved) == []


def test_another_dtype_is_named(saved):
    assert load_lines(make_base().to(torch.float64), saved) == [
        "trained on float32 weights, loading onto float64 (6 tensors)"]


def test_the_base_values_are_recorded_not_the_values_another_adapter_trained(enabled, tmp_path):
    # Adapter "a" moves the statistics; "b" never ran: b's folder records the base's own statistics.
    model = trained()
    model.add_adapter("b", LoraConfig(target_modules=["fc"]))
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "b" / SIDECAR).is_file()
    assert "bn.running_mean" in json.dumps(json.loads((tmp_path / "b" / SIDECAR).read_text())["groups"])
    assert load_lines(make_base(), tmp_path / "b") == []
    moved = make_base()
    moved.load_state_dict(model.get_base_model().state_dict(), strict=False)  # a's statistics, not the base's
    assert load_lines(moved, tmp_path / "b") == [
        "running statistics differ: bn.running_mean, bn.running_var, bn.num_batches_tracked (the adapter does not "
        "carry them)"
    ]


def test_load_adapter_checks_the_model_it_loads_into(saved):
    model = PeftModel.from_pretrained(make_base(), saved)
    model.load_adapter(saved, adapter_name="again")  # same base: silent
    with torch.no_grad():
        model.get_base_model().head.bias[0] += 1.0
    with pytest.warns(BaseMismatchWarning, match=r"adapter 'third' from .*\n- 1 of 6 tensors differ in value, "
                                                 r"e\.g\. head\.bias: was the adapter"):
        model.load_adapter(saved, adapter_name="third")
    assert "third" in model.peft_config  # warn mode: loaded anyway


def test_error_mode_raises_before_from_pretrained_changes_the_base(enabled, saved):
    peft_buffers.enable(base_check="error")
    base = make_base(seed=1)
    before = model_fingerprint(base)
    with pytest.raises(BaseMismatch) as raised:
        PeftModel.from_pretrained(base, saved)
    assert isinstance(raised.value, PeftBuffersError)
    assert raised.value.differences == [
        "4 of 6 tensors differ in value, e.g. fc.weight, fc.bias: was the adapter trained on another base or "
        "revision?"]
    assert str(raised.value).endswith(FIX + " Nothing was loaded.")
    assert_unchanged(before, base)


def test_error_mode_raises_before_load_adapter_changes_the_model(enabled, saved):
    model = PeftModel.from_pretrained(make_base(), saved)
    peft_buffers.enable(base_check="error")  # a second enable() updates the mode
    with torch.no_grad():
        model.get_base_model().fc.weight[0, 0] += 1.0
    before = model_fingerprint(model, extra=extra_state_of_every_adapter)
    with pytest.raises(BaseMismatch, match="fc.weight"):
        model.load_adapter(saved, adapter_name="second")
    assert_unchanged(before, model, extra=extra_state_of_every_adapter)
    assert list(model.peft_config) == ["default"]


def test_off_mode_records_nothing_checks_nothing_and_reads_no_tensor(enabled, saved, tmp_path, monkeypatch):
    def no_fingerprints(tensors):
        raise AssertionError("base_check='off' must not fingerprint anything")

    peft_buffers.enable(base_check="off")
    monkeypatch.setattr(_base_identity, "start_fingerprints", no_fingerprints)
    trained().save_pretrained(tmp_path / "off", safe_serialization=True)
    assert (tmp_path / "off" / WEIGHTS).is_file() and not (tmp_path / "off" / SIDECAR).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PeftModel.from_pretrained(make_base(seed=1), saved)
        model.load_adapter(saved, adapter_name="second")


def test_base_check_takes_only_the_three_modes(enabled):
    with pytest.raises(ValueError, match="enable\\(base_check='strict'\\): expected one of 'warn', 'error', 'off'"):
        peft_buffers.enable(base_check="strict")


def test_the_base_is_read_once_per_load_and_not_again_for_the_next_adapter(saved, monkeypatch):
    counted = []

    def counting(tensors):
        counted.append(len(tensors))
        return start(tensors)

    start = _base_identity.start_fingerprints
    monkeypatch.setattr(_base_identity, "start_fingerprints", counting)
    model = PeftModel.from_pretrained(make_base(), saved)  # from_pretrained loads through load_adapter: once
    assert counted == [6]
    model.load_adapter(saved, adapter_name="second")  # nothing changed: the fingerprints are reused
    assert counted == [6]
    with torch.no_grad():
        model.get_base_model().head.bias[0] += 1.0  # one tensor changed: only it is read again
    with pytest.warns(BaseMismatchWarning):
        model.load_adapter(saved, adapter_name="third")
    assert counted == [6, 1]


def test_a_stock_folder_loads_silently_onto_any_base(enabled, tmp_path):
    peft_buffers.disable()
    trained().save_pretrained(tmp_path, safe_serialization=True)
    peft_buffers.enable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(make_base(seed=1), tmp_path)


def test_an_unreadable_record_is_said_and_the_load_goes_on(saved):
    (saved / SIDECAR).write_text("{not json")
    with pytest.warns(PeftBuffersWarning, match="could not compare the base model .* not valid JSON"):
        model = PeftModel.from_pretrained(make_base(), saved)
    assert "default" in model.peft_config


def test_modules_to_save_originals_are_not_recorded(enabled, tmp_path):
    model = trained(modules_to_save=["head"])
    model.save_pretrained(tmp_path, safe_serialization=True)
    left_out = json.loads((tmp_path / SIDECAR).read_text())["not_recorded"]["carried by the adapter file"]
    assert {"head.weight", "head.bias"} <= set(left_out)
    base = make_base()
    with torch.no_grad():
        base.head.weight.add_(1.0)  # the adapter brings its own copy of head: nothing to say
    assert load_lines(base, tmp_path) == []


def test_inspect_shows_the_recorded_base(saved, capsys):
    assert main(["inspect", str(saved)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"  base model ({SIDECAR}): 6 tensors (float32 6), not quantized, 3 carried by the adapter file")


def test_convert_copies_the_record_byte_for_byte(saved, capsys):
    converted = saved.parent / "converted"
    assert main(["convert", str(saved), "--to-peft", "0.13", "--out", str(converted)]) == 0
    assert (converted / SIDECAR).read_bytes() == (saved / SIDECAR).read_bytes()
    assert load_lines(make_base(seed=1), converted)[0].startswith("4 of 6 tensors differ in value")


def test_explain_and_check_reload_name_the_other_base(saved):
    with pytest.warns(BaseMismatchWarning):
        loaded = PeftModel.from_pretrained(make_base(seed=1), saved)
    finding = [f for f in peft_buffers.explain(loaded.eval()) if f.kind == "base_differs"]
    assert [f.message for f in finding] == [
        "adapter 'default' was loaded onto another base model than the one it was trained on: 4 of 6 tensors "
        "differ in value, e.g. fc.weight, fc.bias: was the adapter trained on another base or revision?"]
    report = peft_buffers.check_reload(trained(), torch.randn(4, 8), lambda: make_base(seed=1))
    assert "make_base() is not the base adapter 'default' was trained on (as recorded when it was saved): 4 of 6 " \
           "tensors differ in value" in "\n".join(report.notes)
    assert not any("warning while saving or loading" in note for note in report.notes)


def test_check_reload_reports_instead_of_raising_in_error_mode(saved):
    peft_buffers.enable(base_check="error")
    report = peft_buffers.check_reload(trained(), torch.randn(4, 8), lambda: make_base(seed=1))
    assert not report.equal and any("make_base() is not the base" in note for note in report.notes)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def test_an_llm_weights_file_stays_byte_identical_to_stocks_beside_its_record(enabled, tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    model.save_pretrained(tmp_path / "ours", safe_serialization=True)
    peft_buffers.disable()
    model.save_pretrained(tmp_path / "stock", safe_serialization=True)
    assert (tmp_path / "ours" / WEIGHTS).read_bytes() == (tmp_path / "stock" / WEIGHTS).read_bytes()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(
        [SIDECAR] + [p.name for p in (tmp_path / "stock").iterdir()])
    recorded = json.loads((tmp_path / "ours" / SIDECAR).read_text())
    assert recorded["tensor_count"] == len(tiny_llama().state_dict())
    assert recorded["not_recorded"] == {}
    peft_buffers.enable()
    assert load_lines(tiny_llama().to(torch.bfloat16), tmp_path / "ours") == [
        f"trained on float32 weights, loading onto bfloat16 ({recorded['tensor_count']} tensors)"]


@requires_native_adapters
def test_transformers_native_load_adapter_checks_the_base(saved):
    from transformers import LlamaConfig  # noqa: F401 - transformers present: its adapter methods are hooked

    llama_dir = saved.parent / "llama"
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(llama_dir, safe_serialization=True)
    base = tiny_llama()
    with torch.no_grad():
        base.model.norm.weight[3] += 1.0
    with pytest.warns(BaseMismatchWarning, match=r"1 of \d+ tensors differ in value, e\.g\. model\.norm\.weight"):
        base.load_adapter(str(llama_dir), adapter_name="native")


# ------------------------------------------------------------------------------ 4-bit (bitsandbytes) bases


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama_4bit")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


def llama_base(path, quantized: bool = True, **settings):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(path)
    config = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    config.update(settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**config),
                                                device_map=device)


def test_a_qlora_adapter_names_another_quantization(enabled, llama_checkpoint, tmp_path):
    # The seed report: a Gemma-2B QLoRA adapter reloaded with another BitsAndBytesConfig predicted differently.
    model = get_peft_model(llama_base(llama_checkpoint), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / SIDECAR).read_text())["quantization"] == {
        "method": "bitsandbytes", "bits": 4, "quant_type": "nf4", "compute_dtype": "float32", "double_quant": False,
        "storage": "uint8"}
    assert load_lines(llama_base(llama_checkpoint), tmp_path) == []
    assert load_lines(llama_base(llama_checkpoint, quantized=False), tmp_path) == [
        "trained with bitsandbytes 4-bit nf4, compute dtype float32; this base is not quantized"]
    assert load_lines(llama_base(llama_checkpoint, bnb_4bit_quant_type="fp4"), tmp_path) == [
        "trained with bitsandbytes 4-bit nf4, compute dtype float32; this base: bitsandbytes 4-bit fp4, compute "
        "dtype float32"]
    assert load_lines(llama_base(llama_checkpoint, bnb_4bit_compute_dtype=torch.bfloat16), tmp_path) == [
        "trained with bitsandbytes 4-bit nf4, compute dtype float32; this base: bitsandbytes 4-bit nf4, compute "
        "dtype bfloat16"]


def test_an_unquantized_adapter_names_a_quantized_base(enabled, llama_checkpoint, tmp_path):
    model = get_peft_model(llama_base(llama_checkpoint, quantized=False), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert load_lines(llama_base(llama_checkpoint), tmp_path) == [
        "trained without quantization; this base: bitsandbytes 4-bit nf4, compute dtype float32"]


def test_a_quantized_model_that_ran_on_the_cpu_is_checked_in_its_saved_layout(enabled, llama_checkpoint, tmp_path):
    # bitsandbytes repacks 4-bit weights on the first eval forward on a CPU: the same base all the same
    model = get_peft_model(llama_base(llama_checkpoint), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = PeftModel.from_pretrained(llama_base(llama_checkpoint), tmp_path)
    with torch.no_grad():
        loaded.eval()(input_ids=torch.tensor([[1, 2, 3]], device=loaded.device))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        loaded.load_adapter(tmp_path, adapter_name="second")


def test_a_record_can_be_copied_with_the_folder(saved):
    shutil.copytree(saved, saved.parent / "copy")
    assert load_lines(make_base(), saved.parent / "copy") == []


def test_hotswap_checks_the_base_it_swaps_onto(saved):
    pytest.importorskip("peft.utils.hotswap", reason="peft.utils.hotswap is new in PEFT 0.14")
    from peft.utils.hotswap import hotswap_adapter

    model = PeftModel.from_pretrained(make_base(), saved).eval()
    hotswap_adapter(model, str(saved), adapter_name="default")  # the same base: silent
    with torch.no_grad():
        model.get_base_model().head.weight[0, 1] += 1.0
    with pytest.warns(BaseMismatchWarning, match=r"1 of 6 tensors differ in value, e\.g\. head\.weight"):
        hotswap_adapter(model, str(saved), adapter_name="default")


@requires_native_adapters
def test_a_transformers_native_save_records_the_base(enabled, tmp_path):
    model = tiny_llama()
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="native")
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / SIDECAR).read_text())
    assert recorded["tensor_count"] == len(tiny_llama().state_dict())
    assert load_lines(tiny_llama().to(torch.float64), tmp_path) == [
        f"trained on float32 weights, loading onto float64 ({recorded['tensor_count']} tensors)"]
