#!/usr/bin/env python3
"""Writes tests/fixtures/minilm-reference.json: all-MiniLM-L6-v2 embeddings of a fixed set
of sentences, computed by sentence-transformers (the reference implementation users
compare against). wasp's embeddings must match them at cosine >= 0.999.

Run once on a developer machine (it needs sentence-transformers and torch, which the test
suite does not):

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers==6.2.0
    scripts/fetch-model target/models
    /tmp/st/bin/python scripts/make-reference.py target/models/all-MiniLM-L6-v2
"""

import json
import os
import sys

from sentence_transformers import SentenceTransformer

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "wasp runs WebAssembly processors in front of candle models!",
    "Übergrößenträger café naïve résumé — déjà vu.",
    "東京は日本の首都です。",
    "Emojis 🐝 and symbols: 3.14 × 2 ≈ 6.28, e-mail a.b@c.io, #hashtag",
    "hello",
    "The quick brown fox jumps over the lazy dog. " * 6,
]


def main() -> None:
    model_dir = sys.argv[1]
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "..", "tests", "fixtures", "minilm-reference.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(
            {
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "produced_by": "scripts/make-reference.py, sentence-transformers 6.2.0",
                "sentences": SENTENCES,
                "embeddings": [[round(float(x), 7) for x in v] for v in vectors],
            },
            f,
            ensure_ascii=False,
        )
        f.write("\n")
    print(f"wrote {len(SENTENCES)} embeddings of dimension {vectors.shape[1]} to {out}")


if __name__ == "__main__":
    main()
