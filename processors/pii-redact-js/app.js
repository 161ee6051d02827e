// Redacts personal data (e-mail addresses, phone numbers, payment card numbers, IPv4
// addresses) from text: the JavaScript twin of `processors/pii-redact` (Rust), answering
// the same requests with the same responses (`tests/conformance/pii-redact.json`).
//
// - As a service (backend `none`): `POST {"text": "..."}` or `{"texts": [...]}`,
//   optionally with `"kinds": ["email", ...]`, answers the redacted text and what was
//   found where (UTF-8 byte offsets, as the Rust version reports).
// - Around a model: `preProcess` redacts every string of a JSON request before the model
//   sees it (sent as the model input's parameters), and `postProcess` redacts every
//   string of the model's JSON metadata before the client sees it.
//
// Configuration: REDACT_KINDS (comma-separated, default all four) and REDACT_MASK
// (default `[{KIND}]`).

import { processor, config, ProcessorError, Response } from './wasp.js';

const KINDS = ['email', 'card', 'ipv4', 'phone'];

// The JavaScript engine inside the component has no Unicode property tables, and its
// `\b` is ASCII-only; Rust's is Unicode-aware. So the digit detectors run on a copy of
// the text (same length) where each non-ASCII character is `a` when it counts as a word
// character and a space when not, with the same approximation as the C version: the
// punctuation, symbol and emoji blocks are not word characters, other scripts are.
// Digits are ASCII digits.
function wordCodePoint(cp) {
  if (cp < 0x80) return /[A-Za-z0-9_]/.test(String.fromCharCode(cp));
  if (cp < 0xc0) return cp === 0xaa || cp === 0xb5 || cp === 0xba;
  if (cp === 0xd7 || cp === 0xf7) return false;
  if (cp >= 0x2000 && cp <= 0x2bff) return cp === 0x200c || cp === 0x200d;
  if (cp >= 0x3000 && cp <= 0x303f) return cp === 0x3005 || cp === 0x3006 || cp === 0x3007;
  if (cp >= 0xfe30 && cp <= 0xfe4f) return false;
  if (cp >= 0xff00 && cp <= 0xff0f) return false;
  if (cp >= 0x1f000 && cp <= 0x1faff) return false;
  return true;
}

function wordMap(text) {
  let out = '';
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    if (unit < 0x80) {
      out += text[i];
      continue;
    }
    const cp = text.codePointAt(i);
    const mapped = wordCodePoint(cp) ? 'a' : ' ';
    out += mapped;
    if (cp > 0xffff) {
      out += mapped;
      i++;
    }
  }
  return out;
}

const DETECTORS = {
  email: /[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}/g,
  card: /\b[0-9](?:[ -]?[0-9]){12,18}\b/g,
  ipv4: /\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b/g,
  phone: /(?:\+|\b)[0-9][0-9 ().-]{7,}[0-9]\b/g,
};

const encoder = new TextEncoder();
const PREFIX = 'request body is not valid JSON for this endpoint';

function digits(text) {
  return [...text].filter((c) => c >= '0' && c <= '9').map(Number);
}

function luhn(ds) {
  let sum = 0;
  ds.reverse().forEach((d, i) => {
    if (i % 2 === 1) {
      d *= 2;
      if (d > 9) d -= 9;
    }
    sum += d;
  });
  return sum % 10 === 0;
}

function valid(kind, match) {
  if (kind === 'card') return luhn(digits(match));
  if (kind === 'ipv4') return match.split('.').every((o) => /^[0-9]+$/.test(o) && Number(o) <= 255);
  if (kind === 'phone') {
    const n = digits(match).length;
    return n >= 9 && n <= 15;
  }
  return true;
}

/** Findings `{kind, start, end}` in UTF-16 units, without overlaps, by position. */
function find(text, kinds) {
  const found = [];
  const mapped = /^[\x00-\x7f]*$/.test(text) ? text : wordMap(text);
  for (const kind of KINDS) {
    if (!kinds.includes(kind)) continue;
    for (const m of (kind === 'email' ? text : mapped).matchAll(DETECTORS[kind])) {
      const start = m.index;
      const end = start + m[0].length;
      const overlaps = found.some((f) => start < f.end && f.start < end);
      if (valid(kind, text.slice(start, end)) && !overlaps) found.push({ kind, start, end });
    }
  }
  return found.sort((a, b) => a.start - b.start);
}

