#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2-reference.json: what an independent implementation of the
same GGUF file, llama.cpp (through llama-cpp-python), makes of SmolLM2-135M-Instruct:

- for three chat prompts: llama.cpp's token ids of the templated prompt, and its greedy
  continuation (32 tokens);
- for a fixed text: its token ids and, under teacher forcing, llama.cpp's most likely next
  token at every position;
- with every top token, llama.cpp's margin over its runner-up (in logits), and llama.cpp's
  agreement with itself when the same text is evaluated token by token instead of in one
  batch.

Why the margins: with activations quantized to 8 bits before every product (as llama.cpp
and wasp both do), a last-bit difference in any sum flips a rounding somewhere and moves the
logits by ~0.1-0.5. llama.cpp evaluating the same tokens in one batch and one by one
disagrees with itself wherever its top two tokens are that close (3 of 82 positions when
this was written). So the test asks that wasp agree wherever llama.cpp's own choice is
clear (a margin of at least 0.25), and at no fewer positions than llama.cpp's two schedules
agree with each other; greedy tokens must be the same up to the first step where llama.cpp
itself was that close to a tie (and for 16 steps where it never is).

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


def margin(row):
    """The top logit's lead over the runner-up."""
    top = np.sort(np.asarray(row, dtype=np.float64))[-2:]
    return round(float(top[1] - top[0]), 4)


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
        greedy, margins = [], []
        for _ in range(32):
            row = llm.scores[llm.n_tokens - 1]
            token = int(np.argmax(row))
            greedy.append(token)
            margins.append(margin(row))
            if token == llm.token_eos():
                break
            llm.eval([token])
        prompts.append({"messages": messages, "text": text, "prompt_ids": ids,
                        "greedy_ids": greedy, "greedy_margins": margins})
    ids = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    batched = np.array(llm.scores[:len(ids)])
    llm.reset()
    for token in ids:
        llm.eval([token])
    stepped = np.array(llm.scores[:len(ids)])
    argmax = [int(t) for t in batched.argmax(axis=1)]
    self_agreement = int((batched.argmax(axis=1) == stepped.argmax(axis=1)).sum())
    fixture = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "made_by": "llama-cpp-python (llama.cpp), scripts/make-llm-reference.py",
        "eos_id": llm.token_eos(),
        "prompts": prompts,
        "teacher_forced": {"text": TEXT, "ids": ids, "argmax": argmax,
                           "margins": [margin(row) for row in batched],
                           "stepped_agreement": self_agreement},
    }
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                       "smollm2-reference.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
