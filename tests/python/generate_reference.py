"""Writes FIXTURE/generate.json: what HF transformers' `generate` produces
on a tiny fixture for a left-padded batch of prompts — greedy, and greedy
with a repetition penalty. pt-host's generation is tested against it
(crates/pt-model/tests/model.rs). Run from the repository root:

    python3 tests/python/generate_reference.py tests/fixtures/bloom-tiny
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

PROMPTS = ["发热是", "The history of", "传染病的流行过程"]


def main() -> None:
    fixture = sys.argv[1]
    # tokenizer.json as it is, as pt-host reads it.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(f"{fixture}/model", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(
        f"{fixture}/model", dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    cases = []
    for penalty in [1.0, 1.3]:
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=12,
                do_sample=False,
                repetition_penalty=penalty,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        width = batch["input_ids"].shape[1]
        cases.append({"repetition_penalty": penalty, "new_tokens": out[:, width:].tolist()})
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    result = {
        "transformers": transformers.__version__,
        "max_new_tokens": 12,
        "prompts": PROMPTS,
        "prompt_ids": prompts,
        "cases": cases,
    }
    with open(f"{fixture}/generate.json", "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
