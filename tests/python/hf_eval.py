"""Loads a model directory with HF transformers (and a pt-host LoRA adapter
with PEFT, when given) and prints the mean next-token loss over the fixture's
packed validation blocks, as JSON. With --load_in_4bit the base is loaded
as QLoRA loads it: bitsandbytes NF4 with double quantisation, bf16 compute.
With --bf16_linear_weights every linear weight but the LM head is rounded to
bf16 and computed in f32 (pt-host's `--frozen_weights bf16`).

Usage: hf_eval.py MODEL_DIR EXPECTED_SAFETENSORS [ADAPTER_DIR]
                  [--load_in_4bit | --bf16_linear_weights]
"""

import argparse
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nf4_loading import nf4_loading


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("expected")
    parser.add_argument("adapter", nargs="?")
    parser.add_argument("--load_in_4bit", action="store_true")
    parser.add_argument("--bf16_linear_weights", action="store_true")
    args = parser.parse_args()
    options = {}
    if args.load_in_4bit:
        options = nf4_loading(torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="eager", **options
    )
    if args.bf16_linear_weights:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    module.weight.copy_(module.weight.bfloat16().float())
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    blocks = load_file(args.expected)["valid_blocks"]
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
