#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2-reference.json: what an independent implementation of the
same GGUF file, llama.cpp (through llama-cpp-python), makes of SmolLM2-135M-Instruct:

- for three chat prompts: llama.cpp's token ids of the templated prompt, and its greedy
  continuation (32 tokens);
- for a fixed text: its token ids and, under teacher forcing, llama.cpp's most likely next
  token at every position.

wasp's generation backend must agree with the teacher-forced argmax at >= 98% of positions
and with the first 16 greedy tokens of each prompt; its tokenizer must give the same ids.

Run once on a developer machine (llama-cpp-python builds llama.cpp from source; the test
suite does not need it):

    scripts/llama-cpp install            # into target/tools/llama
    scripts/fetch-model target/models
    target/tools/llama/bin/python scripts/make-llm-reference.py target/models/SmolLM2-135M-Instruct
"""

import json
import os
import sys

import numpy as np
from llama_cpp import Llama

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three colours."}],
    [{"role": "user", "content": "Write a haiku about WebAssembly, café and naïve résumés."}],
]

TEXT = (
    "The quick brown fox jumps over the lazy dog. WebAssembly is a binary instruction "
    "format for a stack-based virtual machine, designed as a portable compilation target "
    "for programming languages. In 2026, 1234 servers ran 56.7 million requests; café "
    "owners said: « très bien ». def add(a, b):\n    return a + b\n"
)


def template(messages):
    """SmolLM2's chat template (as in the GGUF metadata), with the generation prompt."""
    out = ""
    for i, m in enumerate(messages):
        if i == 0 and messages[0]["role"] != "system":
            out += ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                    "trained by Hugging Face<|im_end|>\n")
        out += "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def main():
    model_dir = sys.argv[1]
    llm = Llama(model_path=os.path.join(model_dir, "model.gguf"), n_ctx=2048,
                logits_all=True, n_threads=2, verbose=False, seed=0,
                # The KV cache in f32, as wasp keeps it (llama.cpp defaults to f16).
                type_k=0, type_v=0)
    prompts = []
    for messages in PROMPTS:
        text = template(messages)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        greedy = []
        for _ in range(32):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(token)
            if token == llm.token_eos():
                break
            llm.eval([token])
        prompts.append({"messages": messages, "text": text, "prompt_ids": ids,
                        "greedy_ids": greedy})
    ids = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    argmax = [int(np.argmax(llm.scores[i])) for i in range(len(ids))]
    fixture = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "made_by": "llama-cpp-python (llama.cpp), scripts/make-llm-reference.py",
        "eos_id": llm.token_eos(),
        "prompts": prompts,
        "teacher_forced": {"text": TEXT, "ids": ids, "argmax": argmax},
    }
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                       "smollm2-reference.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
