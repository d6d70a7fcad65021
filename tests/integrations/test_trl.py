"""TRL's ``SFTTrainer(..., peft_config=...)``: ``trainer.save_model`` keeps a trained direct parameter (issue 12).

Two of the reports this project started from train with TRL: ``trainer.save_model``, then reload; and "did
training change only the adapter?". A tiny random-init Llama (transformers ``LlamaConfig``, offline) gets a
LoRA adapter from ``SFTTrainer`` and its final RMSNorm weight unfrozen: PEFT does not save that weight, so the
reloaded model computes something else; with ``peft_buffers.enable()`` the reload is bitwise equal and
``peft_buffers.audit`` around ``trainer.train()`` lists exactly the adapter and the unfrozen weight.

Needs ``trl`` and ``datasets`` (not test requirements): run ``nox -s trl``, which pins them.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import peft_buffers

pytest.importorskip("trl", reason="trl is not installed: run `nox -s trl`")
pytest.importorskip("datasets", reason="datasets is not installed: run `nox -s trl`")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

WORDS = "the a cat dog sat ran on under mat rug and then slept".split()
SPECIALS = ["<pad>", "<eos>", "<unk>"]
UNFROZEN = "model.norm.weight"  # the final RMSNorm: a direct parameter, outside what PEFT saves
SAVED_KEY = f"base_model.model.{UNFROZEN}"


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_llama(seed: int = 0):
    """A random-init 2-layer Llama; the same ``seed`` gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def dataset():
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=generator).tolist())
             for _ in range(12)]
    return Dataset.from_dict({"text": texts})


def sft_trainer(output_dir) -> SFTTrainer:
    """``SFTTrainer`` wraps the model with ``peft_config``; the final norm weight is then unfrozen by hand."""
    args = SFTConfig(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     lr_scheduler_type="constant", max_length=16, bf16=False, use_cpu=True, report_to="none",
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                     seed=0)
    peft_config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=dataset(), processing_class=tokenizer(),
                         peft_config=peft_config)
    assert isinstance(trainer.model, PeftModel)
    trainer.model.get_base_model().get_parameter(UNFROZEN).requires_grad_(True)
    return trainer


def logits(model) -> torch.Tensor:
    model.eval()
    input_ids = torch.tensor([[3, 5, 7, 9, 11, 4], [6, 8, 10, 12, 14, 3]])
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def train_save_reload(tmp_path):
    trainer = sft_trainer(tmp_path / "run")
    with peft_buffers.audit(trainer.model) as report:
        trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        saved_keys = set(handle.keys())
    return trainer.model, reloaded, report, saved_keys


def lora_names(model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, parameter in model.named_parameters()
            if "lora_" in name and parameter.requires_grad}


def test_sft_trainer_save_model_keeps_the_unfrozen_norm_and_reloads_bitwise(enabled, tmp_path):
    trained, reloaded, report, saved_keys = train_save_reload(tmp_path)

    assert torch.equal(logits(reloaded), logits(trained))
    assert SAVED_KEY in saved_keys
    assert torch.equal(reloaded.get_base_model().get_parameter(UNFROZEN),
                       trained.get_base_model().get_parameter(UNFROZEN))
    # The audit: exactly the adapter and the unfrozen weight changed, and the weight is in the file.
    assert [(e.name, e.status) for e in report.base_changed] == [(UNFROZEN, "saved by peft_buffers")]
    assert {e.name for e in report.adapters_changed} == lora_names(trained) and len(lora_names(trained)) == 8
    assert report.adapters_unchanged == [] and report.not_saved == []
    report.assert_only_adapters_changed(allow=[UNFROZEN])


def test_without_peft_buffers_the_same_run_loses_the_norm(stock, tmp_path):
    trained, reloaded, report, saved_keys = train_save_reload(tmp_path)

    assert not torch.equal(logits(reloaded), logits(trained))
    assert SAVED_KEY not in saved_keys
    assert [(e.name, e.status) for e in report.not_saved] == [
        (UNFROZEN, "CHANGED BUT NOT SAVED (peft_buffers would save it: call peft_buffers.enable() before saving)")]
