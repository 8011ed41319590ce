"""A small MoE language model of our own, trained on the Python standard library's source,
whose routing traces stand in for a real model's.

The routing shape (experts, layers, top-k, renormalization, activation) matches the
offloading presets; d_model is scaled down so that training fits a 2-core CPU. Bytes are the
tokens (vocabulary 256). Options: the Switch auxiliary load-balancing loss (coefficient
0 turns it off) and a capacity factor (overflowing tokens skip the expert, as in Switch).
Training records per-expert utilization at checkpoints: the load-balancing result.
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..baselines import expert_activation
from ..config import ExpertShape
from ..dtypes import itemsize
from ..routing import route, route_torch
from .models import MODELS
from .trace import Trace


@dataclass(frozen=True)
class LMConfig:
    num_experts: int
    num_layers: int
    top_k: int
    renormalize: bool
    activation: str = "relu"
    d_model: int = 64
    d_ff: int = 128
    n_heads: int = 4
    seq_len: int = 64
    aux_loss_coef: float = 0.01
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"LMConfig.top_k must be in [1, {self.num_experts}], got {self.top_k}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"LMConfig.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"LMConfig.capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if self.d_model % self.n_heads:
            raise ValueError(f"LMConfig.d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")

    @property
    def expert(self) -> ExpertShape:
        """The shape of each expert's FFN."""
        return ExpertShape(self.d_model, self.d_ff, self.activation)


