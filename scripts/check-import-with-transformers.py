#!/usr/bin/env python3
"""Cross-checks an imported model folder with Hugging Face transformers (not run in CI).

Loads the folder written by `punica model import-gguf` with AutoTokenizer and
AutoModelForCausalLM, greedily continues a prompt, and for the demo model compares the ids with
the reference of MODEL.md. Needs torch and transformers:

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors
    /tmp/hf/bin/python scripts/check-import-with-transformers.py [MODEL_DIR] [PROMPT] [N_TOKENS]
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REFERENCE_PROMPT = "The capital of France is"
REFERENCE_PROMPT_IDS = [504, 3575, 282, 4649, 314]
REFERENCE_FIRST_IDS = [7042, 30, 198, 198, 504]  # " Paris.\n\nThe"


def main() -> int:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-135m"
    prompt = sys.argv[2] if len(sys.argv) > 2 else REFERENCE_PROMPT
    n_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 12

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    prompt_ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            prompt_ids,
            max_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    new_ids = out[0, prompt_ids.shape[1]:].tolist()
    print("prompt ids:   ", prompt_ids[0].tolist())
    print("generated ids:", new_ids)
    print("continuation: ", repr(tok.decode(new_ids)))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    print("chat prompt:  ", repr(chat))

    if prompt != REFERENCE_PROMPT:
        return 0
    ok = prompt_ids[0].tolist() == REFERENCE_PROMPT_IDS and new_ids[:5] == REFERENCE_FIRST_IDS
    print("matches MODEL.md reference:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
