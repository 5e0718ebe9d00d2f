#!/usr/bin/env python3
"""Build the golden fixtures of tests/engine/golden.rs with Hugging Face transformers + PEFT.

Two tiny random Llamas (grouped-query attention; one untied with llama3 RoPE scaling stored in
f32, one with tied embeddings stored in bf16) and several PEFT LoRA adapters per model
(different ranks, target sets, a regex target, rslora, rank_pattern / alpha_pattern,
layers_to_transform, f32 and bf16 storage). Weights are drawn with larger spreads than a fresh
Hugging Face init so the logits are peaked and greedy tokens are not near-ties.

Every reference is computed from the files as reloaded from disk (so bf16 storage is what is
tested), in float64 (RoPE angles stay f32 inside transformers, as in the engine). For each
request the manifest records the prompt, the greedy continuation and the logits of every
position that predicts a generated token.

Usage (PyPI only):  pip install torch transformers peft safetensors
                    python scripts/golden/make_fixtures.py [OUT_DIR]
OUT_DIR defaults to tests/fixtures/golden next to this repository's root.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

NEW_TOKENS = 6
ROOT = Path(__file__).resolve().parents[2]


def randomize(model, gen, std):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def base_models():
    untied = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    tied = LlamaConfig(
        vocab_size=192,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    return [("untied", untied, torch.float32), ("tied", tied, torch.bfloat16)]


def adapters_for(name):
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if name == "untied":
        return [
            ("qv_r8", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), torch.float32),
            ("all_r4_rslora", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=all7), torch.bfloat16),
            (
                "patterns",
                dict(
                    r=2,
                    lora_alpha=4,
                    target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
                    rank_pattern={"layers.1.self_attn.q_proj": 6, "down_proj": 3},
                    alpha_pattern={"o_proj": 1.5},
                ),
                torch.float32,
            ),
            (
                "regex_r16",
                dict(r=16, lora_alpha=8, target_modules=r".*\.1\.mlp\.(up|gate)_proj|.*\.0\.self_attn\.v_proj"),
                torch.bfloat16,
            ),
        ]
    return [
        ("all_r8", dict(r=8, lora_alpha=32, target_modules="all-linear"), torch.float32),
        (
            "kv_up_layers",
            dict(r=4, lora_alpha=4, target_modules=["k_proj", "v_proj", "up_proj"], layers_to_transform=[0, 2]),
            torch.bfloat16,
        ),
    ]


def prompts(vocab, gen):
    lengths = [5, 11, 17, 23]
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def reference(model, prompt):
    """Greedy continuation and the logits of each position that predicts a generated token."""
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    full = model(torch.tensor([ids[:-1]])).logits[0]
    rows = full[len(prompt) - 1 :]
    assert rows.shape[0] == NEW_TOKENS
    # The greedy tokens must be the argmax of the recorded rows (no drift between the two).
    assert [int(torch.argmax(r)) for r in rows] == ids[len(prompt) :]
    return ids[len(prompt) :], [[float(v) for v in r.float()] for r in rows]


def margin(rows):
    """Smallest gap between the best and second-best logit over the rows."""
    gaps = []
    for r in rows:
        top = sorted(r, reverse=True)
        gaps.append(top[0] - top[1])
    return min(gaps)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "golden"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1234)
    manifest = {"new_tokens": NEW_TOKENS, "models": []}
    for model_name, cfg, storage in base_models():
        model_dir = out / model_name
        model = LlamaForCausalLM(cfg)
        randomize(model, gen, std=1.5)
        model.to(storage).save_pretrained(model_dir, safe_serialization=True)
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
        base.eval()
        entry = {"name": model_name, "dir": model_name, "adapters": [], "requests": []}
        ps = prompts(cfg.vocab_size, gen)
        for i, p in enumerate(ps[:2]):
            greedy, logits = reference(base, p)
            entry["requests"].append({"adapter": None, "prompt": p, "greedy": greedy, "logits": logits})
        for j, (ad_name, kwargs, ad_dtype) in enumerate(adapters_for(model_name)):
            train = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            peft_model = get_peft_model(train, LoraConfig(bias="none", **kwargs))
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if "lora_" in n:
                        p.copy_(0.6 * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(ad_dtype)
            ad_dir = model_dir / "adapters" / ad_name
            peft_model.save_pretrained(ad_dir, safe_serialization=True)
            entry["adapters"].append({"name": ad_name, "dir": f"{model_name}/adapters/{ad_name}"})
            ref_base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
            ref = PeftModel.from_pretrained(ref_base, ad_dir)
            ref = ref.to(torch.float64)
            ref.eval()
            for p in (ps[j % len(ps)], ps[(j + 2) % len(ps)]):
                greedy, logits = reference(ref, p)
                entry["requests"].append({"adapter": ad_name, "prompt": p, "greedy": greedy, "logits": logits})
        manifest["models"].append(entry)
        for r in entry["requests"]:
            print(f"{model_name:7} {str(r['adapter']):14} prompt {len(r['prompt']):2} greedy {r['greedy']} "
                  f"margin {margin(r['logits']):.3f}")
    (out / "manifest.json").write_text(json.dumps(manifest))
    for junk in out.rglob("README.md"):
        junk.unlink()
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
