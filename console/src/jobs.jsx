// Jobs and batches: submit, live progress (done/failed/total, rate, ETA), cancel, retry.
import { useState } from 'preact/hooks';
import { api, get, seg } from './api.js';
import { fmt, Problem, usePoll } from './util.jsx';

const ENDED = ['COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT'];

export function JobsPanel({ base, endpoint }) {
  const query = endpoint ? `?endpoint=${seg(endpoint)}&limit=50` : '?limit=50';
  const [jobs, jobsError, reloadJobs] = usePoll(() => get(`${base}/api/v1/jobs${query}`), 2000, [base, query]);
  const [batches, batchesError, reloadBatches] = usePoll(() => get(`${base}/api/v1/batches`), 2000, [base]);
  const [error, setError] = useState(null);
  const act = async (path, reload) => {
    setError(null);
    try {
      await api('POST', path);
      reload();
    } catch (e) {
      setError(e);
    }
  };
  const shownBatches = ((batches && batches.batches) || []).filter((b) => !endpoint || b.endpoint === endpoint);
  const Heading = endpoint ? 'h2' : 'h1';
  return (
    <section aria-labelledby="jobs-title" class="jobs">
      <Heading id="jobs-title">Jobs and batches</Heading>
      {endpoint ? <Submit base={base} endpoint={endpoint} onDone={() => { reloadJobs(); reloadBatches(); }} /> : null}
      <Problem error={error || jobsError || batchesError} />
      <h3>Batches</h3>
      {shownBatches.length === 0 ? <p class="hint">No batches.</p> : null}
      <ul class="batches">
        {shownBatches.map((b) => {
          const settled = b.done + b.failed;
          return (
            <li key={b.id} data-batch={b.id} data-status={b.status}>
              <div class="bar">
                <code>{b.id}</code> <span class="tag">{b.status}</span> {endpoint ? null : <span>{b.endpoint}</span>}
                <span class="progress-figures">
                  {b.done} done, {b.failed} failed of {b.total} · {fmt.rate(b.rate_per_s)}/s · ETA {fmt.eta(b.eta_s)}
                </span>
                {b.status === 'RUNNING' ? (
                  <>
                    <button type="button" class="quiet" onClick={() => act(`${base}/api/v1/batches/${seg(b.id)}/pause`, reloadBatches)}>Pause</button>
                    <button type="button" class="danger" onClick={() => act(`${base}/api/v1/batches/${seg(b.id)}/cancel`, reloadBatches)}>Cancel</button>
                  </>
                ) : null}
                {b.status === 'PAUSED' ? (
                  <button type="button" onClick={() => act(`${base}/api/v1/batches/${seg(b.id)}/resume`, reloadBatches)}>Resume</button>
                ) : null}
                <a href={`${base}${b.output_url}`} download>Output</a>
              </div>
              <progress max={b.total || 1} value={settled} aria-label={`Batch ${b.id}: ${settled} of ${b.total} lines settled`} />
            </li>
          );
        })}
      </ul>
      <h3>Jobs</h3>
      <div class="scroll-x">
        <table class="jobs-table">
          <thead>
            <tr>
              <th scope="col">Job</th>
              {endpoint ? null : <th scope="col">Endpoint</th>}
              <th scope="col">State</th>
              <th scope="col">Submitted</th>
              <th scope="col">Ran</th>
              <th scope="col"><span class="visually-hidden">Actions</span></th>
            </tr>
          </thead>
          <tbody>
            {((jobs && jobs.jobs) || []).map((j) => (
              <tr key={j.id} data-job={j.id} data-status={j.status}>
                <th scope="row"><code>{j.id}</code></th>
                {endpoint ? null : <td>{j.endpoint}</td>}
                <td><span class={`status status-${j.status}`}>{j.status}</span></td>
                <td>{fmt.ago(j.submitted_at_ms)}</td>
                <td class="num">{j.execution_ms ? fmt.ms(j.execution_ms) : '–'}</td>
                <td>
                  {ENDED.includes(j.status) ? null : (
                    <button type="button" class="danger" onClick={() => act(`${base}/endpoints/${seg(j.endpoint)}/cancel/${seg(j.id)}`, reloadJobs)}>Cancel</button>
                  )}
                  {['FAILED', 'CANCELLED', 'TIMED_OUT'].includes(j.status) ? (
                    <button type="button" onClick={() => act(`${base}/endpoints/${seg(j.endpoint)}/retry/${seg(j.id)}`, reloadJobs)}>Retry</button>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {jobs && jobs.jobs.length === 0 ? <p class="hint">No jobs.</p> : null}
    </section>
  );
}

function Submit({ base, endpoint, onDone }) {
  const [kind, setKind] = useState('job');
  const [input, setInput] = useState('{"name": "job"}');
  const [lines, setLines] = useState('{"name": "a"}\n{"name": "b"}\n{"name": "c"}\n');
  const [error, setError] = useState(null);
  const [made, setMade] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    setMade(null);
    try {
      if (kind === 'job') {
        let value;
        try {
          value = JSON.parse(input);
        } catch (err) {
          throw Object.assign(new Error(`the input is not JSON: ${err.message}`), { field: 'input' });
        }
        const job = await api('POST', `${base}/endpoints/${seg(endpoint)}/run`, { input: value });
        setMade(`Job ${job.id} is ${job.status}.`);
      } else {
        const batch = await api('POST', `${base}/api/v1/batches?endpoint=${seg(endpoint)}`, lines, { type: 'application/x-ndjson' });
        setMade(`Batch ${batch.id}: ${batch.total} lines.`);
      }
      onDone();
    } catch (err) {
      setError(err);
    }
  };
  return (
    <form onSubmit={submit} class="submit">
      <fieldset class="segmented">
        <legend class="visually-hidden">Submit</legend>
        <label><input type="radio" name="kind" checked={kind === 'job'} onChange={() => setKind('job')} /> A job</label>
        <label><input type="radio" name="kind" checked={kind === 'batch'} onChange={() => setKind('batch')} /> A batch (JSONL)</label>
      </fieldset>
      {kind === 'job' ? (
        <label>
          Input (JSON, the request body the endpoint gets)
          <textarea rows={3} value={input} spellcheck={false} onInput={(e) => setInput(e.currentTarget.value)} />
        </label>
      ) : (
        <label>
          Lines (one request body per line)
          <textarea rows={4} value={lines} spellcheck={false} onInput={(e) => setLines(e.currentTarget.value)} />
        </label>
      )}
      <button type="submit">Submit</button>
      {made ? <span role="status"> {made}</span> : null}
      <Problem error={error} />
    </form>
  );
}
