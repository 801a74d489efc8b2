"""Rebuilds the reference numbers of a tiny fixture (tests/fixtures/*-tiny:
BLOOM, Llama, Mistral, Qwen2, Qwen3) with HF transformers + PEFT (f32, CPU,
eager attention), from the fixture's inputs: the model and
tokenizer (model/), the starting adapter (lora_init/), train.txt, valid.txt,
and the probe batch (probe_input_ids, probe_attention_mask in
expected.safetensors). Writes into OUT_DIR:

- expected.safetensors: probe_input_ids, probe_attention_mask, probe_logits,
  valid_blocks (valid.txt packed), valid_loss;
- trajectory.json: 6 steps of LoRA training from lora_init (the recipe in
  `args` and `semantics`), with losses, gradient norms and learning rates,
  and under `full` 4 steps of full fine-tuning from the base model;
- lora_final/: the adapter after those steps, as PEFT saves it.

tests/tools.rs (the_fixture_is_what_transformers_and_peft_compute) runs it and
compares with the committed fixture, so the
claim "numerics match HF" is reproducible. Usage:

    python3 tests/python/tiny_reference.py tests/fixtures/bloom-tiny OUT_DIR
"""

import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    get_linear_schedule_with_warmup,
)

BLOCK = 32
BATCH = 2
ACCUM = 2
STEPS = 6
WARMUP = 2
LR = 1e-2
WEIGHT_DECAY = 0.01
CLIP = 1.0
FULL_STEPS = 4
FULL_LR = 1e-3


def pack(tokenizer, path):
    """The fixture's packing rule: each non-empty line (with its trailing
    newline) a document, EOS appended, all concatenated, cut into blocks,
    the remainder dropped."""
    eos = tokenizer.eos_token_id
    ids = []
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    for line in text.splitlines(keepends=True):
        if not line.strip("\r\n"):
            continue
        if not line.endswith("\n"):
            line += "\n"
        doc = tokenizer(line, add_special_tokens=False)["input_ids"]
        if not doc or doc[-1] != eos:
            doc.append(eos)
        ids.extend(doc)
    n = len(ids) // BLOCK
    return torch.tensor(ids[: n * BLOCK], dtype=torch.long).view(n, BLOCK)


def train_steps(model, params, optimizer, schedule, train, steps):
    """`steps` optimizer steps on consecutive micro-batches of `train`; the
    log of each step (loss: the mean of its micro-batches' losses; grad_norm
    before clipping)."""
    log = []
    for step in range(steps):
        losses = []
        for micro in range(step * ACCUM, (step + 1) * ACCUM):
            x = train[micro * BATCH : (micro + 1) * BATCH]
            loss = model(input_ids=x, labels=x).loss
            (loss / ACCUM).backward()
            losses.append(loss.item())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, CLIP).item()
        learning_rate = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        log.append(
            {
                "step": step + 1,
                "loss": sum(losses) / len(losses),
                "grad_norm": grad_norm,
                "learning_rate": learning_rate,
            }
        )
    return log


def train_adapter(peft, train):
    """The fixture's recipe for the adapter's trainable weights: torch AdamW
    (uniform weight decay), linear warmup and decay, STEPS steps; the log."""
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY
    )
    schedule = get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)
    peft.train()
    log = train_steps(peft, params, optimizer, schedule, train, STEPS)
    peft.eval()
    return log


def full_fine_tuning(fixture, train, valid):
    """FULL_STEPS of full fine-tuning from the base model as HF's Trainer
    groups it: weight decay on every weight but biases and norms
    (`Trainer.get_decay_parameter_names`)."""
    model = AutoModelForCausalLM.from_pretrained(
        f"{fixture}/model", dtype=torch.float32, attn_implementation="eager"
    )
    model.train()
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=FULL_LR, betas=(0.9, 0.999), eps=1e-8)
    schedule = get_linear_schedule_with_warmup(optimizer, WARMUP, FULL_STEPS)
    params = [p for _, p in named]
    log = train_steps(model, params, optimizer, schedule, train, FULL_STEPS)
    model.eval()
    return {
        "steps": FULL_STEPS,
        "lr": FULL_LR,
        "no_decay": sorted(n for n, _ in named if n not in decay),
        "log": log,
        "valid_loss_after": mean_loss(model, valid),
    }


def mean_loss(model, blocks):
    with torch.no_grad():
        return model(input_ids=blocks, labels=blocks).loss.item()


def main() -> None:
    compute(sys.argv[1], sys.argv[2])


def compute(fixture: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    # tokenizer.json as it is, as pt-host reads it (AutoTokenizer would
    # rebuild a qwen2 model's tokenizer with Qwen's own pre-tokenizer).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(f"{fixture}/model")
    model = AutoModelForCausalLM.from_pretrained(
        f"{fixture}/model", dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()

    probe = load_file(f"{fixture}/expected.safetensors")
    ids, mask = probe["probe_input_ids"], probe["probe_attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids.long(), attention_mask=mask.long()).logits
    valid = pack(tokenizer, f"{fixture}/valid.txt")
    save_file(
        {
            "probe_input_ids": ids,
            "probe_attention_mask": mask,
            "probe_logits": logits.contiguous(),
            "valid_blocks": valid.to(torch.int64),
            "valid_loss": torch.tensor([mean_loss(model, valid)], dtype=torch.float32),
        },
        f"{out}/expected.safetensors",
    )

    # "Before" is the base model's loss, as expected.safetensors' valid_loss.
    valid_before = mean_loss(model, valid)
    peft = PeftModel.from_pretrained(model, f"{fixture}/lora_init", is_trainable=True)
    train = pack(tokenizer, f"{fixture}/train.txt")
    log = train_adapter(peft, train)
    trajectory = {
        "args": {
            "block": BLOCK,
            "batch": BATCH,
            "accum": ACCUM,
            "steps": STEPS,
            "warmup": WARMUP,
            "lr": LR,
            "wd": WEIGHT_DECAY,
            "clip": CLIP,
        },
        "semantics": "torch AdamW over the LoRA weights, get_linear_schedule_with_warmup, "
        "clip_grad_norm_ (the logged grad_norm is before clipping), loss per step = mean of "
        "micro-batch losses, micro-batches are consecutive blocks in file order",
        "n_train_blocks": len(train),
        "valid_loss_before": valid_before,
        "valid_loss_after": mean_loss(peft, valid),
        "log": log,
        "full": full_fine_tuning(fixture, train, valid),
    }
    with open(f"{out}/trajectory.json", "w") as f:
        json.dump(trajectory, f, indent=1)
    peft.save_pretrained(f"{out}/lora_final")


if __name__ == "__main__":
    main()
