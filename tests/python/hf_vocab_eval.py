"""Checks a model trained with an extended vocabulary as transformers (and
PEFT) users load it: tokenizes the validation text with the extended
tokenizer (AutoTokenizer), compares the ids with pt-host's prepared
validation blocks, and prints the mean next-token loss over those blocks as
JSON. With an adapter, the base model is first resized to the tokenizer
(`resize_token_embeddings(len(tokenizer))`, as MedicalGPT does before
`PeftModel.from_pretrained`).

The blocks are read from the prepared cache entry's token store as any
reader would (store.json, validation.tokens, validation.lengths).

Usage: hf_vocab_eval.py MODEL_DIR TOKENIZER_DIR CACHE_ENTRY VALID_TXT [ADAPTER_DIR]
"""

import json
import pathlib
import sys

import numpy
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def validation_blocks(entry: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The token store's validation rows and their real lengths."""
    header = json.loads((entry / "store.json").read_text())
    assert header["format"] == "pt-host token store", header
    width = {2: "<u2", 4: "<u4"}[header["width"]]
    ids = numpy.fromfile(entry / "validation.tokens", dtype=width).astype("int64")
    lengths = numpy.fromfile(entry / "validation.lengths", dtype="<u4").astype("int64")
    rows = ids.reshape(header["validation_blocks"], header["block_size"])
    return torch.from_numpy(rows), torch.from_numpy(lengths)


def main() -> None:
    model_dir, tokenizer_dir, entry, valid_txt = sys.argv[1:5]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    if len(sys.argv) > 5:
        model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, sys.argv[5])
    model.eval()
    ids, lengths = validation_blocks(pathlib.Path(entry))
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
