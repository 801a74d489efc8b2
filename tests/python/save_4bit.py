"""Saves MODEL_DIR as transformers saves a bitsandbytes 4-bit model
(`save_pretrained` after loading with load_in_4bit, f32 compute): the
checkpoint kind hub repositories named `*-bnb-4bit` hold.

Usage: save_4bit.py MODEL_DIR OUT_DIR nf4|fp4 DOUBLE_QUANT(true|false)
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nf4_loading import nf4_loading


def main() -> None:
    model_dir, out_dir, quant_type, double_quant = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        **nf4_loading(torch.float32, double_quant == "true", quant_type),
    )
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)


if __name__ == "__main__":
    main()
