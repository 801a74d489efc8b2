"""The `from_pretrained` options that load a model's linear weights in
bitsandbytes NF4 on the CPU, as the reference scripts need them."""

import torch
from transformers import BitsAndBytesConfig


def nf4_loading(compute_dtype: torch.dtype, double_quant: bool = True, quant_type: str = "nf4") -> dict:
    return dict(
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        ),
        device_map="cpu",
    )
