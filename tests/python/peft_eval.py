"""Loads a pt-host LoRA adapter with Python PEFT and prints the mean
next-token loss over the fixture's packed validation blocks, as JSON.

Usage: peft_eval.py MODEL_DIR ADAPTER_DIR EXPECTED_SAFETENSORS
"""

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BloomForCausalLM


def main() -> None:
    model_dir, adapter_dir, expected = sys.argv[1:4]
    base = BloomForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
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