def lm_config_for(preset: str, *, aux_loss: bool = True, capacity_factor: float | None = None,
                  d_model: int = 64) -> LMConfig:
    """The trained model's shape for an offloading preset: same E, layers, top-k, activation."""
    if preset not in MODELS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(MODELS)}")
    m = MODELS[preset]
    # Per-token active FFN width about 2*d_model for top-1 and top-8 alike keeps both
    # presets' training cost similar.
    d_ff = max(16, 2 * d_model // m.top_k) if m.top_k > 1 else 2 * d_model
    return LMConfig(
        num_experts=m.num_experts, num_layers=m.num_layers, top_k=m.top_k,
        renormalize=m.top_k > 1, activation=m.activation, d_model=d_model, d_ff=d_ff,
        aux_loss_coef=0.01 if aux_loss else 0.0, capacity_factor=capacity_factor,
    )


class MoEFFN(nn.Module):
    """Top-k routed experts; the expert GEMMs run as one grouped GEMM over tokens sorted by expert."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
        self.router = nn.Linear(d, e, bias=False)
        self.w_in = nn.Parameter(torch.randn(e, d, cfg.expert.w1_cols) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(e, f, d) / math.sqrt(f))

    def forward(self, h: torch.Tensor):
        """h: [tokens, d]. Returns (out, aux_loss, tokens per expert)."""
        cfg = self.cfg
        tokens = h.shape[0]
        probs, experts, weights = route_torch(self.router(h), cfg.top_k, cfg.renormalize)
        flat_expert = experts.reshape(-1)
        flat_token = torch.arange(tokens, device=h.device).repeat_interleave(cfg.top_k)
        flat_weight = weights.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        sorted_expert = flat_expert[order]
        counts = torch.bincount(flat_expert, minlength=cfg.num_experts)
        if cfg.capacity_factor is not None:
            capacity = math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.num_experts)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(len(order), device=h.device) - starts[sorted_expert]
            keep = rank < capacity
            order, sorted_expert = order[keep], sorted_expert[keep]
            counts = torch.bincount(sorted_expert, minlength=cfg.num_experts)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        token_of = flat_token[order]
        x = h[token_of]
        a = expert_activation(torch._grouped_mm(x, self.w_in, offs=offsets), cfg.activation)
        y = torch._grouped_mm(a, self.w_out, offs=offsets) * flat_weight[order, None]
        out = torch.zeros_like(h).index_add_(0, token_of, y)
        # Switch auxiliary loss E * sum_i f_i P_i, f_i over all k assignments.
        f = torch.bincount(flat_expert, minlength=cfg.num_experts).float() / flat_expert.numel()
        aux = cfg.num_experts * (f * probs.mean(0)).sum()
        return out, aux, torch.bincount(flat_expert, minlength=cfg.num_experts)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoEFFN(cfg)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.cfg.n_heads, d // self.cfg.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return x + self.proj(a.transpose(1, 2).reshape(b, t, d))


class MoELM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens: torch.Tensor):
        """tokens: [batch, seq] bytes. Returns (logits, mean aux loss, [layers, E] tokens per expert)."""
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos[:t]
        aux, counts = [], []
        for block in self.blocks:
            x = block.attend(x)
            y, layer_aux, layer_counts = block.moe(block.ln2(x).reshape(b * t, -1))
            x = x + y.view(b, t, -1)
            aux.append(layer_aux)
            counts.append(layer_counts)
        logits = self.ln_f(x) @ self.embed.weight.T
        return logits, torch.stack(aux).mean(), torch.stack(counts)

    @torch.no_grad()
    def routing(self, tokens: torch.Tensor):
        """Per token and layer: router logits of that layer, and of the *next* layer's router
        applied to this layer's router input (the Pre-gated MoE signal). Both [layers, b*t, E]."""
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos[:t]
        own, ahead = [], []
        for i, block in enumerate(self.blocks):
            x = block.attend(x)
            h = block.ln2(x).reshape(b * t, -1)
            own.append(block.moe.router(h))
            if i + 1 < len(self.blocks):
                ahead.append(self.blocks[i + 1].moe.router(h))
            y, _, _ = block.moe(h)
            x = x + y.view(b, t, -1)
        return torch.stack(own), torch.stack(ahead) if ahead else None


# -- corpus ----------------------------------------------------------------

def stdlib_corpus() -> tuple[bytes, bytes, dict]:
    """(train, test, description): the top-level .py files of this Python's standard
    library, split by a hash of the file name (about 1 file in 10 held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise RuntimeError(f"no Python source files under {root}: the corpus is missing")
    train, test = [], []
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(path.name.encode() + data)
        held_out = hashlib.sha256(path.name.encode()).digest()[0] < 26  # ~10%
        (test if held_out else train).append(data)
    desc = {"corpus": f"Python {sys.version.split()[0]} stdlib top-level *.py", "files": len(files),
            "sha256": digest.hexdigest()[:16], "train_bytes": sum(map(len, train)),
            "test_bytes": sum(map(len, test))}
    return b"\n".join(train), b"\n".join(test), desc


def _windows(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))


def utilization_summary(counts: np.ndarray) -> dict:
    """counts: [layers, E] tokens per expert. Balance = exp(entropy) / E (1 = uniform);
    max_share = the busiest expert's share; dead = experts that got no token."""
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(share > 0, share * np.log(share), 0.0), axis=1)
    e = counts.shape[1]
    return {"balance": float(np.mean(np.exp(ent) / e)), "max_share": float(share.max(axis=1).mean()),
            "dead_fraction": float((counts == 0).mean())}


