"""The data preparation MedicalGPT's pretraining.py does with HF datasets,
for `scripts/bench-prepare.sh` to time beside `pt-host prepare`: load the
JSON-lines corpus (`load_dataset("json")`, Arrow files memory-mapped in a
fresh cache), tokenize with the same tokenizer.json (`map(batched=True,
num_proc=WORKERS)`), and cut the concatenated ids into blocks
(`group_texts`). Prints JSON: documents, blocks.

Usage: prepare_reference.py CORPUS_DIR TOKENIZER_DIR CACHE_DIR WORKERS BLOCK_SIZE
"""

import glob
import json
import os
import sys
from itertools import chain

from datasets import load_dataset
from transformers import PreTrainedTokenizerFast


def main() -> None:
    corpus, tokenizer_dir, cache, workers, block = sys.argv[1:6]
    workers, block = int(workers), int(block)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    files = sorted(glob.glob(os.path.join(corpus, "**", "*.jsonl"), recursive=True))
    raw = load_dataset("json", data_files=files, split="train", cache_dir=cache)

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [tokenizer.eos_token_id] for doc in ids]}

    tokenized = raw.map(
        tokenize, batched=True, num_proc=workers, remove_columns=raw.column_names
    )

    def group_texts(batch):
        ids = list(chain(*batch["input_ids"]))
        total = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, total, block)]}

    blocks = tokenized.map(group_texts, batched=True, num_proc=workers)
    print(json.dumps({"documents": len(raw), "blocks": len(blocks)}))


if __name__ == "__main__":
    main()
