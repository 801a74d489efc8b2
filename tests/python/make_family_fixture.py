"""Builds a tiny fixture of a model family from scratch with transformers +
PEFT: a random model (seeded), the bloom-tiny tokenizer and texts, a random
LoRA adapter on every linear layer, a left-padded probe batch, then the
reference numbers (tiny_reference.py). Each family's fixture covers what its
checkpoints do differently:

- llama:   grouped-query attention, llama3 RoPE scaling, untied head,
           transformers 4.x config dialect (rope_theta, rope_scaling,
           torch_dtype);
- mistral: sliding window shorter than a block, one KV head, untied head;
- qwen2:   q/k/v biases, tied head, bf16 storage in two shards;
- qwen3:   q/k RMSNorm, head_dim 32 (not hidden/heads = 16), tied head.

Usage: python3 tests/python/make_family_fixture.py FAMILY tests/fixtures/FAMILY-tiny
"""

import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import tiny_reference

COMMON = dict(
    vocab_size=2000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)

FAMILIES = {
    "llama": (
        LlamaConfig,
        dict(
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": (
        MistralConfig,
        dict(tie_word_embeddings=False, num_key_value_heads=1, sliding_window=16),
    ),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, dict(tie_word_embeddings=True, head_dim=32)),
}

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def to_4x_dialect(path: str) -> None:
    """Rewrites a saved config.json as transformers 4.x wrote it."""
    with open(path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def main() -> None:
    family, out = sys.argv[1], sys.argv[2]
    here = os.path.dirname(os.path.abspath(__file__))
    bloom = os.path.join(here, "..", "fixtures", "bloom-tiny")
    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**{**COMMON, **extra})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")
    if family == "qwen2":
        model.to(torch.bfloat16).save_pretrained(model_dir, max_shard_size="200KB")
    else:
        model.save_pretrained(model_dir)
    if family == "llama":
        to_4x_dialect(os.path.join(model_dir, "config.json"))
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(bloom, "model", name), model_dir)
    for name in ["train.txt", "valid.txt"]:
        shutil.copy(os.path.join(bloom, name), out)

    # A random adapter (B not zero), so that every LoRA weight has a gradient.
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(base, lora).save_pretrained(os.path.join(out, "lora_init"))

    # Three rows, two left-padded.
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 2000, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    for row, pads in [(1, 9), (2, 17)]:
        ids[row, :pads] = 3
        mask[row, :pads] = 0
    save_file(
        {"probe_input_ids": ids, "probe_attention_mask": mask},
        os.path.join(out, "expected.safetensors"),
    )
    tiny_reference.compute(out, out)


if __name__ == "__main__":
    main()
