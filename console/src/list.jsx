// The endpoint list: every endpoint the key may see, with its status, versions and
// weights, workers, last minute's rate, p99 and errors, and scaled-to-zero and
// cold-start markers. Only the rows in view are rendered, so a thousand endpoints scroll
// as smoothly as ten.
import { useMemo, useRef, useState, useLayoutEffect } from 'preact/hooks';
import { get } from './api.js';
import { fmt, Problem, Status, usePoll } from './util.jsx';

const ROW = 44;
const OVERSCAN = 8;

const COLUMNS = [
  ['name', 'Endpoint', (e) => e.name],
  ['status', 'Status', (e) => e.status],
  ['versions', 'Versions', (e) => e.versions.length],
  ['workers', 'Workers', (e) => e.workers.ready],
  ['rate', 'req/s', (e) => e.recent.requests_per_s],
  ['p99', 'p99', (e) => e.recent.p99_ms ?? -1],
  ['errors', 'Errors', (e) => e.recent.errors],
];

/** Every endpoint the key sees; an operator's, of every tenant (each row names its tenant). */
async function load(operator) {
  if (!operator) return get('/api/v1/endpoints');
  const { tenants } = await get('/api/v1/tenants');
  const lists = await Promise.all(
    tenants.map(async (t) => {
      const base = t.name === 'default' ? '' : `/t/${encodeURIComponent(t.name)}`;
      const { endpoints } = await get(`${base}/api/v1/endpoints`);
      return endpoints.map((e) => ({ ...e, tenant: t.name, base }));
    }),
  );
  return { endpoints: lists.flat() };
}

export function EndpointList({ canDeploy, operator }) {
  const [data, error] = usePoll(() => load(operator), 2000, [operator]);
  const [filter, setFilter] = useState('');
  const [sort, setSort] = useState(['name', 1]);
  const rows = useMemo(() => {
    const all = (data && data.endpoints) || [];
    const wanted = filter.trim().toLowerCase();
    const shown = wanted
      ? all.filter((e) => e.name.toLowerCase().includes(wanted) || (e.tenant || '').toLowerCase().includes(wanted))
      : all.slice();
    const key = COLUMNS.find((c) => c[0] === sort[0])[2];
    shown.sort((a, b) => {
      const x = key(a);
      const y = key(b);
      return (x < y ? -1 : x > y ? 1 : a.name < b.name ? -1 : 1) * sort[1];
    });
    return shown;
  }, [data, filter, sort]);

  return (
    <section aria-labelledby="list-title">
      <div class="bar">
        <h1 id="list-title">Endpoints</h1>
        <span class="count" aria-live="polite">
          {data ? `${rows.length} of ${data.endpoints.length}` : 'loading…'}
        </span>
        <label class="filter">
          <span>Filter</span>
          <input type="search" value={filter} onInput={(e) => setFilter(e.currentTarget.value)} placeholder="name" />
        </label>
        {canDeploy ? <a class="button" href="#/deploy">Deploy</a> : null}
      </div>
      <Problem error={error} />
      <Rows rows={rows} sort={sort} setSort={setSort} tenants={operator} />
    </section>
  );
}

function Rows({ rows, sort, setSort, tenants }) {
  const scroller = useRef(null);
  const [view, setView] = useState([0, 20]);
  useLayoutEffect(() => {
    const el = scroller.current;
    const update = () => {
      const first = Math.max(0, Math.floor(el.scrollTop / ROW) - OVERSCAN);
      const count = Math.ceil(el.clientHeight / ROW) + 2 * OVERSCAN;
      setView((v) => (v[0] === first && v[1] === count ? v : [first, count]));
    };
    update();
    el.addEventListener('scroll', update, { passive: true });
    window.addEventListener('resize', update);
    return () => {
      el.removeEventListener('scroll', update);
      window.removeEventListener('resize', update);
    };
  }, []);
  const [first, count] = view;
  const shown = rows.slice(first, first + count);
  const after = Math.max(0, rows.length - first - shown.length);
  return (
    <div class="scroller" ref={scroller} tabIndex={0} aria-label="Endpoints, scrollable">
      <table class="endpoints" aria-rowcount={rows.length + 1}>
        <thead>
          <tr>
            {tenants ? <th scope="col">Tenant</th> : null}
            {COLUMNS.map(([key, label]) => {
              const on = sort[0] === key;
              return (
                <th scope="col" key={key} class={key === 'versions' ? 'versions-head' : undefined} aria-sort={on ? (sort[1] > 0 ? 'ascending' : 'descending') : 'none'}>
                  <button type="button" class="sort" onClick={() => setSort([key, on ? -sort[1] : key === 'name' ? 1 : -1])}>
                    {label}
                    <span aria-hidden="true">{on ? (sort[1] > 0 ? ' ▲' : ' ▼') : ''}</span>
                  </button>
                </th>
              );
            })}
          </tr>
        </thead>
        <tbody>
          {first > 0 ? <tr class="spacer" aria-hidden="true" style={{ height: `${first * ROW}px` }} /> : null}
          {shown.map((e, i) => (
            <Row key={`${e.tenant || ''}/${e.name}`} e={e} index={first + i + 2} tenants={tenants} />
          ))}
          {after > 0 ? <tr class="spacer" aria-hidden="true" style={{ height: `${after * ROW}px` }} /> : null}
        </tbody>
      </table>
      {rows.length === 0 ? <p class="empty">No endpoints yet.</p> : null}
    </div>
  );
}

function Row({ e, index, tenants }) {
  const r = e.recent;
  const prefix = e.base ? `#/t/${encodeURIComponent(e.tenant)}` : '#';
  return (
    <tr aria-rowindex={index} data-endpoint={e.name}>
      {tenants ? <td>{e.tenant}</td> : null}
      <th scope="row">
        <a href={`${prefix}/endpoints/${encodeURIComponent(e.name)}`}>{e.name}</a>
      </th>
      <td>
        <Status value={e.status} />
        {e.scaled_to_zero ? <span class="marker" title="No worker runs; the next request starts one">scaled to zero</span> : null}
      </td>
      <td class="versions">{e.versions.map((v) => `${v.name} ${v.weight}%`).join(' · ')}</td>
      <td class="num">
        {e.workers.ready}/{e.workers.desired}
      </td>
      <td class="num">{fmt.rate(r.requests_per_s)}</td>
      <td class="num">{fmt.ms(r.p99_ms)}</td>
      <td class="num">
        {r.errors}
        {r.cold_starts ? <span class="marker cold" title="Requests that waited for a worker to start, last minute">{r.cold_starts} cold</span> : null}
      </td>
    </tr>
  );
}