function redact(text, findings, mask) {
  let out = '';
  let at = 0;
  for (const f of findings) {
    out += text.slice(at, f.start) + mask.replaceAll('{KIND}', f.kind.toUpperCase());
    at = f.end;
  }
  return out + text.slice(at);
}

function byteOffset(text, index) {
  return encoder.encode(text.slice(0, index)).length;
}

function redactOne(text, kinds, mask) {
  const findings = find(text, kinds);
  return {
    text: redact(text, findings, mask),
    findings: findings.map((f) => ({
      kind: f.kind,
      start: byteOffset(text, f.start),
      end: byteOffset(text, f.end),
    })),
  };
}

/** Redacts every string inside a JSON value, keys excepted. */
function redactJson(value, kinds, mask) {
  if (typeof value === 'string') {
    const findings = find(value, kinds);
    return findings.length ? redact(value, findings, mask) : value;
  }
  if (Array.isArray(value)) return value.map((v) => redactJson(v, kinds, mask));
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, redactJson(v, kinds, mask)]));
  }
  return value;
}

function parseKinds(names) {
  for (const name of names) {
    if (!KINDS.includes(name)) throw new Error(`unknown kind \`${name}\` (email, card, ipv4, phone)`);
  }
  return names;
}

const isStringList = (v) => Array.isArray(v) && v.every((s) => typeof s === 'string');

const settings = {};

export const { lifecycle, handler, transform } = processor({
  init() {
    const listed = config.get('REDACT_KINDS');
    try {
      settings.kinds =
        listed === undefined
          ? [...KINDS]
          : parseKinds(listed.split(',').map((s) => s.trim()).filter((s) => s));
    } catch (e) {
      throw ProcessorError.internal(`REDACT_KINDS: ${e.message}`);
    }
    settings.mask = config.get('REDACT_MASK', '[{KIND}]');
  },

  handle(request) {
    const body = request.json();
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
      throw ProcessorError.badRequest(`${PREFIX}: expected an object`);
    }
    for (const key of Object.keys(body)) {
      if (!['text', 'texts', 'kinds'].includes(key)) {
        throw ProcessorError.badRequest(
          `${PREFIX}: unknown field \`${key}\`, expected one of \`text\`, \`texts\`, \`kinds\``,
        );
      }
    }
    // A member that is null counts as not given, as in the Rust version.
    const text = body.text ?? null;
    const texts = body.texts ?? null;
    const names = body.kinds ?? null;
    if (text !== null && typeof text !== 'string') {
      throw ProcessorError.badRequest(`${PREFIX}: \`text\` must be a string`);
    }
    if (texts !== null && !isStringList(texts)) {
      throw ProcessorError.badRequest(`${PREFIX}: \`texts\` must be a list of strings`);
    }
    if (names !== null && !isStringList(names)) {
      throw ProcessorError.badRequest(`${PREFIX}: \`kinds\` must be a list of strings`);
    }
    let kinds = settings.kinds;
    if (names !== null) {
      try {
        kinds = parseKinds(names);
      } catch (e) {
        throw ProcessorError.badRequest(e.message, 'kinds');
      }
    }
    if ((text === null) === (texts === null)) {
      throw ProcessorError.badRequest('give exactly one of `text` or `texts`', 'text');
    }
    if (text !== null) return Response.json(redactOne(text, kinds, settings.mask));
    return Response.json({ results: texts.map((t) => redactOne(t, kinds, settings.mask)) });
  },

  preProcess(request) {
    const body = redactJson(request.json(), settings.kinds, settings.mask);
    return { input: { tensors: [], parameters: JSON.stringify(body) }, context: new Uint8Array() };
  },

  postProcess(context, output) {
    let body = null;
    if (output.metadata !== undefined && output.metadata !== null) {
      try {
        body = JSON.parse(output.metadata);
      } catch (e) {
        throw ProcessorError.internal(`model metadata is not JSON: ${e.message}`);
      }
    }
    return Response.json(redactJson(body, settings.kinds, settings.mask));
  },
});
