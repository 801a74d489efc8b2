"""Checks a model trained with an extended vocabulary as transformers (and
PEFT) users load it: tokenizes the validation text with the extended
tokenizer (AutoTokenizer), compares the ids with pt-host's prepared
validation blocks, and prints the mean next-token loss over those blocks as
JSON. With an adapter, the base model is first resized to the tokenizer
(`resize_token_embeddings(len(tokenizer))`, as MedicalGPT does before
`PeftModel.from_pretrained`).

Usage: hf_vocab_eval.py MODEL_DIR TOKENIZER_DIR VALIDATION_BLOCKS VALID_TXT [ADAPTER_DIR]
"""

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, tokenizer_dir, blocks_path, valid_txt = sys.argv[1:5]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    if len(sys.argv) > 5:
        model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, sys.argv[5])
    model.eval()
    blocks = load_file(blocks_path)
    ids, lengths = blocks["input_ids"].long(), blocks["lengths"].long()
    # pt-host's documents: each non-empty line with its line break, then EOS.
    stream = []
    with open(valid_txt, encoding="utf-8") as lines:
        for line in lines:
            if line.rstrip("\r\n"):
                stream += tokenizer(line, add_special_tokens=False)["input_ids"]
                stream.append(tokenizer.eos_token_id)
    ours = [t for row, n in zip(ids.tolist(), lengths.tolist()) for t in row[:n]]
    total, count = 0.0, 0
    with torch.no_grad():
        for row, n in zip(ids, lengths):
            block = row[:n].unsqueeze(0)
            logits = model(input_ids=block).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(
                logits, block[0, 1:], reduction="sum"
            ).item()
            count += n.item() - 1
    print(
        json.dumps(
            {
                "eval_loss": total / count,
                "same_ids": ours == stream[: len(ours)],
                "vocab_size": model.get_input_embeddings().weight.shape[0],
            }
        )
    )


if __name__ == "__main__":
    main()
