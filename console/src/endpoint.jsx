// One endpoint: its plots from the server's metrics history, versions with a weight
// editor, start and stop, scaling events, logs with follow, a try-it panel, and its jobs.
import { useEffect, useRef, useState } from 'preact/hooks';
import { api, get, seg } from './api.js';
import { Chart } from './chart.jsx';
import { JobsPanel } from './jobs.jsx';
import { TryIt } from './tryit.jsx';
import { fmt, Problem, Status, usePoll } from './util.jsx';

const sum = (columns) => columns[0].map((_, i) => columns.reduce((s, c) => s + (c[i] ?? 0), 0));

export function EndpointPage({ base, name }) {
  const path = `${base}/api/v1/endpoints/${seg(name)}`;
  const [detail, error, reload] = usePoll(() => get(path), 2000, [path]);
  const [action, setAction] = useState(null);
  if (!detail) {
    return (
      <section>
        <h1>{name}</h1>
        {error ? <Problem error={error} /> : <p class="hint">Loading…</p>}
      </section>
    );
  }
  const toggle = async () => {
    setAction(null);
    try {
      await api('POST', `${path}/${detail.stopped ? 'start' : 'stop'}`);
      reload();
    } catch (e) {
      setAction(e);
    }
  };
  return (
    <section aria-labelledby="endpoint-title">
      <div class="bar">
        <h1 id="endpoint-title">{detail.name}</h1>
        <Status value={detail.status} />
        <button type="button" onClick={toggle} class={detail.stopped ? '' : 'danger'}>
          {detail.stopped ? 'Start' : 'Stop'}
        </button>
      </div>
      {detail.description ? <p>{detail.description}</p> : null}
      {detail.error ? <p class="problem" role="alert">{detail.error}</p> : null}
      <Problem error={action || error} />
      <Plots path={path} />
      <Versions detail={detail} path={path} onSaved={reload} />
      <div class="columns">
        <TryIt base={base} name={name} url={detail.url} embedded />
        <Events path={path} />
      </div>
      <Logs path={path} />
      <JobsPanel base={base} endpoint={name} canManage />
    </section>
  );
}

const WINDOWS = [
  [300, '5 min'],
  [900, '15 min'],
  [1800, '30 min'],
];

function Plots({ path }) {
  const [window, setWindow] = useState(300);
  const [h, error] = usePoll(() => get(`${path}/metrics?window_s=${window}`), 2000, [path, window]);
  if (!h) return <Problem error={error} />;
  const vs = h.versions;
  const per = (key, suffix = '') => vs.map((v) => ({ label: `${v.version}${suffix}`, values: v[key] }));
  const generation = vs.some((v) => v.ttft_p50_ms.some((x) => x != null));
  return (
    <section aria-labelledby="plots-title" class="plots">
      <div class="bar">
        <h2 id="plots-title">Metrics</h2>
        <fieldset class="segmented">
          <legend class="visually-hidden">Time window</legend>
          {WINDOWS.map(([s, label]) => (
            <label key={s}>
              <input type="radio" name="window" checked={window === s} onChange={() => setWindow(s)} />
              {label}
            </label>
          ))}
        </fieldset>
        <span class="hint">every {h.step_s} s, from this server's memory</span>
      </div>
      <div class="grid">
        <Chart id="plot-requests" title="Requests per second" unit="req/s" t_ms={h.t_ms}
          series={[...per('requests_per_s'), { label: 'errors/s', values: sum(vs.map((v) => v.client_errors.map((c, i) => (c + v.server_errors[i]) / h.step_s))), dash: [4, 4] }]} />
        <Chart id="plot-latency" title="Latency" unit="ms" t_ms={h.t_ms}
          series={vs.flatMap((v) => [
            { label: `${v.version} p50`, values: v.p50_ms, dots: true },
            { label: `${v.version} p90`, values: v.p90_ms, dash: [2, 2], dots: true },
            { label: `${v.version} p99`, values: v.p99_ms, dash: [6, 3], dots: true },
          ])} />
        <Chart id="plot-workers" title="Workers, desired and ready" unit="workers" t_ms={h.t_ms}
          series={[
            { label: 'desired', values: sum(vs.map((v) => v.workers_desired)), dash: [6, 3] },
            { label: 'ready', values: sum(vs.map((v) => v.workers_ready)) },
            { label: 'starting', values: sum(vs.map((v) => v.workers_starting)), dash: [2, 2] },
          ]} />
        <Chart id="plot-queue" title="Waiting requests and jobs" unit="count" t_ms={h.t_ms}
          series={[
            { label: 'waiting requests', values: sum(vs.map((v) => v.waiting)) },
            { label: 'jobs queued', values: h.jobs.queued },
            { label: 'jobs running', values: h.jobs.in_progress, dash: [4, 4] },
          ]} />
        {generation ? (
          <Chart id="plot-generation" title="Time to first token and per output token" unit="ms" t_ms={h.t_ms}
            series={[...per('ttft_p50_ms', ' TTFT p50').map((s) => ({ ...s, dots: true })), ...per('tpot_p50_ms', ' TPOT p50').map((s) => ({ ...s, dash: [4, 4], dots: true }))]} />
        ) : null}
      </div>
    </section>
  );
}

