#!/usr/bin/env python3
"""Writes a Hugging Face `tokenizer.json` and `tokenizer_config.json` for a GGUF model whose
metadata holds a GPT-2-style byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`):
the tokens, merges, special tokens, chat template and BOS/EOS ids, read from the file's
own metadata (no hub, no other package).

    scripts/gguf-tokenizer.py MODEL.gguf OUT_DIR

The pre-tokenizer is the one the metadata names (`tokenizer.ggml.pre`): digits one by one,
then GPT-2's byte-level split, as llama.cpp and the model's own tokenizer do for `smollm`.
"""
import json
import os
import struct
import sys

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}


def metadata(path):
    """The key-value metadata of a GGUF file (versions 2 and 3)."""
    with open(path, "rb") as f:
        def u32():
            return struct.unpack("<I", f.read(4))[0]

        def u64():
            return struct.unpack("<Q", f.read(8))[0]

        def string():
            return f.read(u64()).decode("utf-8")

        def value(kind):
            if kind in SCALARS:
                fmt = SCALARS[kind]
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
            if kind == 8:
                return string()
            if kind == 9:
                inner, n = u32(), u64()
                return [value(inner) for _ in range(n)]
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise SystemExit(f"{path} is not a GGUF file")
        version = u32()
        if version not in (2, 3):
            raise SystemExit(f"{path}: GGUF version {version} is not supported")
        _tensors, count = u64(), u64()
        return {string(): value(u32()) for _ in range(count)}


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    meta = metadata(sys.argv[1])
    out = sys.argv[2]
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise SystemExit("only byte-level BPE (`tokenizer.ggml.model = gpt2`) vocabularies are supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "default", "gpt-2"):
        raise SystemExit(f"pre-tokenizer `{pre}` is not supported")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    # 3 = control, 4 = user-defined: matched whole, never split by BPE.
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] == 3}
        for i, t in enumerate(tokens) if types[i] in (3, 4)
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    splits = [byte_level]
    if pre == "smollm":
        splits.insert(0, {"type": "Digits", "individual_digits": True})
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False,
                           "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": meta["tokenizer.ggml.merges"]},
    }
    token = lambda key: tokens[meta[key]] if key in meta else None
    config = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": meta.get(f"{meta.get('general.architecture', 'llama')}.context_length"),
    }
    os.makedirs(out, exist_ok=True)
    for name, doc in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config)):
        with open(os.path.join(out, name + ".partial"), "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False)
        os.replace(os.path.join(out, name + ".partial"), os.path.join(out, name))


if __name__ == "__main__":
    main()
