"""Integrations with libraries that drive PEFT from outside a ``PeftModel`` (transformers-native adapters)."""

from .transformers_adapters import plan_transformers_hooks, transformers_status

__all__ = ["plan_transformers_hooks", "transformers_status"]
