"""Redacts personal data (e-mail addresses, phone numbers, payment card numbers, IPv4
addresses) from text: the Python twin of ``processors/pii-redact`` (Rust), answering the
same requests with the same responses (``tests/conformance/pii-redact.json``).

- As a service (backend ``none``): ``POST {"text": "..."}`` or ``{"texts": [...]}``,
  optionally with ``"kinds": ["email", ...]``, answers the redacted text and what was
  found where (UTF-8 byte offsets, as the Rust version reports).
- Around a model: ``pre_process`` redacts every string of a JSON request before the model
  sees it (sent as the model input's parameters), and ``post_process`` redacts every
  string of the model's JSON metadata before the client sees it.

Configuration: ``REDACT_KINDS`` (comma-separated, default all four) and ``REDACT_MASK``
(default ``[{KIND}]``).
"""

import json
import re

import wasp
from wasp.exports import *  # noqa: F401,F403

KINDS = ("email", "card", "ipv4", "phone")

DETECTORS = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "card": re.compile(r"\b\d(?:[ -]?\d){12,18}\b"),
    "ipv4": re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b"),
    "phone": re.compile(r"(?:\+|\b)\d[\d ().-]{7,}\d\b"),
}


def digits(text):
    return [int(c) for c in text if "0" <= c <= "9"]


def luhn(ds):
    total = 0
    for i, d in enumerate(reversed(ds)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def valid(kind, match):
    if kind == "card":
        return luhn(digits(match))
    if kind == "ipv4":
        return all(o.isascii() and o.isdigit() and int(o) <= 255 for o in match.split("."))
    if kind == "phone":
        return 9 <= len(digits(match)) <= 15
    return True


def find(text, kinds):
    """Findings as (kind, start, end) in characters, without overlaps (earlier kinds in
    KINDS order win), sorted by position."""
    found = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        for m in DETECTORS[kind].finditer(text):
            overlaps = any(m.start() < end and start < m.end() for _, start, end in found)
            if valid(kind, m.group()) and not overlaps:
                found.append((kind, m.start(), m.end()))
    found.sort(key=lambda f: f[1])
    return found


def redact(text, findings, mask):
    out, at = [], 0
    for kind, start, end in findings:
        out.append(text[at:start])
        out.append(mask.replace("{KIND}", kind.upper()))
        at = end
    out.append(text[at:])
    return "".join(out)


def byte_offset(text, index):
    return index if text.isascii() else len(text[:index].encode("utf-8"))


def redact_one(text, kinds, mask):
    findings = find(text, kinds)
    return {
        "text": redact(text, findings, mask),
        "findings": [
            {"kind": k, "start": byte_offset(text, s), "end": byte_offset(text, e)}
            for k, s, e in findings
        ],
    }


def redact_json(value, kinds, mask):
    """Redacts every string inside a JSON value, keys excepted."""
    if isinstance(value, str):
        findings = find(value, kinds)
        return redact(value, findings, mask) if findings else value
    if isinstance(value, list):
        return [redact_json(v, kinds, mask) for v in value]
    if isinstance(value, dict):
        return {k: redact_json(v, kinds, mask) for k, v in value.items()}
    return value


def parse_kinds(names):
    for name in names:
        if name not in KINDS:
            raise ValueError(f"unknown kind `{name}` (email, card, ipv4, phone)")
    return list(names)


SETTINGS = {}


@wasp.init
def setup():
    listed = wasp.config.get("REDACT_KINDS")
    try:
        kinds = (
            list(KINDS)
            if listed is None
            else parse_kinds([n.strip() for n in listed.split(",") if n.strip()])
        )
    except ValueError as e:
        raise wasp.ProcessorError.internal(f"REDACT_KINDS: {e}") from None
    SETTINGS["kinds"] = kinds
    SETTINGS["mask"] = wasp.config.get("REDACT_MASK", "[{KIND}]")


PREFIX = "request body is not valid JSON for this endpoint"


def is_string_list(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@wasp.handle
def handle(request):
    body = request.json()
    if not isinstance(body, dict):
        raise wasp.ProcessorError.bad_request(f"{PREFIX}: expected an object")
    for key in body:
        if key not in ("text", "texts", "kinds"):
            raise wasp.ProcessorError.bad_request(
                f"{PREFIX}: unknown field `{key}`, expected one of `text`, `texts`, `kinds`"
            )
    # A member that is null counts as not given, as in the Rust version.
    text, texts, names = body.get("text"), body.get("texts"), body.get("kinds")
    if text is not None and not isinstance(text, str):
        raise wasp.ProcessorError.bad_request(f"{PREFIX}: `text` must be a string")
    if texts is not None and not is_string_list(texts):
        raise wasp.ProcessorError.bad_request(f"{PREFIX}: `texts` must be a list of strings")
    if names is not None and not is_string_list(names):
        raise wasp.ProcessorError.bad_request(f"{PREFIX}: `kinds` must be a list of strings")
    kinds = SETTINGS["kinds"]
    if names is not None:
        try:
            kinds = parse_kinds(names)
        except ValueError as e:
            raise wasp.ProcessorError.bad_request(str(e), field="kinds") from None
    mask = SETTINGS["mask"]
    if (text is None) == (texts is None):
        raise wasp.ProcessorError.bad_request("give exactly one of `text` or `texts`", field="text")
    if text is not None:
        return wasp.Response.json(redact_one(text, kinds, mask))
    return wasp.Response.json({"results": [redact_one(t, kinds, mask) for t in texts]})


@wasp.pre_process
def pre_process(request):
    body = redact_json(request.json(), SETTINGS["kinds"], SETTINGS["mask"])
    return wasp.Prepared(
        input=wasp.ModelInput(tensors=[], parameters=json.dumps(body, separators=(",", ":"))),
        context=b"",
    )


@wasp.post_process
def post_process(context, output):
    try:
        body = None if output.metadata is None else json.loads(output.metadata)
    except ValueError as e:
        raise wasp.ProcessorError.internal(f"model metadata is not JSON: {e}") from None
    return wasp.Response.json(redact_json(body, SETTINGS["kinds"], SETTINGS["mask"]))
