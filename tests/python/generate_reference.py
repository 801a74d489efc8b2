"""Writes tests/fixtures/bloom-tiny/generate.json: what HF transformers'
`generate` produces on the fixture for a left-padded batch of prompts —
greedy, and greedy with a repetition penalty. pt-host's generation is tested
against it (crates/pt-model/tests/model.rs). Run from the repository root:

    python3 tests/python/generate_reference.py
"""

import json

import torch
import transformers
from transformers import AutoTokenizer, BloomForCausalLM

FIXTURE = "tests/fixtures/bloom-tiny"
PROMPTS = ["发热是", "The history of", "传染病的流行过程"]


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(f"{FIXTURE}/model", padding_side="left")
    model = BloomForCausalLM.from_pretrained(f"{FIXTURE}/model", dtype=torch.float32)
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
    with open(f"{FIXTURE}/generate.json", "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
