#!/usr/bin/env python3
"""Time one LoRA unlearning step with transformers + PEFT, the same work `unlearn bench` times.

Same shape as `unlearn bench --methods gradascent`: a Llama with random weights from the same
config, LoRA r on all seven projections (alpha 2r, dropout 0), a batch of B x T random tokens with
the first quarter of each row as prompt (labels -100), loss = -NLL (gradient ascent), backward,
global-norm clipping to 1.0, AdamW (lr 1e-4, weight decay 0). Prints one JSON line like the Rust
harness. Needs torch, transformers and peft.

    python3 benches/peft_step.py --device cpu            # CPU shape of the performance issue
    python3 benches/peft_step.py --device cuda --dtype bf16 \
        --config benches/llama-3.2-1b/config.json --seq 512   # GPU shape: Llama-3.2-1B

--attn eager times transformers' eager attention, which materialises the [B, H, T, T] scores as
unlearn does, instead of its default (SDPA: flash attention on a GPU when no mask is passed).
"""
import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--config", help="a config.json instead of the Llama shape flags")
    ap.add_argument("--attn", choices=["eager", "sdpa"], help="transformers' attn_implementation")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.config:
        cfg = AutoConfig.for_model(**json.load(open(args.config)))
    else:
        cfg = LlamaConfig(
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
            max_position_embeddings=max(2048, args.seq),
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )
    vocab = cfg.vocab_size
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # built on the device in its dtype: a 1B model initialised on the CPU in f32 first takes
    # minutes and twice the memory
    attn = {"attn_implementation": args.attn} if args.attn else {}
    with torch.device(args.device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **attn)
        except TypeError:  # transformers before 4.56 call it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, **attn)
    # PEFT's "all-linear": every linear layer but the output head, as `unlearn bench` targets
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    model = get_peft_model(model, lora)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # LoRA weights, grads and optimizer state in f32
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100

    times = []
    for step in range(args.warmup + args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        loss = -out.loss.float()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = args.batch * args.seq
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {
        "method": "torch+peft gradascent" + (f" ({args.attn} attention)" if args.attn else ""),
        "seconds_per_step": med,
        "tokens_per_second": tokens / med,
        "tokens_per_step": tokens,
        "peak_rss_mb": peak_mb,
    }
    if args.device.startswith("cuda"):
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


if __name__ == "__main__":
    main()
