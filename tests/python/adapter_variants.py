"""Rebuilds a tiny fixture's adapter-variant references with transformers +
PEFT (f32, CPU, eager attention): the fixture's six-step LoRA recipe
(tiny_reference.py) run from its `lora_init` adapter as

- rslora:   PEFT with `use_rslora=True` (scale alpha/sqrt(r));
- dora:     PEFT with `use_dora=True`, its magnitude vectors set by PEFT's
            own DoRA initialisation on lora_init's A and B (`dora_init/`);
- loraplus: plain LoRA under LLaMA-Factory's LoRA+ optimizer groups (the
            B matrices at LORAPLUS_RATIO times the learning rate, weight
            decay on both groups).

Writes into OUT_DIR: variants.json (each run's per-step loss, gradient norm
before clipping and learning rate, and the validation loss after), and the
adapter directories dora_init/, rslora_final/, dora_final/, loraplus_final/
as PEFT saves them. tests/tools.rs (the_fixture_is_what_transformers_and_peft_compute)
recomputes them and compares with the committed fixture. Usage:

    python3 tests/python/adapter_variants.py tests/fixtures/bloom-tiny OUT_DIR
"""

import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, get_linear_schedule_with_warmup

import tiny_reference as ref

LORAPLUS_RATIO = 4.0


def base_model(fixture):
    model = AutoModelForCausalLM.from_pretrained(
        f"{fixture}/model", dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def with_adapter(fixture, adapter_dir, **changes):
    """The base model with `adapter_dir` loaded trainable, its config changed by `changes`."""
    config = LoraConfig.from_pretrained(adapter_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    return PeftModel.from_pretrained(base_model(fixture), adapter_dir, config=config, is_trainable=True)


def train(peft, train_blocks, groups):
    """The recipe of tiny_reference.train_adapter over explicit optimizer groups."""
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    schedule = get_linear_schedule_with_warmup(optimizer, ref.WARMUP, ref.STEPS)
    params = [p for group in groups for p in group["params"]]
    peft.train()
    log = ref.train_steps(peft, params, optimizer, schedule, train_blocks, ref.STEPS)
    peft.eval()
    return log


def uniform_groups(peft):
    params = [p for p in peft.parameters() if p.requires_grad]
    return [{"params": params, "lr": ref.LR, "weight_decay": ref.WEIGHT_DECAY}]


def loraplus_groups(peft):
    """LLaMA-Factory's `_create_loraplus_optimizer` for LoRA weights that all
    decay: B matrices (and 1-D adapter weights) at lr x ratio, the rest at lr."""
    named = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    fast = [p for n, p in named if "lora_B" in n or p.ndim == 1]
    slow = [p for n, p in named if not ("lora_B" in n or p.ndim == 1)]
    return [
        {"params": slow, "lr": ref.LR, "weight_decay": ref.WEIGHT_DECAY},
        {"params": fast, "lr": ref.LR * LORAPLUS_RATIO, "weight_decay": ref.WEIGHT_DECAY},
    ]


def save(peft, directory):
    """The adapter as PEFT saves it, without its generated model card."""
    peft.save_pretrained(directory)
    os.remove(f"{directory}/README.md")


def make_dora_init(fixture, out):
    """lora_init's A and B under DoRA, magnitudes from PEFT's initialisation
    (the row norms of W + scale * B A)."""
    peft = with_adapter(fixture, f"{fixture}/lora_init", use_dora=True)
    for module in peft.modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            module.lora_magnitude_vector["default"].update_layer(
                base_layer=module.get_base_layer(),
                lora_A=module.lora_A["default"].weight,
                lora_B=module.lora_B["default"].weight,
                scaling=module.scaling["default"],
            )
    save(peft, f"{out}/dora_init")


def main() -> None:
    fixture, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(f"{fixture}/model")
    train_blocks = ref.pack(tokenizer, f"{fixture}/train.txt")
    valid = ref.pack(tokenizer, f"{fixture}/valid.txt")
    make_dora_init(fixture, out)
    runs = {
        "rslora": (f"{fixture}/lora_init", {"use_rslora": True}, uniform_groups),
        "dora": (f"{out}/dora_init", {}, uniform_groups),
        "loraplus": (f"{fixture}/lora_init", {}, loraplus_groups),
    }
    result = {"loraplus_lr_ratio": LORAPLUS_RATIO}
    for name, (start, changes, groups) in runs.items():
        peft = with_adapter(fixture, start, **changes)
        log = train(peft, train_blocks, groups(peft))
        result[name] = {"log": log, "valid_loss_after": ref.mean_loss(peft, valid)}
        save(peft, f"{out}/{name}_final")
    with open(f"{out}/variants.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
