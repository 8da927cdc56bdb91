"""`daop-vllm build-model NAME`: a Mixtral-format MoE trained from scratch, on a CPU, on
Shakespeare (see daop_vllm.cli.corpus), so that the demo shows real text and real routing and the
quality evaluation has a model whose router and experts mean something.

Training is `transformers`' own MixtralForCausalLM with its load-balancing loss (every expert
must stay in use, or offloading has nothing to decide), so the checkpoint it saves is the one
stock vLLM loads. Results are cached: a folder whose model card names the same recipe is reused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from daop_vllm.cli.corpus import CORPUS_PACKAGE, Corpus, cache_dir, load_corpus
from daop_vllm.cli.model_builder import TinyMixtralShape, build_tokenizer, family_config
from daop_vllm.core.errors import DaopConfigError

SAMPLE_PROMPTS = ("ROMEO.\n", "To be, or not to be", "KING.\nMy lords,", "Enter a Messenger.\n\nMESSENGER.\n")


@dataclass(frozen=True)
class Recipe:
    """What to train: the model's shape and the optimisation, fixed so a build is repeatable."""

    name: str
    shape: TinyMixtralShape
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    aux_loss_coef: float = 0.02
    train_chars: int | None = None  # a prefix of the training text, for quick builds
    eval_windows: int = 96  # held-out windows of seq_len tokens for perplexity and expert shares
    seed: int = 0
    save_dtype: str = "float32"  # "bfloat16" halves the checkpoint (evaluated after that rounding)


