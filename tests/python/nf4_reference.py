"""Writes a tiny fixture's QLoRA references with bitsandbytes' CPU path,
transformers and PEFT:

- nf4.safetensors: what bitsandbytes makes of the model's linear weights
  when transformers loads it in 4 bits (NF4, blocks of 64, double
  quantisation: `<weight>.codes`, `.nested_codes`, `.nested_absmax`,
  `.offset`), the same weights quantised without double quantisation
  (`<weight>.absmax`), an `edge` tensor (a zero block, a partial block,
  code midpoints, tiny and huge values) quantised both ways, and the
  dynamic map of the nested quantisation (`dynamic_map`);
- qlora.json: the fixture's six-step LoRA recipe (tiny_reference.py) from
  `lora_init` on that 4-bit base with bf16 compute: per-step loss, gradient
  norm and learning rate, and the validation loss before and after;
- qlora_final/: the adapter after those steps.

Usage: python3 tests/python/nf4_reference.py tests/fixtures/bloom-tiny OUT_DIR
"""

import json
import os
import sys

import bitsandbytes
import bitsandbytes.functional as F
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerFast

import tiny_reference as ref


def load_4bit(fixture):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        f"{fixture}/model",
        quantization_config=quantization,
        dtype=torch.float32,
        device_map="cpu",
        attn_implementation="eager",
    )


def edge_values():
    """A zero block, code midpoints, tiny and huge magnitudes, and a partial last block."""
    torch.manual_seed(1)
    code = F.get_4bit_type("nf4", device="cpu")
    midpoints = (code[:-1] + code[1:]) / 2
    blocks = [
        torch.zeros(64),
        torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.randn(64 - 31) * 0.3]),
        torch.randn(64) * 1e-30,
        torch.randn(64) * 1e30,
        torch.randn(64 * 300),
        torch.randn(37),
    ]
    return torch.cat(blocks)


def quantized(name, weight, tensors):
    """`weight` quantised by bitsandbytes, plain and double-quantised."""
    codes, plain = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    nested_codes, nested = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(codes, nested_codes)
    tensors[f"{name}.codes"] = codes.flatten()
    tensors[f"{name}.absmax"] = plain.absmax
    tensors[f"{name}.nested_codes"] = nested.absmax
    tensors[f"{name}.nested_absmax"] = nested.state2.absmax
    tensors[f"{name}.offset"] = nested.offset.reshape(1)


def main() -> None:
    fixture, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_pretrained(f"{fixture}/model", dtype=torch.float32)
    originals = dict(original.named_parameters())
    model = load_4bit(fixture)
    tensors = {"dynamic_map": F.create_dynamic_map(signed=True)}
    for name, module in model.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            weight = f"{name}.weight"
            quantized(weight, originals[weight].detach(), tensors)
            # What transformers' loading made is what quantize_4bit makes.
            state = module.weight.quant_state
            assert torch.equal(module.weight.data.flatten(), tensors[f"{weight}.codes"])
            assert torch.equal(state.absmax, tensors[f"{weight}.nested_codes"])
            assert torch.equal(state.offset.reshape(1), tensors[f"{weight}.offset"])
    edge = edge_values()
    tensors["edge"] = edge
    quantized("edge", edge, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/nf4.safetensors")

    tokenizer = PreTrainedTokenizerFast.from_pretrained(f"{fixture}/model")
    train_blocks = ref.pack(tokenizer, f"{fixture}/train.txt")
    valid = ref.pack(tokenizer, f"{fixture}/valid.txt")
    before = ref.mean_loss(model, valid)
    peft = PeftModel.from_pretrained(model, f"{fixture}/lora_init", is_trainable=True)
    log = ref.train_adapter(peft, train_blocks)
    result = {
        "bnb_4bit_compute_dtype": "bfloat16",
        "valid_loss_before": before,
        "valid_loss_after": ref.mean_loss(peft, valid),
        "log": log,
    }
    with open(f"{out}/qlora.json", "w") as f:
        json.dump(result, f, indent=1)
    peft.save_pretrained(f"{out}/qlora_final")
    os.remove(f"{out}/qlora_final/README.md")


if __name__ == "__main__":
    main()
