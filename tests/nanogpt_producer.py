"""nanoGPT's model and checkpoint save, reproduced from its source for the tests (nanoGPT is a repository of
scripts, not a package: nothing installs). Followed from github:karpathy/nanoGPT at 3adf61e:

- ``model.py``: ``GPT`` (``transformer.{wte, wpe, drop, h, ln_f}``, ``lm_head`` tied to ``wte``), its
  ``LayerNorm`` with optional bias, ``CausalSelfAttention`` on the flash path (torch >= 2: no ``bias``
  buffer), ``MLP``, ``Block``, ``_init_weights`` and ``configure_optimizers`` (AdamW, two groups);
- ``train.py``: the checkpoint it writes after an eval, ``{'model': raw_model.state_dict(), 'optimizer':
  optimizer.state_dict(), 'model_args', 'iter_num', 'best_val_loss' (a 0-d tensor: losses['val']),
  'config'}`` to ``out_dir/ckpt.pt``, where ``raw_model`` is ``torch.compile(model)`` when ``compile`` is
  set (its names then start ``_orig_mod.``) and ``model.module`` under DDP.

The run keeps each eval's ``ckpt.pt`` (copied to ``iter_<n>/``): train.py overwrites one file.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k, q, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (k, q, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))


def write_nanogpt_run(out: Path, evals: list[int], compile_from: int | None = None) -> dict[int, dict]:
    """Train a tiny GPT as train.py does and keep ``ckpt.pt`` after each eval at ``evals`` (iterations),
    the model compiled from iteration ``compile_from`` on (``torch.compile`` wraps it: ``_orig_mod.``).
    Returns each save's model weights under the names ``GPT`` loads, the expectation."""
    torch.manual_seed(0)
    model_args = asdict(GPTConfig())
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(0.1, 1e-2)
    config = {"batch_size": 4, "learning_rate": 1e-2, "compile": compile_from is not None, "out_dir": "out"}
    best_val_loss = torch.tensor(1e9)
    saved: dict[int, dict] = {}
    raw_model: nn.Module = model
    for iter_num in range(max(evals) + 1):
        if compile_from is not None and iter_num == compile_from:
            raw_model = torch.compile(model)  # train.py: model = torch.compile(model); raw_model = model
        if iter_num in evals:
            with torch.no_grad():
                x = torch.randint(0, 64, (4, 16))
                best_val_loss = model(x, x)[1].detach()  # estimate_loss(): out['val'] = losses.mean()
            checkpoint = {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "model_args": model_args,
                "iter_num": iter_num,
                "best_val_loss": best_val_loss,
                "config": config,
            }
            (out / "ckpt").mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, out / "ckpt" / "ckpt.pt")
            (out / f"iter_{iter_num}").mkdir()
            shutil.copy(out / "ckpt" / "ckpt.pt", out / f"iter_{iter_num}" / "ckpt.pt")
            saved[iter_num] = {n: t.detach().clone() for n, t in model.state_dict().items()}
        x = torch.randint(0, 64, (4, 16))
        _, loss = model(x, torch.roll(x, 1, 1))  # the compiled module runs this same forward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    shutil.rmtree(out / "ckpt")
    return saved
