"""PEFT's training of a grown vocabulary, for pt-host to follow: a fixture's
model resized to an extended tokenizer (new rows: the mean of the old ones,
pt-host's initialisation), the fixture's starting adapter (lora_init) with
`modules_to_save` (and `ensure_weight_tying` on a tied model), then the
fixture's recipe (tiny_reference.py) for its six steps on train.txt packed
with the extended tokenizer. Writes into OUT_DIR:

- init/: that starting adapter as PEFT saves it (pt-host starts from it with
  --peft_path);
- trajectory.json: the steps' loss, grad_norm and learning_rate, and the
  validation loss after them.

Usage: vocab_trajectory.py FIXTURE TOKENIZER_DIR MODULES OUT_DIR
(MODULES comma-separated, e.g. embed_tokens,lm_head)
"""

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_reference import mean_loss, pack, train_adapter  # noqa: E402


def grow_with_mean(matrix: torch.nn.Parameter, old_rows: int) -> None:
    with torch.no_grad():
        matrix[old_rows:] = matrix[:old_rows].mean(dim=0, keepdim=True)


def main() -> None:
    fixture, tokenizer_dir, modules, out = sys.argv[1:5]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(
        f"{fixture}/model", dtype=torch.float32, attn_implementation="eager"
    )
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer))
    grow_with_mean(model.get_input_embeddings().weight, old_rows)
    tied = model.config.tie_word_embeddings
    if not tied:
        grow_with_mean(model.get_output_embeddings().weight, old_rows)
    with open(f"{fixture}/lora_init/adapter_config.json") as f:
        init = json.load(f)
    config = LoraConfig(
        r=init["r"],
        lora_alpha=init["lora_alpha"],
        lora_dropout=0.0,
        target_modules=init["target_modules"],
        modules_to_save=modules.split(","),
        ensure_weight_tying=tied,
        task_type="CAUSAL_LM",
    )
    peft = get_peft_model(model, config)
    lora = load_file(f"{fixture}/lora_init/adapter_model.safetensors")
    loaded = 0
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            key = name.replace(".default.", ".")
            if ".lora_" in name:
                parameter.copy_(lora[key])
                loaded += 1
    assert loaded == len(lora), (loaded, len(lora))
    peft.save_pretrained(f"{out}/init")

    train = pack(tokenizer, f"{fixture}/train.txt")
    valid = pack(tokenizer, f"{fixture}/valid.txt")
    log = train_adapter(peft, train)
    trajectory = {
        "trainable": sum(p.numel() for p in peft.parameters() if p.requires_grad),
        "log": log,
        "valid_loss_after": mean_loss(peft, valid),
    }
    with open(f"{out}/trajectory.json", "w") as f:
        json.dump(trajectory, f, indent=1)


if __name__ == "__main__":
    main()
