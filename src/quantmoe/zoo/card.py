"""Model cards of the embedded models: recipe, training curve, quality, routing, realism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from quantmoe.atomic import atomic_write, atomic_write_text
from quantmoe.calib.routing import RoutingStats
from quantmoe.zoo.corpus import LICENCES
from quantmoe.zoo.realism import RealismRow, realism_markdown


def plot_loss_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    k = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="0.8", lw=0.5, label="train (per step)")
    ax.plot(steps[k - 1:], smooth, color="C0", label=f"train ({k}-step mean)")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", color="C3", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(min(loss.min(), min((v for _, v in val), default=loss.min())) - 0.2, min(loss.max(), 9.5))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def routing_markdown(stats: RoutingStats) -> str:
    lines = ["| block | experts | top-k | min share / uniform | max share / uniform | normalized entropy | unused |",
             "|---|---|---|---|---|---|---|"]
    for block in sorted(stats.counts):
        b = stats.balance(block)
        lines.append(f"| {block} | {len(stats.counts[block])} | {stats.top_k[block]} | "
                     f"{b['min_share_x_uniform']:.2f} | {b['max_share_x_uniform']:.2f} | "
                     f"{b['entropy_norm']:.3f} | {b['unused_experts']} |")
    return "\n".join(lines)


def write_card(model_dir: Path, name: str, description: str, anatomy_text: str, test_ppl: float,
               routing: RoutingStats) -> Path:
    training = json.loads((model_dir / "training.json").read_text())
    recipe, history = training["recipe"], training["history"]
    plot_loss_curve(history, model_dir / "loss_curve.png", f"{name} training")
    val = [h for h in history if "val_loss" in h]
    realism = json.loads((model_dir / "realism.json").read_text())
    rows = [RealismRow(**r) for r in realism["rows"]]
    settings = {k: v for k, v in recipe.items() if k not in ("config", "name", "description", "extra")}
    text = f"""# {name}

{description}. Embedded in quantmoe as a test and demo model: a real `transformers`
`{recipe['model_type']}` model trained from scratch on this machine's CPU by
`quantmoe zoo train {name}` and saved with `save_pretrained` (safetensors, bfloat16).

## Architecture

```json
{json.dumps(recipe['config'], indent=1)}
```

```
{anatomy_text}
```

## Training

| setting | value |
|---|---|
""" + "\n".join(f"| {k} | {v} |" for k, v in settings.items()) + f"""
| train tokens (epochs) | {training['train_tokens']:,} ({recipe['steps'] * recipe['batch_size'] * recipe['seq_len'] / training['train_tokens']:.2f}) |
| wall time | {training['wall_seconds'] / 60:.1f} min on {training['threads']} CPU thread(s) |

Weight decay applies to matrices only (never to norms, biases or the router).
{"DeepSeek-V3 routing is balanced without an auxiliary loss: after each step every router's expert bias moves by `bias_update_rate` towards under-used experts." if recipe['model_type'] == 'deepseek_v3' else "Routing is balanced with the Switch-style auxiliary loss (router_aux_loss_coef)."}

![loss curve](loss_curve.png)

Final validation loss {val[-1]['val_loss']:.3f} (perplexity {math.exp(val[-1]['val_loss']):.2f},
first 64 windows of 256 tokens, float32 weights). Test perplexity of the saved bfloat16
weights, computed in float32 over the whole test split: **{test_ppl:.2f}**.

## Routing balance (test split, {routing.tokens:,} tokens)

{routing_markdown(routing)}

## Reaction to quantization (realism table)

Round-to-nearest on the test split; KL is the mean per-token KL(full precision || quantized).
Rerun with `quantmoe zoo realism {name}`.

{realism_markdown(realism['base_ppl'], rows)}

## Data

Tokenizer: byte-level BPE, 8192 tokens, trained on the training split (`embedded/tokenizer`).
Text: {', '.join(LICENCES)}; see `embedded/data/SOURCES.md`:

""" + "\n".join(f"- {k}: {v}" for k, v in LICENCES.items()) + "\n"
    path = model_dir / "README.md"
    atomic_write_text(path, text)
    return path
