"""A byte-level decoder-only language model from a Hugging Face `GPT2Config` (no download).

Bytes are the tokens (vocabulary 256), so no tokenizer is needed and the loss in bits per
byte is comparable across domains and models. The model is initialised from the config;
GPT-2 ties the output layer to the input embedding (one parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256


@dataclass(frozen=True)
class ModelSize:
    width: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 128
    dropout: float = 0.0

    def parameters(self) -> int:
        return sum(p.numel() for p in byte_lm(self).parameters())


def byte_lm(size: ModelSize, attention: str = "sdpa") -> nn.Module:
    """``GPT2LMHeadModel`` over bytes, randomly initialised with torch's current seed.

    ``attention="eager"`` for second-order methods (cg, neumann): torch's fused CPU attention
    kernel (float32/bf16 ``sdpa``) has no double backward; the parameters are the same."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(attn_implementation=attention, vocab_size=VOCAB,
                        n_positions=size.context, n_embd=size.width,
                        n_layer=size.layers, n_head=size.heads, resid_pdrop=size.dropout,
                        embd_pdrop=size.dropout, attn_pdrop=size.dropout,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def sequence_losses(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of each window ``[..., L]``: predicts bytes 1..L-1
    from their prefixes; shape ``windows.shape[:-1]``."""
    flat = windows.reshape(-1, windows.shape[-1])
    logits = model(input_ids=flat[:, :-1]).logits
    losses = F.cross_entropy(logits.transpose(1, 2).float(), flat[:, 1:], reduction="none")
    return losses.mean(-1).reshape(windows.shape[:-1])


@torch.no_grad()
def bits_per_byte(model: nn.Module, windows: torch.Tensor, batch: int = 64) -> float:
    """Mean over every predicted byte of ``windows`` ``[W, L]`` of ``-log2 p(byte | prefix)``
    (all windows have the same length, so the mean of window means is the byte mean)."""
    was_training = model.training
    model.eval()
    total = sum(sequence_losses(model, windows[i:i + batch]).sum().item()
                for i in range(0, len(windows), batch))
    model.train(was_training)
    return total / len(windows) / math.log(2)