RECIPES = {
    recipe.name: recipe
    for recipe in (
        # About 25 minutes on 2 cores: 22M parameters, 3.3M tokens seen (2.1 passes over 1.6M).
        Recipe("shakespeare-moe", TinyMixtralShape(num_layers=6, num_experts=8, top_k=2, hidden_size=256,
                                                   intermediate_size=512, num_heads=4, num_kv_heads=2,
                                                   vocab_size=4096, max_positions=2048),
               seq_len=512, batch_size=8, steps=800, learning_rate=2e-3, warmup_steps=50),
        # Deeper and narrower, for the accuracy of pre-computation across more layers (a stale input
        # moves less per layer): 12 layers, about the active parameters per token of shakespeare-moe.
        Recipe("shakespeare-moe-deep", TinyMixtralShape(num_layers=12, num_experts=8, top_k=2, hidden_size=128,
                                                        intermediate_size=384, num_heads=2, num_kv_heads=1,
                                                        vocab_size=4096, max_positions=2048),
               seq_len=512, batch_size=8, steps=800, learning_rate=2e-3, warmup_steps=50),
        # The demo's model, committed (daop_vllm/demo_model): 9M parameters, 18 MB in bf16, held-out
        # perplexity 57.5 against shakespeare-moe's 77.1 on the same windows (same tokenizer). About 38 minutes.
        Recipe("shakespeare-moe-small", TinyMixtralShape(num_layers=6, num_experts=8, top_k=2, hidden_size=192,
                                                         intermediate_size=256, num_heads=3, num_kv_heads=1,
                                                         vocab_size=4096, max_positions=2048),
               seq_len=512, batch_size=8, steps=1800, learning_rate=3e-3, warmup_steps=50, save_dtype="bfloat16"),
        # Seconds: for tests, which check the builder rather than the text.
        Recipe("shakespeare-moe-tiny", TinyMixtralShape(num_layers=2, num_experts=8, top_k=2, hidden_size=64,
                                                        intermediate_size=128, num_heads=2, num_kv_heads=1,
                                                        vocab_size=512, max_positions=1024),
               seq_len=128, batch_size=8, steps=120, learning_rate=3e-3, warmup_steps=10,
               train_chars=400_000, eval_windows=16),
    )
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DaopConfigError(f"unknown model {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


# Bumped whenever training changes in a way the recipe does not show: cached builds then retrain.
TRAINING_VERSION = 2


def _recipe_record(spec: Recipe) -> dict:
    return {**asdict(spec), "corpus": CORPUS_PACKAGE, "training_version": TRAINING_VERSION}


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents back to back, each ended by </s>, as one long tensor of token ids."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _learning_rate(spec: Recipe, step: int) -> float:
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch Transformer's balancing loss, E * sum_e(tokens share_e * mean probability_e), per
    layer and averaged. (`transformers` pools the counts of all layers before the product, which
    lets an expert die in one layer while another layer over-uses it.)"""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        losses.append(probs.shape[1] * (chosen.mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train(model, spec: Recipe, tokens: torch.Tensor, progress: bool, steps: int | None = None) -> list[float]:
    """AdamW on random windows of the training stream; returns the language-model loss per step.
    `steps` stops early (the schedule stays the recipe's), to check that a recipe reproduces."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(spec.seed)
    offsets = torch.arange(spec.seq_len + 1)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(spec.steps if steps is None else steps), desc=f"training {spec.name}", disable=not progress,
               unit="step", mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(spec, step)
        starts = torch.randint(0, len(tokens) - spec.seq_len - 1, (spec.batch_size, 1), generator=generator)
        window = tokens[starts + offsets]
        output = model(input_ids=window, labels=window, output_router_logits=True)  # labels: shifted inside
        balance = load_balancing_loss(output.router_logits, spec.shape.top_k)
        (output.loss + spec.aux_loss_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_loss = output.loss.item()
        losses.append(lm_loss)
        bar.set_postfix(loss=f"{lm_loss:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, spec: Recipe, tokens: torch.Tensor) -> dict:
    """Held-out perplexity, and the share of top-k assignments each expert gets per layer."""
    windows = tokens[: (len(tokens) // spec.seq_len) * spec.seq_len].view(-1, spec.seq_len)[: spec.eval_windows]
    nll, count = 0.0, 0
    expert_counts = torch.zeros(spec.shape.num_layers, spec.shape.num_experts)
    for window in windows.split(8):
        output = model(input_ids=window, output_router_logits=True)
        logits = output.logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += window[:, 1:].numel()
        for layer, router_logits in enumerate(output.router_logits):
            chosen = router_logits.topk(spec.shape.top_k, dim=-1).indices
            expert_counts[layer] += torch.bincount(chosen.flatten(), minlength=spec.shape.num_experts).float()
    shares = expert_counts / expert_counts.sum(dim=1, keepdim=True)
    return {"held_out_perplexity": math.exp(nll / count), "held_out_tokens": count,
            "expert_shares": [[round(share, 4) for share in layer.tolist()] for layer in shares]}


@torch.no_grad()
def greedy_samples(model, tokenizer, max_new_tokens: int = 48) -> dict[str, str]:
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        samples[prompt] = tokenizer.decode(out[0, ids.shape[1]:])
    return samples


# The demo's model ships with the package, so that `make demo` trains nothing.
SHIPPED_MODEL_DIR = Path(__file__).parents[1] / "demo_model"


def is_build_of(model_dir: Path, spec: Recipe) -> bool:
    card_path = model_dir / "daop_model_card.json"
    return card_path.exists() and json.loads(card_path.read_text()).get("recipe") == _recipe_record(spec)


def _start_training(spec: Recipe, tokenizer_dir: Path, corpus: Corpus | None):
    """The corpus, the recipe's tokenizer (saved to tokenizer_dir), the training token stream and
    the initialised model."""
    corpus = corpus or load_corpus()
    train_texts = list(corpus.train.values())
    if spec.train_chars is not None:
        train_texts = ["".join(train_texts)[: spec.train_chars]]
    tokenizer = build_tokenizer(tokenizer_dir, spec.shape.vocab_size, train_texts)
    torch.manual_seed(spec.seed)
    config, model_class = family_config("mixtral", spec.shape, init_std=0.02)
    config.router_aux_loss_coef = 0.0  # ours is per layer: load_balancing_loss
    model = model_class(config).to(torch.float32)
    return corpus, tokenizer, token_stream(tokenizer, train_texts), model


def reproduce_first_steps(name: str, steps: int, scratch_dir: Path, corpus: Corpus | None = None) -> list[float]:
    """The language-model loss of a recipe's first `steps` steps, trained afresh: compared with a
    committed build's loss curve, it shows the recipe still makes that build."""
    spec = recipe(name)
    _, _, train_tokens, model = _start_training(spec, scratch_dir, corpus)
    return train(model, spec, train_tokens, progress=False, steps=steps)


def build_trained_model(name: str, out_dir: str | Path | None = None, progress: bool = True,
                        corpus: Corpus | None = None) -> Path:
    """Train recipe `name` and write a Mixtral checkpoint, tokenizer and model card to `out_dir`
    (default: the shipped build where it is this recipe's, else the cache, cache_dir()/models/NAME);
    nothing to do when it already holds this recipe's build."""
    spec = recipe(name)
    if out_dir is None and is_build_of(SHIPPED_MODEL_DIR, spec):
        return SHIPPED_MODEL_DIR
    out = Path(out_dir) if out_dir is not None else cache_dir() / "models" / name
    if is_build_of(out, spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus, tokenizer, train_tokens, model = _start_training(spec, out, corpus)
    held_out_tokens = token_stream(tokenizer, list(corpus.held_out.values()))
    losses = train(model, spec, train_tokens, progress)
    model = model.to(getattr(torch, spec.save_dtype)).to(torch.float32)  # evaluate what is saved
    quality = evaluate(model, spec, held_out_tokens)
    samples = greedy_samples(model, tokenizer)
    model.to(getattr(torch, spec.save_dtype)).save_pretrained(str(out), safe_serialization=True)
    card = {
        "builder": "daop_vllm.cli.trained_model", "family": "mixtral", "recipe": _recipe_record(spec),
        "train_tokens": len(train_tokens), "train_passes": round(spec.steps * spec.batch_size * spec.seq_len
                                                                / len(train_tokens), 2),
        "held_out_works": sorted(corpus.held_out), "build_seconds": round(time.perf_counter() - started, 1),
        "loss_first_10": sum(losses[:10]) / len(losses[:10]), "loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "loss_curve": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4) for i in range(0, len(losses), 10)],
        **quality, "samples": samples,
    }
    (out / "daop_model_card.json").write_text(json.dumps(card, indent=2))
    return out


def model_card_summary(model_dir: Path) -> str:
    """What a build says about itself: where it is, how well it predicts held-out text, how it routes."""
    card = json.loads((Path(model_dir) / "daop_model_card.json").read_text())
    lines = [(f"{model_dir}: {card['recipe']['name']}, trained in {card['build_seconds']:.0f} s on "
              f"{card['train_tokens']:,} tokens ({card['train_passes']} passes)"),
             (f"training loss {card['loss_first_10']:.2f} -> {card['loss_last_10']:.2f}; held-out perplexity "
              f"{card['held_out_perplexity']:.1f} on {card['held_out_tokens']:,} tokens of "
              f"{', '.join(card['held_out_works'])}"),
             "share of top-k assignments per expert on held-out text:"]
    lines += [f"  layer {index}: " + " ".join(f"{share:.3f}" for share in shares)
              for index, shares in enumerate(card["expert_shares"])]
    lines += ["greedy samples:"] + [f"  {prompt!r} -> {text!r}" for prompt, text in card["samples"].items()]
    return "\n".join(lines)
