"""Train a tiny DeltaNet language model on associative recall, on whatever device is here.

    python -m linflow.demo            (under a minute on 2 CPU cores; seconds on a GPU)

Each sequence lists key-value pairs, then asks for the keys again in another order; the model must answer each
query with its value (multi-query associative recall, the task DeltaNet's delta rule is built for):

    k3 v3 k7 v7 k1 v1 ... | k7 -> v7   k1 -> v1   k3 -> v3 ...

Loss and accuracy count the answers only; chance accuracy is 1 / number of values. Training stops early once the
running training accuracy passes --target-acc, or when --max-seconds of training have passed.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from linflow.nn import DeltaNet


def recall_batch(batch: int, pairs: int, num_keys: int, num_values: int, device, generator: torch.Generator):
    """Token ids ``[batch, 4 * pairs]`` (keys ``0..num_keys-1``, values after them) and targets (-100 = no loss)."""
    keys = torch.rand(batch, num_keys, generator=generator).argsort(-1)[:, :pairs]          # distinct keys
    values = torch.randint(num_values, (batch, pairs), generator=generator) + num_keys
    order = torch.rand(batch, pairs, generator=generator).argsort(-1)                       # query order
    qk, qv = keys.gather(1, order), values.gather(1, order)
    tokens = torch.stack([torch.stack([keys, values], -1).flatten(1), torch.stack([qk, qv], -1).flatten(1)], 1)
    tokens = tokens.flatten(1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * pairs::2] = qv                                                           # after each query key
    return tokens.to(device), targets.to(device)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, use_gate: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.mixer = DeltaNet(d, heads, use_gate=use_gate)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, use_gate: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, use_gate) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Progress:
    """tqdm when it is installed, else a one-line bar of our own (plain lines when not on a terminal)."""

    def __init__(self, total: int):
        self.total, self.n, self.t0, self.tty = total, 0, time.time(), sys.stderr.isatty()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def update(self, info: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(1)
            return
        if not self.tty and self.n % max(1, self.total // 10) and self.n != self.total:
            return
        width, done = 30, self.n / self.total
        line = f"[{'#' * int(width * done):<{width}}] {self.n}/{self.total} {time.time() - self.t0:5.1f}s {info}"
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            print(file=sys.stderr)


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    loss = correct = count = 0.0
    for tokens, targets in batches:
        logits = model(tokens)
        mask = targets != -100
        loss += F.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
        correct += (logits[mask].argmax(-1) == targets[mask]).sum().item()
        count += mask.sum().item()
    model.train()
    return loss / count, correct / count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="most training steps")
    p.add_argument("--target-acc", type=float, default=0.99, help="stop once the running train accuracy passes this")
    p.add_argument("--max-seconds", type=float, default=90.0, help="stop training after this many seconds")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence (sequence = 4 x pairs)")
    p.add_argument("--keys", type=int, default=64)
    p.add_argument("--values", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--gate", action="store_true", help="Gated DeltaNet layers")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    steps = args.steps
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model = TinyLM(args.keys + args.values, args.dim, args.layers, args.heads, args.gate).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    T = 4 * args.pairs
    print(f"linflow demo: {args.layers}-layer {'Gated ' if args.gate else ''}DeltaNet LM, d={args.dim}, "
          f"{params / 1e3:.0f}k params, {device}; recall {args.pairs} pairs (T={T}), "
          f"chance accuracy {1 / args.values:.1%}", flush=True)

    bar, tokens_seen, t_train, ema, ema_acc, stop = Progress(steps), 0, 0.0, None, 0.0, ""
    for step in range(steps):
        tokens, targets = recall_batch(args.batch, args.pairs, args.keys, args.values, device, gen)
        t0 = time.perf_counter()
        with autocast:
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        tokens_seen += tokens.numel()
        mask = targets != -100
        acc = (logits.detach()[mask].argmax(-1) == targets[mask]).float().mean().item()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        ema_acc = 0.9 * ema_acc + 0.1 * acc
        bar.update(f"loss {ema:.3f} acc {ema_acc:.1%}")
        if ema_acc >= args.target_acc:
            stop = f"stopped at step {step + 1}: train accuracy {ema_acc:.1%} >= {args.target_acc:.0%}"
        elif t_train >= args.max_seconds:
            stop = f"stopped at step {step + 1}: {args.max_seconds:.0f} s training budget spent"
        if stop:
            break
    bar.close()
    if stop:
        print(stop)

    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    with autocast:
        val_loss, val_acc = evaluate(model, [recall_batch(256, args.pairs, args.keys, args.values, device, eval_gen)
                                             for _ in range(4)])
    result = dict(train_loss=ema, val_loss=val_loss, val_acc=val_acc, chance=1 / args.values,
                  tokens_per_s=tokens_seen / t_train, train_s=t_train)
    rows = [("steps", f"{step + 1}"), ("train loss (EMA)", f"{ema:.3f}"), ("held-out loss", f"{val_loss:.3f}"),
            ("held-out accuracy", f"{val_acc:.1%}  (chance {1 / args.values:.1%})"),
            ("tokens/s (train)", f"{tokens_seen / t_train:,.0f}"), ("train time", f"{t_train:.1f} s")]
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"  {k:<{w}}  {v}" for k, v in rows))
    return result


if __name__ == "__main__":
    main()
