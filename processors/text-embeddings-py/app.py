"""OpenAI-compatible text embeddings around a BERT-family encoder, in Python: the twin of
``processors/text-embeddings`` (Rust), driving the same candle MiniLM backend through
``transform``.

- ``pre_process``: an OpenAI embeddings request (``input`` a string or an array of
  strings) becomes ``input_ids``, ``attention_mask`` and ``token_type_ids`` tensors of
  shape ``[n, longest]``. The tokenizer is rebuilt in pure Python from the model's own
  ``tokenizer.json`` (BERT normaliser, BERT pre-tokeniser, WordPiece, ``[CLS] … [SEP]``),
  and gives the Rust ``tokenizers`` crate's ids.
- ``post_process``: ``last_hidden_state`` is mean-pooled over each input's tokens and
  L2-normalised, and the answer is an OpenAI embeddings response with usage counts.

Configuration, as the Rust version: ``TOKENIZER`` (default ``/model/tokenizer.json``),
``MAX_TOKENS`` (default 256), ``TRUNCATE`` (``true`` cuts long inputs; default ``false``),
``MODEL_NAME``.
"""

import array
import base64
import json
import math
import struct
import sys
import unicodedata

import wasp
from wasp.exports import *  # noqa: F401,F403

# Rust's `char::is_whitespace` (the White_Space property), which differs from str.isspace.
WHITESPACE = set(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def is_control(c):
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")


def is_punctuation(c):
    return (c.isascii() and not c.isalnum() and c.isprintable() and c != " ") or (
        unicodedata.category(c).startswith("P")
    )


class Tokenizer:
    """The subset of Hugging Face tokenizers that BERT models' tokenizer.json use."""

    def __init__(self, spec):
        model = spec.get("model") or {}
        if model.get("type") != "WordPiece":
            raise ValueError(f"model type {model.get('type')!r} is not WordPiece")
        self.vocab = model["vocab"]
        self.unk = self.vocab[model.get("unk_token", "[UNK]")]
        self.prefix = model.get("continuing_subword_prefix", "##")
        self.max_chars = model.get("max_input_chars_per_word", 100)
        norm = spec.get("normalizer") or {}
        if norm.get("type") != "BertNormalizer":
            raise ValueError(f"normalizer {norm.get('type')!r} is not BertNormalizer")
        self.clean_text = norm.get("clean_text", True)
        self.chinese = norm.get("handle_chinese_chars", True)
        self.lowercase = norm.get("lowercase", True)
        strip = norm.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else strip
        if (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            raise ValueError("the pre-tokenizer is not BertPreTokenizer")
        single = (spec.get("post_processor") or {}).get("single") or []
        self.before, self.after, seen = [], [], False
        for piece in single:
            if "Sequence" in piece:
                seen = True
            elif "SpecialToken" in piece:
                special = piece["SpecialToken"]
                (self.after if seen else self.before).append(
                    (self.vocab[special["id"]], special.get("type_id", 0))
                )
        # Added tokens match the raw text before normalisation, longest first.
        self.added = sorted(
            ((t["content"], t["id"]) for t in spec.get("added_tokens") or [] if not t.get("normalized")),
            key=lambda t: -len(t[0]),
        )

    def normalize(self, text):
        if self.clean_text:
            text = "".join(
                " " if c in WHITESPACE else c
                for c in text
                if not (c == "\0" or c == "\ufffd" or is_control(c))
            )
        if self.chinese:
            text = "".join(
                f" {c} " if any(a <= ord(c) <= b for a, b in CJK) else c for c in text
            )
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.lowercase:
            # Character by character, as the Rust crate does: no final-sigma rule.
            text = "".join(c.lower() for c in text)
        return text

    @staticmethod
    def pre_tokenize(text):
        words, word = [], []
        for c in text:
            if c in WHITESPACE:
                if word:
                    words.append("".join(word))
                    word = []
            elif is_punctuation(c):
                if word:
                    words.append("".join(word))
                    word = []
                words.append(c)
            else:
                word.append(c)
        if word:
            words.append("".join(word))
        return words

    def wordpiece(self, word):
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def segments(self, text):
        """The text split around added tokens: (text, None) or (token, id) pieces."""
        out, at, plain = [], 0, 0
        while at < len(text):
            for content, id_ in self.added:
                if text.startswith(content, at):
                    if plain < at:
                        out.append((text[plain:at], None))
                    out.append((content, id_))
                    at += len(content)
                    plain = at
                    break
            else:
                at += 1
        if plain < len(text):
            out.append((text[plain:], None))
        return out

    def encode(self, text):
        """Token ids and type ids with the special tokens around them."""
        ids = []
        for piece, id_ in self.segments(text):
            if id_ is not None:
                ids.append(id_)
                continue
            for word in self.pre_tokenize(self.normalize(piece)):
                ids.extend(self.wordpiece(word))
        full = [i for i, _ in self.before] + ids + [i for i, _ in self.after]
        types = [t for _, t in self.before] + [0] * len(ids) + [t for _, t in self.after]
        return full, types


SETTINGS = {}


def parse_setting(name, default, parse):
    value = wasp.config.get(name)
    if value is None:
        return default
    try:
        return parse(value)
    except ValueError:
        raise wasp.ProcessorError.internal(f"{name}: `{value}` is not valid") from None


def parse_bool(value):
    if value not in ("true", "false"):
        raise ValueError(value)
    return value == "true"


@wasp.init
def setup():
    path = wasp.config.get("TOKENIZER", "/model/tokenizer.json")
    try:
        with open(path, "rb") as f:
            spec = json.load(f)
    except OSError as e:
        raise wasp.ProcessorError.internal(
            f"cannot read the tokenizer at {path}: {e} (mount the model directory and set TOKENIZER)"
        ) from None
    try:
        SETTINGS["tokenizer"] = Tokenizer(spec)
    except (ValueError, KeyError, TypeError) as e:
        raise wasp.ProcessorError.internal(f"tokenizer.json is not a BERT WordPiece tokenizer: {e}") from None
    SETTINGS["max_tokens"] = parse_setting("MAX_TOKENS", 256, int)
    SETTINGS["truncate"] = parse_setting("TRUNCATE", False, parse_bool)
    SETTINGS["model_name"] = wasp.config.get("MODEL_NAME")


def encode(texts):
    tokenizer, max_tokens = SETTINGS["tokenizer"], SETTINGS["max_tokens"]
    rows = []
    for i, text in enumerate(texts):
        field = "input" if len(texts) == 1 else f"input[{i}]"
        if text == "":
            raise wasp.ProcessorError.bad_request("must not be an empty string", field=field)
        ids, types = tokenizer.encode(text)
        if len(ids) > max_tokens:
            if not SETTINGS["truncate"]:
                raise wasp.ProcessorError.bad_request(
                    f"input has {len(ids)} tokens; this model takes at most {max_tokens}"
                    " (set TRUNCATE=true to cut instead)",
                    field=field,
                )
            # Keep the closing special token ([SEP]) as sentence-transformers does.
            last = ids[-1]
            ids, types = ids[:max_tokens], types[:max_tokens]
            ids[-1] = last
        rows.append((ids, types))
    width = max(len(ids) for ids, _ in rows)
    flat_ids, mask, flat_types, lengths = [], [], [], []
    for ids, types in rows:
        pad = width - len(ids)
        lengths.append(len(ids))
        flat_ids += ids + [0] * pad
        mask += [1] * len(ids) + [0] * pad
        flat_types += types + [0] * pad
    shape = [len(rows), width]
    tensors = [
        wasp.Tensor.i64("input_ids", shape, flat_ids),
        wasp.Tensor.i64("attention_mask", shape, mask),
        wasp.Tensor.i64("token_type_ids", shape, flat_types),
    ]
    return tensors, lengths


@wasp.pre_process
def pre_process(request):
    body = request.json()
    if not isinstance(body, dict) or "input" not in body:
        raise wasp.ProcessorError.bad_request(
            "request body is not valid JSON for this endpoint: missing field `input`"
        )
    given = body["input"]
    if isinstance(given, str):
        texts = [given]
    elif isinstance(given, list) and all(isinstance(t, str) for t in given):
        if not given:
            raise wasp.ProcessorError.bad_request("must not be an empty array", field="input")
        if len(given) > 2048:
            raise wasp.ProcessorError.bad_request("at most 2048 inputs per request", field="input")
        texts = given
    else:
        raise wasp.ProcessorError.bad_request("must be a string or an array of strings", field="input")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise wasp.ProcessorError.bad_request(
            f"`{encoding}` is not `float` or `base64`", field="encoding_format"
        )
    if body.get("dimensions") is not None:
        raise wasp.ProcessorError.bad_request(
            "this model does not support shortened embeddings", field="dimensions"
        )
    tensors, lengths = encode(texts)
    model = SETTINGS["model_name"] or body.get("model") or "embeddings"
    context = json.dumps({"lengths": lengths, "model": model, "base64": encoding == "base64"})
    return wasp.Prepared(
        input=wasp.ModelInput(tensors=tensors, parameters=None), context=context.encode()
    )


def pool(hidden, lengths):
    """Mean-pools each row's first lengths[i] token vectors and L2-normalises them."""
    if len(hidden.shape) != 3:
        raise wasp.ProcessorError.internal(
            f"expected last_hidden_state of shape [n, tokens, dim], got {list(hidden.shape)}"
        )
    n, width, dim = hidden.shape
    if n != len(lengths):
        raise wasp.ProcessorError.internal(f"model returned {n} rows for {len(lengths)} inputs")
    if hidden.dtype != wasp.Dtype.F32 or len(hidden.data) != n * width * dim * 4:
        raise wasp.ProcessorError.internal("last_hidden_state is not f32 of its shape")
    values = array.array("f")
    values.frombytes(hidden.data)
    if sys.byteorder != "little":
        values.byteswap()
    out = []
    for row, length in enumerate(lengths):
        length = min(length, width)
        total = [0.0] * dim
        for token in range(length):
            start = (row * width + token) * dim
            total = [a + b for a, b in zip(total, values[start : start + dim])]
        count = max(length, 1)
        mean = [v / count for v in total]
        norm = max(math.sqrt(sum(v * v for v in mean)), 1e-12)
        out.append([v / norm for v in mean])
    return out


@wasp.post_process
def post_process(context, output):
    try:
        context = json.loads(context)
    except ValueError as e:
        raise wasp.ProcessorError.internal(f"bad context: {e}") from None
    hidden = next((t for t in output.tensors if t.name == "last_hidden_state"), None)
    if hidden is None:
        raise wasp.ProcessorError.internal("the model returned no last_hidden_state")
    data = []
    for index, vector in enumerate(pool(hidden, context["lengths"])):
        if context["base64"]:
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(context["lengths"])
    return wasp.Response.json(
        {
            "object": "list",
            "data": data,
            "model": context["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
