// The try-it panel: invokes an endpoint (any method, path and body) or streams an OpenAI
// chat completion from it, and shows the answer, its status and its latency.
import { useState } from 'preact/hooks';
import { api, seg } from './api.js';

export function TryIt({ base, name: given, url, embedded }) {
  const [name, setName] = useState(given || '');
  const [mode, setMode] = useState('invoke');
  const [method, setMethod] = useState('POST');
  const [path, setPath] = useState('');
  const [body, setBody] = useState('{"name": "wasp"}');
  const [prompt, setPrompt] = useState('Say hello in five words.');
  const [answer, setAnswer] = useState(null);
  const [busy, setBusy] = useState(false);
  const Heading = embedded ? 'h2' : 'h1';

  const send = async (e) => {
    e.preventDefault();
    setBusy(true);
    setAnswer(null);
    const started = performance.now();
    try {
      if (mode === 'chat') {
        await chat(started);
      } else {
        const target = `${url || `${base}/endpoints/${seg(name)}/invoke`}${path ? `/${path.replace(/^\//, '')}` : ''}`;
        const withBody = method !== 'GET' && method !== 'DELETE';
        const response = await api(method, target, withBody ? body : undefined, {
          raw: true,
          type: body.trim().startsWith('{') || body.trim().startsWith('[') ? 'application/json' : 'text/plain',
        });
        const text = await response.text();
        setAnswer({
          status: response.status,
          ms: performance.now() - started,
          version: response.headers.get('x-wasp-version'),
          body: pretty(text),
        });
      }
    } catch (err) {
      setAnswer({ status: 0, ms: performance.now() - started, body: String(err.message || err) });
    }
    setBusy(false);
  };

  const chat = async (started) => {
    const response = await api(
      'POST',
      `${base}/v1/chat/completions`,
      { model: name, stream: true, messages: [{ role: 'user', content: prompt }] },
      { raw: true },
    );
    if (!response.ok || !response.body) {
      setAnswer({ status: response.status, ms: performance.now() - started, body: pretty(await response.text()) });
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let text = '';
    let first = null;
    let pending = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      const events = pending.split('\n\n');
      pending = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: ?/, '').trim();
        if (!data || data === '[DONE]') continue;
        try {
          const delta = JSON.parse(data).choices?.[0]?.delta?.content || '';
          if (delta && first == null) first = performance.now() - started;
          text += delta;
        } catch {
          text += data;
        }
      }
      setAnswer({ status: response.status, ms: performance.now() - started, ttft: first, body: text, streaming: true });
    }
    setAnswer({ status: response.status, ms: performance.now() - started, ttft: first, body: text });
  };

  return (
    <section aria-labelledby="try-title" class="tryit">
      <Heading id="try-title">Try it</Heading>
      <form onSubmit={send}>
        {given ? null : (
          <label>
            Endpoint
            <input required value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </label>
        )}
        <fieldset class="segmented">
          <legend class="visually-hidden">What to send</legend>
          <label><input type="radio" name="mode" checked={mode === 'invoke'} onChange={() => setMode('invoke')} /> Invoke</label>
          <label><input type="radio" name="mode" checked={mode === 'chat'} onChange={() => setMode('chat')} /> Chat (streamed)</label>
        </fieldset>
        {mode === 'invoke' ? (
          <>
            <div class="row">
              <label>
                Method
                <select value={method} onChange={(e) => setMethod(e.currentTarget.value)}>
                  {['POST', 'GET', 'PUT', 'PATCH', 'DELETE'].map((m) => <option key={m}>{m}</option>)}
                </select>
              </label>
              <label class="grow">
                Path below the invoke route
                <input value={path} placeholder="/" onInput={(e) => setPath(e.currentTarget.value)} />
              </label>
            </div>
            <label>
              Body
              <textarea rows={4} value={body} onInput={(e) => setBody(e.currentTarget.value)} spellcheck={false} />
            </label>
          </>
        ) : (
          <label>
            Message
            <textarea rows={3} value={prompt} onInput={(e) => setPrompt(e.currentTarget.value)} />
          </label>
        )}
        <button type="submit" disabled={busy || !name}>{busy ? 'Sending…' : 'Send'}</button>
      </form>
      {answer ? (
        <div class="answer" role="status" aria-live="polite">
          <p>
            <span class={`code code-${String(answer.status)[0]}`}>{answer.status || 'failed'}</span>{' '}
            <span class="latency">{answer.ms.toFixed(1)} ms</span>
            {answer.ttft != null ? <span> · first token {answer.ttft.toFixed(0)} ms</span> : null}
            {answer.version ? <span> · version {answer.version}</span> : null}
            {answer.streaming ? <span> · streaming…</span> : null}
          </p>
          <pre class="body">{answer.body}</pre>
        </div>
      ) : null}
    </section>
  );
}

function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}
