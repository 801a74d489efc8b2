"""Greedy continuation of one prompt by HF transformers, printed as JSON
token ids; with --load_in_4bit on a bitsandbytes NF4 base (double
quantisation, f32 compute), as `pt-host generate --qlora
--bnb_4bit_compute_dtype float32` loads it.

Usage: hf_generate.py MODEL_DIR PROMPT MAX_NEW_TOKENS REPETITION_PENALTY [--load_in_4bit]
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nf4_loading import nf4_loading


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("prompt")
    parser.add_argument("max_new_tokens", type=int)
    parser.add_argument("repetition_penalty", type=float)
    parser.add_argument("--load_in_4bit", action="store_true")
    args = parser.parse_args()
    options = {}
    if args.load_in_4bit:
        options = nf4_loading(torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="eager", **options
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            do_sample=False,
            repetition_penalty=args.repetition_penalty,
        )
    print(json.dumps({"new_tokens": output[0, ids.shape[1] :].tolist()}))


if __name__ == "__main__":
    main()
