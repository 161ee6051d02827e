// Small pieces the pages share: polling, formatting, and the error line.
import { useEffect, useRef, useState } from 'preact/hooks';

/**
 * Calls `load` now and every `ms` while the page is visible; answers
 * `[data, error, reload]`. A failed poll keeps the last data and shows the error.
 */
export function usePoll(load, ms, deps = []) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const tick = useRef(0);
  const run = useRef(null);
  useEffect(() => {
    let live = true;
    let timer = 0;
    const go = async () => {
      const mine = ++tick.current;
      try {
        const value = await load();
        if (live && mine === tick.current) {
          setData(value);
          setError(null);
        }
      } catch (e) {
        if (live) setError(e);
      }
      if (live && ms) timer = setTimeout(go, document.hidden ? ms * 5 : ms);
    };
    run.current = () => {
      clearTimeout(timer);
      go();
    };
    go();
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, deps);
  return [data, error, () => run.current && run.current()];
}

export const fmt = {
  rate: (v) => (v == null ? '–' : v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)),
  ms: (v) => (v == null ? '–' : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : v >= 10 ? `${v.toFixed(0)} ms` : `${v.toFixed(2)} ms`),
  time: (ms) => new Date(ms).toLocaleTimeString(),
  ago: (ms) => {
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
  },
  eta: (s) => (s == null ? '–' : s < 60 ? `${Math.ceil(s)} s` : `${Math.ceil(s / 60)} min`),
};

/** An error from the API, said in a live region so that screen readers hear it. */
export function Problem({ error }) {
  if (!error) return null;
  return (
    <p class="problem" role="alert">
      {error.status ? <strong>{error.status} </strong> : null}
      {error.code ? <code>{error.code}</code> : null} {error.message}
      {error.field ? <span> (field <code>{error.field}</code>)</span> : null}
    </p>
  );
}

/** A status as a coloured word (colour is never the only sign). */
export function Status({ value }) {
  return <span class={`status status-${value}`}>{value}</span>;
}
