"""Why pre-computation on the previous layer's input costs accuracy on a given model: per pair of
consecutive MoE layers, the cosine between their inputs, how often the next layer's top-k is
predicted right from the earlier input, and how far the next layer's experts land when fed the
earlier input (relative norm of the error of the weighted top-k output), with and without
rescaling the input by the ratio of the two layers' RMSNorm gains. Then which per-row distance
between the two inputs separates good pre-computed results from bad ones (the gate of
`staleness_tolerance`): the relative distance ||h_{i+1} - h_i|| / ||h_{i+1}|| or 1 - cosine,
scored over every (row, chosen expert) pair of the layers from `--first-layer` on by Spearman's
rank correlation with the result's relative error, and by the area under the ROC curve of
telling results within an error bound from the others.

    python benchmarks/stale_inputs.py [--model DIR] [--out FILE.json]

Runs the `transformers` model on held-out passages (no vLLM); a Mixtral-format checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def measure(model_dir: Path, passages: int, length: int, first_layer: int) -> dict:
    from transformers import AutoModelForCausalLM

    from daop_vllm.bench.quality import held_out_passages

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    layers = model.model.layers
    inputs: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=index: inputs.__setitem__(i, args[0].flatten(0, 1)))
    with torch.no_grad():
        model(torch.tensor(held_out_passages(model_dir, passages, length)))
        pairs, distances, errors = [], {"relative_distance": [], "cosine_distance": []}, []
        for index in range(len(layers) - 1):
            earlier, actual = inputs[index], inputs[index + 1]
            gain_ratio = layers[index + 1].post_attention_layernorm.weight / layers[index].post_attention_layernorm.weight
            block = layers[index + 1].mlp
            k = block.top_k
            chosen = torch.nn.functional.linear(actual, block.gate.weight).topk(k, dim=-1).indices
            weights = torch.full(chosen.shape, 1.0 / k)
            reference = block.experts(actual, chosen, weights)

            def figures(x: torch.Tensor, block=block, chosen=chosen, weights=weights, reference=reference,
                        actual=actual, k=k) -> dict:
                predicted = torch.nn.functional.linear(x, block.gate.weight).topk(k, dim=-1).indices
                hits = (predicted.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1).float().mean().item()
                error = (block.experts(x, chosen, weights) - reference).norm() / reference.norm()
                return {"cosine": torch.nn.functional.cosine_similarity(x, actual).mean().item(),
                        "prediction_accuracy": hits, "expert_output_error": error.item()}

            pairs.append({"layers": [index, index + 1], "previous_input": figures(earlier),
                          "gain_rescaled": figures(earlier * gain_ratio)})
            if index + 1 >= first_layer:
                for name, distance in row_distances(earlier, actual).items():
                    distances[name].append(distance.repeat_interleave(k))
                errors.append(pair_errors(block, earlier, actual, chosen))
    errors = torch.cat(errors)
    separation = {name: separation_scores(torch.cat(d), errors) for name, d in distances.items()}
    return {"model": str(model_dir), "tokens": passages * length, "pairs": pairs,
            "separation": {"first_layer": first_layer, "pairs": errors.numel(), **separation}}


def row_distances(earlier: torch.Tensor, actual: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row, the two distances the engine can gate on (prediction.input_distance)."""
    from daop_vllm.core.prediction import input_distance

    return {name: input_distance(earlier, actual, name) for name in ("relative_distance", "cosine_distance")}


def pair_errors(block, earlier: torch.Tensor, actual: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Relative error of each (row, chosen expert) result computed on the earlier input, row-major."""
    ones = torch.ones(chosen.shape[0], 1)
    out = []
    for j in range(chosen.shape[1]):
        true = block.experts(actual, chosen[:, j:j + 1], ones)
        stale = block.experts(earlier, chosen[:, j:j + 1], ones)
        out.append((stale - true).norm(dim=-1) / true.norm(dim=-1))
    return torch.stack(out, dim=1).flatten()


def separation_scores(distance: torch.Tensor, error: torch.Tensor) -> dict:
    """Spearman's rank correlation of distance and error, and for error bounds the ROC AUC of a
    distance threshold telling results within the bound from the others (1: perfect, 0.5: none)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort().argsort().double()

    rd, re = ranks(distance), ranks(error)
    spearman = torch.corrcoef(torch.stack([rd, re]))[0, 1].item()
    auc = {}
    for bound in (0.1, 0.25, 0.5):
        good = error <= bound
        n_good, n_bad = int(good.sum()), int((~good).sum())
        if n_good and n_bad:  # Mann-Whitney: how often a good result's distance ranks below a bad one's
            auc[str(bound)] = ((rd[~good].sum() - n_bad * (n_bad - 1) / 2) / (n_good * n_bad)).item()
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=distance.dtype)
    return {"spearman_with_error": spearman, "roc_auc_by_error_bound": auc,
            "quantiles": dict(zip(["p10", "p25", "p50", "p75", "p90"], distance.quantile(quantiles).tolist()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the cached shakespeare-moe build")
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--first-layer", type=int, default=1,
                        help="the first consuming layer whose pairs the separation scores (default 1, as "
                             "`eval quality`'s --first-predicted-layer)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from daop_vllm.cli.trained_model import build_trained_model

    result = measure(args.model or build_trained_model("shakespeare-moe"), args.passages, args.length,
                     args.first_layer)
    result["command"] = "python benchmarks/stale_inputs.py " + " ".join(sys.argv[1:])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    for pair in result["pairs"]:
        raw, scaled = pair["previous_input"], pair["gain_rescaled"]
        print(f"layers {pair['layers']}: cosine {raw['cosine']:.3f}, prediction {100 * raw['prediction_accuracy']:.1f}% "
              f"(gain-rescaled {100 * scaled['prediction_accuracy']:.1f}%), expert output error "
              f"{100 * raw['expert_output_error']:.0f}% (gain-rescaled {100 * scaled['expert_output_error']:.0f}%)")
    for name, scores in result["separation"].items():
        if isinstance(scores, dict):
            auc = ", ".join(f"error <= {b}: {a:.3f}" for b, a in scores["roc_auc_by_error_bound"].items())
            print(f"{name}: Spearman with the result's error {scores['spearman_with_error']:.3f}; ROC AUC {auc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
