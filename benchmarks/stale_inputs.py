"""Why pre-computation on the previous layer's input costs accuracy on a given model: per pair of
consecutive MoE layers, the cosine between their inputs, how often the next layer's top-k is
predicted right from the earlier input, and how far the next layer's experts land when fed the
earlier input (relative norm of the error of the weighted top-k output), with and without
rescaling the input by the ratio of the two layers' RMSNorm gains.

    python benchmarks/stale_inputs.py [--model DIR] [--out FILE.json]

Runs the `transformers` model on held-out passages (no vLLM); a Mixtral-format checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def measure(model_dir: Path, passages: int, length: int) -> dict:
    from transformers import AutoModelForCausalLM

    from daop_vllm.bench.quality import held_out_passages

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    layers = model.model.layers
    inputs: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=index: inputs.__setitem__(i, args[0].flatten(0, 1)))
    with torch.no_grad():
        model(torch.tensor(held_out_passages(model_dir, passages, length)))
        pairs = []
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
    return {"model": str(model_dir), "tokens": passages * length, "pairs": pairs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the cached shakespeare-moe build")
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from daop_vllm.cli.trained_model import build_trained_model

    result = measure(args.model or build_trained_model("shakespeare-moe"), args.passages, args.length)
    result["command"] = "python benchmarks/stale_inputs.py " + " ".join(sys.argv[1:])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    for pair in result["pairs"]:
        raw, scaled = pair["previous_input"], pair["gain_rescaled"]
        print(f"layers {pair['layers']}: cosine {raw['cosine']:.3f}, prediction {100 * raw['prediction_accuracy']:.1f}% "
              f"(gain-rescaled {100 * scaled['prediction_accuracy']:.1f}%), expert output error "
              f"{100 * raw['expert_output_error']:.0f}% (gain-rescaled {100 * scaled['expert_output_error']:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
