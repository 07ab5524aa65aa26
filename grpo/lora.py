"""LoRA through PEFT: the adapter on a policy, the adapter-only state that is published, the reference with it off.

With `lora_rank` set, the policy workers and every rollout actor build the same adapter (`add_adapter`, from
`GRPOConfig.lora_config()`) on the same base weights. Only the adapter's parameters require gradients, so the
optimizer holds only them and DDP all-reduces only them (under FSDP2 the frozen base is sharded with the adapter
and only the adapter's gradients are reduce-scattered); each step rank 0 publishes `adapter_state` — a few
percent of the model — instead of the full weights, and the actors load it into their copy. The KL reference
is the policy with its adapter disabled (`AdapterOff`): no second copy of the base in memory.

Not here: checkpoints (grpo.trainer writes PEFT adapter directories), the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def add_adapter(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """`model` wrapped as a PEFT model with a fresh LoRA adapter (B = 0: it computes what the base does)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**lora))


def is_adapter_key(key: str) -> bool:
    return "lora_" in key


def adapter_state(model: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors only, on the CPU, keyed as in the PEFT model's state dict (so a rollout actor's
    PEFT model of the same config loads them with load_state_dict). `dtype` casts them, e.g. to bf16. Under
    FSDP2 every rank must call this: each adapter tensor is gathered from its shards (a few MB in all)."""
    inner = getattr(model, "module", model)  # under DDP
    out = {}
    for k, v in inner.state_dict().items():
        if is_adapter_key(k):
            if hasattr(v, "full_tensor"):  # a DTensor shard (FSDP2): all ranks gather it
                v = v.full_tensor()
            v = v.detach().to("cpu")
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
    if not out:
        raise ValueError("the model has no LoRA adapter tensors to publish")
    return out


class AdapterOff:
    """The base model under a LoRA policy, for the KL reference: the policy's own modules, called with the
    adapter disabled. Callable like the model; not a module (it owns no parameters of its own)."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
