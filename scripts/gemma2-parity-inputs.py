#!/usr/bin/env python3
"""Inputs for a device-against-CPU parity run on Gemma 2 (soft caps, sliding window):

    python3 scripts/gemma2-parity-inputs.py OUT_DIR

writes OUT_DIR/gemma2-lora (a PEFT LoRA adapter for tests/fixtures/hf/gemma2, r = 4 on all seven
projections, seeded random A and B, B non-zero so the gradients of A are too) and
OUT_DIR/gemma2-batch.safetensors (the fixture's reference batch: input_ids, attention_mask and
labels, without its base-model logits, which an adapter changes). `unlearn parity` then compares
the device with the CPU only; the fixtures hold no PEFT gradients for Gemma 2.

Plain Python (no torch, numpy or safetensors): the device machine's Python and this one's both
run it.
"""
import json
import os
import random
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "gemma2")


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    return {
        name: (info["dtype"], info["shape"], body[info["data_offsets"][0] : info["data_offsets"][1]])
        for name, info in header.items()
        if name != "__metadata__"
    }


def write_safetensors(path, tensors):
    header, offset, chunks = {"__metadata__": {"format": "pt"}}, 0, []
    for name, (dtype, shape, raw) in sorted(tensors.items()):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {  # module → (in, out)
        "self_attn.q_proj": (hidden, q_out),
        "self_attn.k_proj": (hidden, kv_out),
        "self_attn.v_proj": (hidden, kv_out),
        "self_attn.o_proj": (q_out, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    r, rng = 4, random.Random(0)

    def uniform(n, scale):
        return struct.pack(f"<{n}f", *(rng.uniform(-scale, scale) for _ in range(n)))

    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = ("F32", [r, fan_in], uniform(r * fan_in, fan_in**-0.5))
            tensors[f"{name}.lora_B.weight"] = ("F32", [fan_out, r], uniform(fan_out * r, 0.2))
    adapter = os.path.join(out, "gemma2-lora")
    os.makedirs(adapter, exist_ok=True)
    write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), tensors)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": None,
        "target_modules": sorted(m.split(".")[1] for m in shapes),
        "task_type": "CAUSAL_LM",
    }
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    reference = read_safetensors(os.path.join(FIXTURE, "reference.safetensors"))
    batch = {k: reference[k] for k in ("input_ids", "attention_mask", "labels")}
    write_safetensors(os.path.join(out, "gemma2-batch.safetensors"), batch)
    print(f"wrote {adapter} and {os.path.join(out, 'gemma2-batch.safetensors')}")


if __name__ == "__main__":
    main()
