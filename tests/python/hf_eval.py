"""Loads a model directory with HF transformers (and a pt-host LoRA adapter
with PEFT, when given) and prints the mean next-token loss over the fixture's
packed validation blocks, as JSON.

Usage: hf_eval.py MODEL_DIR EXPECTED_SAFETENSORS [ADAPTER_DIR]
"""

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, expected = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    if len(sys.argv) > 3:
        model = PeftModel.from_pretrained(model, sys.argv[3])
    model.eval()
    blocks = load_file(expected)["valid_blocks"]
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in blocks.split(16):
            logits = model(input_ids=chunk).logits
            targets = chunk[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += targets.numel()
    print(json.dumps({"eval_loss": total / count}))


if __name__ == "__main__":
    main()