def train(cfg: LMConfig, *, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0,
          log_every: int = 25, progress=None) -> tuple[MoELM, dict]:
    """Train with AdamW on random windows of the training corpus; returns the model and a
    log with loss, validation loss and per-expert utilization at every checkpoint."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_bytes, test_bytes, corpus = stdlib_corpus()
    train_data = np.frombuffer(train_bytes, dtype=np.uint8)
    test_data = np.frombuffer(test_bytes, dtype=np.uint8)
    val_starts = np.random.default_rng(seed + 1).integers(0, len(test_data) - cfg.seq_len - 1, size=64)
    val = _windows(test_data, val_starts, cfg.seq_len + 1)
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    log = {"config": asdict(cfg), "corpus": corpus, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
           "checkpoints": []}
    start = time.perf_counter()
    window_counts = np.zeros((cfg.num_layers, cfg.num_experts))
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(train_data) - cfg.seq_len - 1, size=batch)
        xy = _windows(train_data, starts, cfg.seq_len + 1)
        logits, aux, counts = model(xy[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, 256), xy[:, 1:].reshape(-1))
        loss = lm_loss + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        window_counts += counts.numpy()
        if step % log_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                val_logits, _, _ = model(val[:, :-1])
                val_loss = F.cross_entropy(val_logits.reshape(-1, 256), val[:, 1:].reshape(-1)).item()
            model.train()
            log["checkpoints"].append({
                "step": step, "seconds": round(time.perf_counter() - start, 2),
                "loss": round(lm_loss.item(), 4), "aux_loss": round(aux.item(), 4),
                "val_loss": round(val_loss, 4), "val_bits_per_byte": round(val_loss / math.log(2), 4),
                "tokens_per_expert": window_counts.astype(np.int64).tolist(),
                **utilization_summary(window_counts),
            })
            window_counts[:] = 0
            if progress is not None:
                progress(step, log["checkpoints"][-1])
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    return model, log


def capture_trace(model: MoELM, *, requests: int, seed: int = 0, source: dict | None = None) -> Trace:
    """Route `requests` held-out windows of seq_len bytes through the model (no capacity
    limit: inference routes every token) and record experts, weights and the pre-gate."""
    cfg = model.cfg
    _, test_bytes, corpus = stdlib_corpus()
    data = np.frombuffer(test_bytes, dtype=np.uint8)
    starts = np.sort(np.random.default_rng(seed).choice(len(data) - cfg.seq_len, size=requests, replace=False))
    tokens = _windows(data, starts, cfg.seq_len)
    model.eval()
    own, ahead = model.routing(tokens)
    own, ahead = own.numpy(), None if ahead is None else ahead.numpy()
    _, experts, weights = route(own, cfg.top_k, cfg.renormalize)  # [layers, T, k]
    pregate = np.full_like(experts, -1)
    if ahead is not None:
        pregate[1:] = route(ahead, cfg.top_k, cfg.renormalize).ids
    meta = {
        "num_experts": cfg.num_experts, "num_layers": cfg.num_layers, "top_k": cfg.top_k,
        "renormalize": cfg.renormalize, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
        "expert_bytes": cfg.expert.nbytes(itemsize("float32")),  # the model trains in float32
        "source": {"kind": "pymoe-lm", "corpus": corpus, "requests": requests,
                   "tokens_per_request": cfg.seq_len, "seed": seed, **(source or {})},
    }
    return Trace(
        experts=experts.transpose(1, 0, 2), weights=weights.transpose(1, 0, 2),
        request_offsets=np.arange(requests + 1, dtype=np.int64) * cfg.seq_len,
        meta=meta, pregate=pregate.transpose(1, 0, 2),
    )


def train_and_trace(preset: str, *, aux_loss: bool, steps: int, requests: int, out_dir: Path,
                    capacity_factor: float | None = None, seed: int = 0, command: str = "",
                    checkpoint: Path | None = None, console=None) -> tuple[Path, Path]:
    """Train the preset's model, capture a trace of held-out text, write
    `<out_dir>/lm-<preset>-<aux|noaux>.npz` and its `.training.json` log. Returns both paths."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..results import result_header, write_json
    from .trace import save_trace

    cfg = lm_config_for(preset, aux_loss=aux_loss, capacity_factor=capacity_factor)
    stem = f"lm-{preset}-{'aux' if aux_loss else 'noaux'}"
    out_dir = Path(out_dir)
    console = console or Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(f"training {stem}", total=steps)

        def show(step: int, checkpoint_log: dict) -> None:
            bar.update(task, completed=step, description=(
                f"training {stem}: val {checkpoint_log['val_bits_per_byte']:.2f} bits/byte, "
                f"balance {checkpoint_log['balance']:.2f}"))

        model, log = train(cfg, steps=steps, seed=seed, progress=show)
    trace = capture_trace(model, requests=requests, seed=seed,
                          source={"preset": preset, "aux_loss": aux_loss, "train_steps": steps,
                                  "final_val_bits_per_byte": log["checkpoints"][-1]["val_bits_per_byte"]})
    trace_path = save_trace(trace, out_dir / f"{stem}.npz")
    log_path = write_json(out_dir / f"{stem}.training.json", {**result_header("pymoe.lm-training/1", command),
                                                               "preset": preset, "trace": trace_path.name, **log})
    if checkpoint is not None:
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": asdict(cfg), "state_dict": model.state_dict()}, checkpoint)
    return trace_path, log_path
