"""Train the embedded tokenizer and models (``quantmoe zoo corpus|tokenizer|train``)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quantmoe.atomic import atomic_write, atomic_write_text
from quantmoe.data import tokenize_text
from quantmoe.zoo.recipes import EOS_TOKEN, VOCAB_SIZE, Recipe

log = logging.getLogger(__name__)


def train_tokenizer(train_text: Path, out_dir: Path) -> None:
    """Byte-level BPE with VOCAB_SIZE tokens, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS_TOKEN], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([str(train_text)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    fast.model_max_length = 512
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def build_model(recipe: Recipe):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(recipe.model_type, **recipe.config, initializer_range=recipe.init_std)
    torch.manual_seed(recipe.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_router = name.endswith("mlp.gate.weight")
        (decay if p.ndim >= 2 and not is_router else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, recipe: Recipe) -> float:
    warmup = max(1, int(recipe.warmup_fraction * recipe.steps))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


class _RouterLoad:
    """Counts routed tokens per expert of every DeepSeek-V3 router (for loss-free balancing)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.counts = {id(r): torch.zeros(r.num_experts) for r in self.routers}
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, _inputs, outputs) -> None:
        idx = outputs[2].reshape(-1)
        self.counts[id(module)] += torch.bincount(idx, minlength=module.num_experts).float()

    def update_biases(self, rate: float) -> None:
        for r in self.routers:
            load = self.counts[id(r)]
            r.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
            load.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def evaluate_loss(model, tokens: np.ndarray, seq_len: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = [tokens[j * seq_len:(j + 1) * seq_len + 1] for j in range(i, min(n, i + 8))]
        batch = torch.as_tensor(np.stack(rows), dtype=torch.long)
        logits = model(input_ids=batch[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def _save_state(path: Path, model, optimizer, step: int, history: list, elapsed: float) -> None:
    """Resumable training state, as safetensors + JSON (no pickles)."""
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).reshape(-1).clone() if k == "step" else v.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "state.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    rng = torch.get_rng_state().tolist()
    atomic_write_text(path / "state.json", json.dumps({"step": step, "history": history,
                                                        "elapsed": elapsed, "rng": rng}))


def _load_state(path: Path, model, optimizer) -> tuple[int, list, float]:
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = optimizer.state_dict()
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            sd["state"].setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
    optimizer.load_state_dict(sd)
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return meta["step"], meta["history"], meta["elapsed"]


def train_model(recipe: Recipe, tokenizer_dir: Path, train_text: Path, valid_text: Path,
                out_dir: Path, work_dir: Path, steps: int | None = None, threads: int | None = None) -> dict:
    """Train ``recipe`` from scratch (or resume from ``work_dir``) and save it to ``out_dir``."""
    if steps is not None:
        from dataclasses import replace
        recipe = replace(recipe, steps=steps)
    torch.set_num_threads(threads or recipe.threads)
    tokenizer = load_tokenizer(tokenizer_dir)
    cache = work_dir / "train_tokens.npy"
    if cache.exists():
        train_ids = np.load(cache)
    else:
        train_ids = tokenize_text(tokenizer, train_text.read_text(encoding="utf-8"))
        atomic_write(cache, lambda tmp: np.save(open(tmp, "wb"), train_ids))
    valid_ids = tokenize_text(tokenizer, valid_text.read_text(encoding="utf-8"))
    log.info("train tokens %d, validation tokens %d", len(train_ids), len(valid_ids))

    model = build_model(recipe)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=recipe.betas, fused=False)
    state_dir = work_dir / f"state-{recipe.name}"
    start, history, elapsed = 0, [], 0.0
    if (state_dir / "state.json").exists():
        start, history, elapsed = _load_state(state_dir, model, optimizer)
        log.info("resuming %s at step %d", recipe.name, start)
    gen = np.random.default_rng(recipe.seed)
    starts_all = gen.integers(0, len(train_ids) - recipe.seq_len - 1, size=(recipe.steps, recipe.batch_size))  # fmt: skip
    load = _RouterLoad(model)
    t0 = time.perf_counter() - elapsed
    use_aux = recipe.model_type == "mixtral"
    bar = tqdm(range(start, recipe.steps), desc=f"train {recipe.name}", initial=start, total=recipe.steps)
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, recipe)
            rows = np.stack([train_ids[s:s + recipe.seq_len] for s in starts_all[step]])
            batch = torch.as_tensor(rows, dtype=torch.long)
            # labels are shifted inside the model
            out = model(input_ids=batch, labels=batch, **({"output_router_logits": True} if use_aux else {}))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            load.update_biases(recipe.bias_update_rate)
            record = {"step": step + 1, "loss": float(out.loss.detach()), "time": time.perf_counter() - t0}
            if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
                record["val_loss"] = evaluate_loss(model, valid_ids, recipe.seq_len)
                bar.set_postfix(val=f"{record['val_loss']:.3f}")
                _save_state(state_dir, model, optimizer, step + 1, history + [record], record["time"])
            history.append(record)
    finally:
        load.remove()
    wall = time.perf_counter() - t0
    model.eval()
    model.config.output_router_logits = False
    model.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {"recipe": asdict(recipe), "wall_seconds": wall, "threads": torch.get_num_threads(),
               "train_tokens": int(len(train_ids)), "history": history}
    atomic_write_text(out_dir / "training.json", json.dumps(summary, indent=1))
    return summary