function Versions({ detail, path, onSaved }) {
  const [weights, setWeights] = useState(null);
  const [error, setError] = useState(null);
  const [saved, setSaved] = useState(false);
  const shown = weights || detail.versions.map((v) => v.weight);
  const total = shown.reduce((a, b) => a + (Number(b) || 0), 0);
  const save = async (e) => {
    e.preventDefault();
    setError(null);
    setSaved(false);
    const spec = structuredClone(detail.spec);
    spec.versions.forEach((v, i) => {
      v.weight = Number(shown[i]);
    });
    try {
      await api('PUT', path, spec);
      setWeights(null);
      setSaved(true);
      onSaved();
    } catch (err) {
      setError(err);
    }
  };
  const editable = detail.versions.length > 1;
  return (
    <section aria-labelledby="versions-title">
      <h2 id="versions-title">Versions</h2>
      <form onSubmit={save}>
        <div class="scroll-x">
          <table class="versions-table">
            <thead>
              <tr>
                <th scope="col">Version</th>
                <th scope="col">Status</th>
                <th scope="col">Backend</th>
                <th scope="col">Workers ready/desired</th>
                <th scope="col">Instances idle/busy/queued</th>
                <th scope="col">Weight %</th>
              </tr>
            </thead>
            <tbody>
              {detail.versions.map((v, i) => (
                <tr key={v.name}>
                  <th scope="row">{v.name}</th>
                  <td><Status value={v.status} /></td>
                  <td>{v.backend}</td>
                  <td class="num">
                    {v.workers.filter((w) => w.state === 'ready').length}/{v.desired_workers}
                  </td>
                  <td class="num">
                    {v.instances.idle}/{v.instances.busy}/{v.instances.queued}
                  </td>
                  <td>
                    <input type="number" min="0" max="100" step="1" class="weight" aria-label={`Weight of ${v.name}, percent`}
                      value={shown[i]} disabled={!editable}
                      onInput={(e) => {
                        const next = shown.slice();
                        next[i] = e.currentTarget.value;
                        setWeights(next);
                        setSaved(false);
                      }} />
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        {editable ? (
          <p class="bar">
            <span aria-live="polite" class={total === 100 ? 'hint' : 'warn'}>Weights sum to {total}%{total === 100 ? '' : ' (must be 100)'}</span>
            <button type="submit" disabled={!weights}>Save weights</button>
            {saved ? <span role="status">Saved.</span> : null}
          </p>
        ) : null}
      </form>
      <Problem error={error} />
    </section>
  );
}

function Events({ path }) {
  const [data, error] = usePoll(() => get(`${path}/events?limit=50`), 3000, [path]);
  const events = data ? data.events.slice().reverse() : [];
  return (
    <section aria-labelledby="events-title" class="events">
      <h2 id="events-title">Scaling events</h2>
      <Problem error={error} />
      {events.length === 0 ? <p class="hint">None yet.</p> : null}
      <ol class="feed">
        {events.map((e) => (
          <li key={`${e.at_ms}-${e.version}-${e.to}`}>
            <time dateTime={new Date(e.at_ms).toISOString()}>{fmt.time(e.at_ms)}</time>{' '}
            <strong>{e.version}</strong> {e.from} → {e.to} <span class="tag">{e.trigger}</span>
            <div class="hint">{e.reason}</div>
          </li>
        ))}
      </ol>
    </section>
  );
}

function Logs({ path }) {
  const [follow, setFollow] = useState(true);
  const [data, error] = usePoll(() => get(`${path}/logs?limit=200`), follow ? 1500 : 0, [path, follow]);
  const box = useRef(null);
  const logs = data ? data.logs : [];
  useEffect(() => {
    if (follow && box.current) box.current.scrollTop = box.current.scrollHeight;
  }, [logs.length, follow]);
  return (
    <section aria-labelledby="logs-title">
      <div class="bar">
        <h2 id="logs-title">Logs</h2>
        <label>
          <input type="checkbox" checked={follow} onChange={(e) => setFollow(e.currentTarget.checked)} /> Follow
        </label>
      </div>
      <Problem error={error} />
      <div class="logs" ref={box} tabIndex={0} aria-label="Processor logs" aria-live={follow ? 'polite' : 'off'}>
        {logs.length === 0 ? <p class="hint">No log records.</p> : null}
        {logs.map((l, i) => (
          <div key={i} class={`log log-${l.level}`}>
            <time dateTime={new Date(l.at_ms).toISOString()}>{fmt.time(l.at_ms)}</time> <span class="tag">{l.level}</span>{' '}
            <span class="hint">{l.version}</span> {l.message}
          </div>
        ))}
      </div>
    </section>
  );
}
