"""PyTorch + PEFT on the bench shape: what `pt-host bench` compares itself with.

Runs one measurement and prints one JSON line, so that each mode's peak memory
is its own process's:

    python3 bench/torch_reference.py --mode lora|full|eval|generate|matmul|allreduce-lora|allreduce-full \
        [--hidden_size 512 --n_layer 8 --n_head 8 --vocab_size 16384 --block_size 256 \
         --batch_size 4 --steps 3 --new_tokens 64]

The recipe is pt-host's bench recipe: a random BLOOM (HF init), LoRA r=8,
alpha=16, dropout 0.05 on query_key_value, dense, dense_h_to_4h and
dense_4h_to_h (MedicalGPT's `--target_modules all`), AdamW lr 2e-4, f32, all
cores (torch's default intra-op threads), random token blocks. With
`--device cuda`: bf16 base weights, f32 adapters, TF32 matmuls, as pt-host
runs on a GPU. The allreduce modes sum `--allreduce_floats` f32 over two
processes with torch.distributed's gloo backend on loopback, as DDP on CPUs
does. Peak memory is the process's resident set (ru_maxrss); on a GPU
the JSON also has torch's peak allocated GPU memory. `pt-host bench
--torch` runs this script itself when torch, transformers and peft import.
"""

import argparse
import json
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)


def allreduce_rank(rank, port, floats, results):
    """One of two gloo ranks: the best of 10 sums of `floats` ones."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gradients = torch.ones(floats)
    dist.all_reduce(gradients)
    assert gradients.min().item() == gradients.max().item() == 2.0
    best = float("inf")
    for _ in range(10):
        gradients = torch.ones(floats)
        started = time.perf_counter()
        dist.all_reduce(gradients)
        best = min(best, time.perf_counter() - started)
    dist.destroy_process_group()
    if rank == 0:
        results.put((floats * 4e-6 / best, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def allreduce(floats):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(allreduce_rank, args=(port, floats, results), nprocs=2)
    return results.get()


LORA_TARGETS = {
    True: ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    False: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def model_config(args):
    """The random model pt-host's bench builds: the same family and shape."""
    if args.arch == "bloom":
        return BloomConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    config_class = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
    }[args.arch]
    return config_class(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.num_key_value_heads or args.n_head,
        head_dim=args.hidden_size // args.n_head,
        tie_word_embeddings=args.tie_word_embeddings == "true",
        sliding_window=None,
        attention_dropout=0.0,
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--mode",
        required=True,
        choices=["lora", "full", "eval", "generate", "matmul", "allreduce-lora", "allreduce-full"],
    )
    p.add_argument("--arch", default="bloom", choices=["bloom", "llama", "mistral", "qwen2", "qwen3"])
    p.add_argument("--num_key_value_heads", type=int, default=None)
    p.add_argument("--intermediate_size", type=int, default=None)
    p.add_argument("--tie_word_embeddings", default="true", choices=["true", "false"])
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=16384)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--allreduce_floats", type=int, default=0)
    args = p.parse_args()

    if args.mode.startswith("allreduce"):
        rate, peak_mib = allreduce(args.allreduce_floats)
        print(json.dumps({"mode": args.mode, "rate": rate, "peak_mib": peak_mib, "torch": torch.__version__}))
        return

    torch.manual_seed(42)
    config = model_config(args)
    # On a GPU as pt-host runs there: bf16 base weights (PEFT keeps the
    # adapters in f32), TF32 for f32 matmuls.
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_config(config).to(args.device, dtype=dtype)
    ids = torch.randint(4, args.vocab_size, (args.batch_size, args.block_size), device=args.device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    tokens = args.batch_size * args.block_size

    if args.mode == "matmul":
        n, h = args.block_size * args.batch_size, args.hidden_size
        x = (torch.rand(n, h, device=args.device) * 2 - 1).to(dtype)
        w = (torch.rand(h, 4 * h, device=args.device) * 2 - 1).to(dtype)
        x @ w
        sync()
        best = float("inf")
        for _ in range(10):
            started = time.perf_counter()
            x @ w
            sync()
            best = min(best, time.perf_counter() - started)
        rate = 2 * n * h * 4 * h / best / 1e9
    elif args.mode in ("lora", "full"):
        if args.mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=8,
                    lora_alpha=16,
                    lora_dropout=0.05,
                    target_modules=LORA_TARGETS[args.arch == "bloom"],
                    task_type="CAUSAL_LM",
                ),
            )
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        step()  # warm-up: allocations and optimizer state
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - started) / args.steps
        rate = tokens / seconds
    elif args.mode == "eval":
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
            started = time.perf_counter()
            for _ in range(args.steps):
                model(input_ids=ids, labels=ids).loss.item()
            rate = tokens * args.steps / (time.perf_counter() - started)
    else:
        model.eval()
        prompt = ids[:1, :16]
        kwargs = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=3,
        )
        with torch.no_grad():
            model.generate(prompt, **kwargs)
            started = time.perf_counter()
            model.generate(prompt, **kwargs)
            rate = args.new_tokens / (time.perf_counter() - started)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "mode": args.mode,
        "rate": rate,
        "peak_mib": peak_mib,
        "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
