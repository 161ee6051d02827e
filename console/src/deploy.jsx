// Deploy from a TOML or JSON spec, with a component uploaded from a file; an error that
// names a field is shown at that field's line in the spec.
import { useRef, useState } from 'preact/hooks';
import { api, seg } from './api.js';
import { Problem } from './util.jsx';

const TEMPLATE = `name = "hello"
description = "My first endpoint"

[[versions]]
name = "v1"
processor = { component = "COMPONENT" }

[versions.scaling]
min_workers = 1
max_workers = 4
`;

/** The 1-based line of `text` that holds `field` (`versions[1].scaling.max_workers`), if found. */
export function lineOf(text, field) {
  if (!field) return 0;
  const lines = text.split('\n');
  const parts = field.split('.');
  let from = 0;
  let key = '';
  for (const part of parts) {
    const m = part.match(/^([A-Za-z0-9_]+)(?:\[(\d+)?\])?$/);
    if (!m) continue;
    key = m[1];
    if (m[2] !== undefined) {
      // The n-th [[key]] table (TOML) or the n-th object after "key": (JSON).
      const n = Number(m[2]);
      let seen = -1;
      for (let i = from; i < lines.length; i++) {
        if (new RegExp(`^\\s*\\[\\[\\s*${key}\\s*\\]\\]`).test(lines[i])) {
          seen += 1;
          if (seen === n) {
            from = i;
            break;
          }
        }
      }
    }
  }
  const pattern = new RegExp(`^\\s*(?:\\[+\\s*(?:[A-Za-z0-9_]+\\.)*)?"?${key}"?\\s*[=:\\]]`);
  for (let i = from; i < lines.length; i++) if (pattern.test(lines[i])) return i + 1;
  return from ? from + 1 : 0;
}

export function DeployPage() {
  const [text, setText] = useState(TEMPLATE);
  const [replace, setReplace] = useState(false);
  const [error, setError] = useState(null);
  const [line, setLine] = useState(0);
  const [done, setDone] = useState(null);
  const [upload, setUpload] = useState(null);
  const area = useRef(null);

  const goTo = (n) => {
    const el = area.current;
    if (!el || !n) return;
    const lines = el.value.split('\n');
    const start = lines.slice(0, n - 1).reduce((s, l) => s + l.length + 1, 0);
    el.focus();
    el.setSelectionRange(start, start + lines[n - 1].length);
  };

  const deploy = async (e) => {
    e.preventDefault();
    setError(null);
    setLine(0);
    setDone(null);
    const json = text.trimStart().startsWith('{');
    let name = '';
    try {
      name = json ? JSON.parse(text).name : (text.match(/^\s*name\s*=\s*"([^"]*)"/m) || [])[1];
    } catch {
      name = '';
    }
    try {
      const type = json ? 'application/json' : 'application/toml';
      const made = replace && name
        ? await api('PUT', `/api/v1/endpoints/${seg(name)}`, text, { type })
        : await api('POST', '/api/v1/endpoints', text, { type });
      setDone(made);
    } catch (err) {
      setError(err);
      const at = lineOf(text, err.field) || Number((err.message.match(/line (\d+)/) || [])[1] || 0);
      setLine(at);
      setTimeout(() => goTo(at), 0);
    }
  };

  const pick = async (e) => {
    const file = e.currentTarget.files[0];
    if (!file) return;
    setUpload({ busy: true });
    try {
      const made = await api('PUT', '/api/v1/components', file, { type: 'application/wasm' });
      setUpload(made);
      setText((t) => t.replace(/"(COMPONENT|sha256:[0-9a-f]*)"/, `"${made.digest}"`));
    } catch (err) {
      setUpload({ error: err });
    }
  };

  return (
    <section aria-labelledby="deploy-title">
      <h1 id="deploy-title">Deploy an endpoint</h1>
      <form onSubmit={deploy} class="deploy">
        <label>
          Component (.wasm), uploaded and put into the spec
          <input type="file" accept=".wasm,application/wasm" onChange={pick} />
        </label>
        {upload && upload.digest ? <p role="status">Uploaded <code>{upload.digest}</code> ({upload.size} bytes).</p> : null}
        {upload && upload.busy ? <p role="status">Uploading…</p> : null}
        {upload && upload.error ? <Problem error={upload.error} /> : null}
        <label for="spec">Spec (TOML, or JSON)</label>
        <textarea id="spec" ref={area} rows={18} spellcheck={false} value={text} aria-invalid={error ? 'true' : undefined}
          aria-describedby={error ? 'spec-error' : undefined} onInput={(e) => setText(e.currentTarget.value)} />
        {error ? (
          <div id="spec-error" class="field-error" role="alert">
            {line ? (
              <button type="button" class="quiet" onClick={() => goTo(line)}>
                line {line}
              </button>
            ) : null}{' '}
            {error.field ? <code>{error.field}</code> : null} {error.message}
            <span class="hint"> ({error.status} {error.code})</span>
          </div>
        ) : null}
        <label class="inline">
          <input type="checkbox" checked={replace} onChange={(e) => setReplace(e.currentTarget.checked)} /> Replace the endpoint if it exists
        </label>
        <button type="submit">Deploy</button>
      </form>
      {done ? (
        <p role="status" class="ok">
          Deployed <a href={`#/endpoints/${encodeURIComponent(done.name)}`}>{done.name}</a> ({done.status}).
        </p>
      ) : null}
    </section>
  );
}
