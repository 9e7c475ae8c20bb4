"""The bilevel programs of the cost table (`bench_cost_table.py`), in plain PyTorch.

Each program is a lower model trained on a loss weighted by a small upper model, and an upper
loss on a separate batch that reaches the upper only through the hypergradient:

* ``mwn-wide`` (parameter-dominated): Meta-Weight-Net with a classifier MLP 64-4096-4096-10
  (17.1M parameters; SGD lr 0.1, momentum 0.9), weight net 1-100-1 with a sigmoid (Adam lr
  1e-3), batch 100, 10 classes.
* ``lm`` (parameter-dominated): a decoder-only transformer language model written below
  (vocabulary 4096, width 384, 6 blocks of 6 heads, context 32, tied embedding: 12.3M
  parameters; AdamW lr 1e-4), trained on 8 synthetic domains with learned per-domain weights
  ``D * softmax(logits)[domain]`` (Adam lr 1e-2); batch 4 sequences of 32 tokens; the upper loss
  is the unweighted language-model loss on a batch of the target domain.
* ``mlp-act`` (activation-dominated): a residual MLP (`CheckpointedMLP`, 1.1M parameters) on
  a batch of 1000, whose activations (about 32 MB) are several times its parameters,
  gradients and momentum; SGD momentum lower, the weight net upper. With ``checkpointing`` its
  blocks run under ``betty.activation_checkpoint`` (``torch.utils.checkpoint``, non-reentrant,
  recomputing with the weights of the step it belongs to, which reverse mode needs).

Data is random with a fixed seed (cost does not depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from betty import activation_checkpoint

Batch = tuple[Tensor, ...]


@dataclass
class Program:
    name: str
    regime: str
    lower_module: Callable[[], nn.Module]
    upper_module: Callable[[], nn.Module]
    lower_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]
    upper_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]
    lower_loss: Callable[[nn.Module, nn.Module, Batch], Tensor]
    upper_loss: Callable[[nn.Module, Batch], Tensor]
    batches: Callable[[int], tuple[Batch, Batch]]  # seed -> (train batch, meta batch)


# -- Meta-Weight-Net programs ----------------------------------------------------------------
def weight_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())


def reweighted_loss(clf: nn.Module, wnet: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    losses = F.cross_entropy(clf(x), y, reduction="none")
    weights = wnet(losses.detach().unsqueeze(1)).squeeze(1)
    return (weights * losses).mean()


def meta_loss(clf: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(clf(x), y)


def classification_batches(size: int, seed: int) -> tuple[Batch, Batch]:
    gen = torch.Generator().manual_seed(seed)

    def one() -> Batch:
        return torch.rand(size, 64, generator=gen), torch.randint(0, 10, (size,), generator=gen)

    return one(), one()


class CheckpointedMLP(nn.Module):
    """64 -> 128, four residual blocks ``h + fc2(gelu(fc1(h)))`` of width 128 with a hidden
    width of 1024, -> 10. Each block saves two 1024-wide activations for backward; with
    ``use_checkpoint`` each block runs under ``betty.activation_checkpoint`` and saves only its
    128-wide input (the inside is recomputed during backward, one block at a time)."""

    def __init__(self, use_checkpoint: bool) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.stem = nn.Linear(64, 128)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(128, 1024), nn.GELU(), nn.Linear(1024, 128))
            for _ in range(4))
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + (activation_checkpoint(block, h) if self.use_checkpoint
                     else block(h))
        return self.head(h)


def sgd_momentum(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(lr: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr)


# -- the language model -----------------------------------------------------------------------
VOCAB, WIDTH, BLOCKS, HEADS, CONTEXT, DOMAINS = 4096, 384, 6, 6, 32, 8


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention written out (so that every method,
    double backward included, runs through it), then a GELU MLP of width 4x."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // HEADS)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attention = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.ln = nn.LayerNorm(WIDTH)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln(h) @ self.embed.weight.t()  # tied output embedding


class DomainWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(DOMAINS))

    def forward(self, domains: Tensor) -> Tensor:
        return DOMAINS * self.logits.softmax(0)[domains]


def sequence_losses(lm: nn.Module, tokens: Tensor) -> Tensor:
    logits = lm(tokens[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1),
                                reduction="none")
    return per_token.view(tokens.shape[0], -1).mean(1)


def domain_weighted_loss(lm: nn.Module, weights: nn.Module, batch: Batch) -> Tensor:
    tokens, domains = batch
    return (weights(domains) * sequence_losses(lm, tokens)).mean()


def target_loss(lm: nn.Module, batch: Batch) -> Tensor:
    return sequence_losses(lm, batch[0]).mean()


def lm_batches(size: int, seed: int) -> tuple[Batch, Batch]:
    gen = torch.Generator().manual_seed(seed)
    train = (torch.randint(0, VOCAB, (size, CONTEXT + 1), generator=gen),
             torch.randint(0, DOMAINS, (size,), generator=gen))
    meta = (torch.randint(0, VOCAB, (size, CONTEXT + 1), generator=gen),
            torch.zeros(size, dtype=torch.long))
    return train, meta


def lm_module() -> nn.Module:
    return TinyLM()


# -- registry ---------------------------------------------------------------------------------
def program(name: str, checkpointing: bool = False) -> Program:
    if name == "mwn-wide":
        return Program(
            name, "parameter", lambda: nn.Sequential(
                nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                nn.Linear(4096, 10)),
            weight_net, sgd_momentum, adam(1e-3), reweighted_loss, meta_loss,
            lambda seed: classification_batches(100, seed))
    if name == "lm":
        return Program(name, "parameter", lm_module, DomainWeights,
                       lambda p: torch.optim.AdamW(p, lr=1e-4), adam(1e-2),
                       domain_weighted_loss, target_loss, lambda seed: lm_batches(4, seed))
    if name == "mlp-act":
        return Program(name, "activation", lambda: CheckpointedMLP(checkpointing), weight_net,
                       sgd_momentum, adam(1e-3), reweighted_loss, meta_loss,
                       lambda seed: classification_batches(1000, seed))
    raise KeyError(name)


PROGRAMS = ("mwn-wide", "lm", "mlp-act")


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
