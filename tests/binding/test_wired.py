"""With peft_buffers enabled, load_adapter / from_pretrained / set_peft_model_state_dict are atomic by themselves.

Guards issue 10 §1 (`issues show 10`) once the load hooks wrap PEFT's calls in peft_buffers.core.atomic:
the cases of tests/test_transaction.py, without any run_atomically in the test.
"""

from __future__ import annotations

import pytest
from peft import PeftModel
from peft.utils import save_and_load  # looked up at call time: binding the name would hide it from the patch
from safetensors.torch import load_file

import peft_buffers
from peft_buffers import PeftBuffersError

from .._atomic import assert_unchanged, extra_state_of_every_adapter, model_fingerprint
from .._load_failures import (
    ADAPTER_FILE,
    CASES,
    NEW_ADAPTER_CASES,
    SPECS,
    adapter_name_of,
    expected_for,
    model_with_default,
    wrong_shape_into_existing_adapter,
)


# https://github.com/huggingface/peft_buffers/issues/10 (§1)
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_enabled_load_adapter_is_atomic(enabled, tmp_path, spec_name, case):
    spec = SPECS[spec_name]
    expected = expected_for(case, case(spec, tmp_path))
    model = model_with_default(spec)
    before = model_fingerprint(model, extra=extra_state_of_every_adapter)

    with pytest.raises(expected) as raised:
        model.load_adapter(tmp_path, adapter_name_of(case))

    assert_unchanged(before, model, extra=extra_state_of_every_adapter)
    assert isinstance(raised.value, PeftBuffersError) or expected is AttributeError  # named, except PEFT 0.6's bug


# https://github.com/huggingface/peft_buffers/issues/10 (§1)
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("case", NEW_ADAPTER_CASES, ids=lambda c: c.__name__)
def test_enabled_from_pretrained_leaves_the_base_unchanged(enabled, tmp_path, spec_name, case):
    spec = SPECS[spec_name]
    expected = case(spec, tmp_path)
    base = spec.base().eval()
    before = model_fingerprint(base)

    with pytest.raises(expected):
        PeftModel.from_pretrained(base, tmp_path)

    assert_unchanged(before, base)


# https://github.com/huggingface/peft_buffers/issues/10 (§1)
@pytest.mark.parametrize("stock_file", [True, False], ids=["stock-file", "file-with-extra-state"])
@pytest.mark.parametrize("spec_name", SPECS)
def test_enabled_set_peft_model_state_dict_is_atomic(enabled, tmp_path, spec_name, stock_file):
    spec = SPECS[spec_name]
    if stock_file:
        peft_buffers.disable()  # saved without extra state
    wrong_shape_into_existing_adapter(spec, tmp_path)
    peft_buffers.enable()
    state_dict = load_file(str(tmp_path / ADAPTER_FILE))
    model = model_with_default(spec)
    before = model_fingerprint(model, extra=extra_state_of_every_adapter)

    with pytest.raises(PeftBuffersError):
        save_and_load.set_peft_model_state_dict(model, state_dict, adapter_name="default")

    assert_unchanged(before, model, extra=extra_state_of_every_adapter)
