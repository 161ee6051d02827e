// wasp's console: log in with an API key, then endpoints, their plots, versions, logs,
// jobs and batches, deploys and a try-it panel, all through the public API with that key
// (so a tenant sees only its own, and an invoker key only what invokers may do).
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { api, get, saveKey, savedKey } from './api.js';
import { EndpointList } from './list.jsx';
import { EndpointPage } from './endpoint.jsx';
import { DeployPage } from './deploy.jsx';
import { JobsPanel } from './jobs.jsx';
import { TryIt } from './tryit.jsx';
import { Problem } from './util.jsx';
import './style.css';

/** The route in the hash: `#/`, `#/endpoints/NAME`, `#/t/TENANT/endpoints/NAME`, `#/deploy`, `#/jobs`, `#/try`. */
function parse(hash) {
  const parts = hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  let base = '';
  if (parts[0] === 't' && parts.length > 2) {
    base = `/t/${encodeURIComponent(parts[1])}`;
    parts.splice(0, 2);
  }
  return { base, page: parts[0] || '', arg: parts[1] || '' };
}

function useRoute() {
  const [route, setRoute] = useState(parse(location.hash));
  useEffect(() => {
    const on = () => {
      setRoute(parse(location.hash));
      const main = document.getElementById('main');
      if (main) main.focus({ preventScroll: true });
    };
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}

function Login({ onIn }) {
  const [key, setKey] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    saveKey(key.trim());
    try {
      onIn(await get('/api/v1/whoami'));
    } catch (err) {
      saveKey('');
      setError(err);
    }
    setBusy(false);
  };
  return (
    <main id="main" tabIndex={-1} class="login">
      <h1>wasp console</h1>
      <form onSubmit={submit} aria-describedby="login-help">
        <label for="key">API key</label>
        <input id="key" name="key" type="password" autocomplete="current-password" required value={key}
          onInput={(e) => setKey(e.currentTarget.value)} />
        <button type="submit" disabled={busy}>Log in</button>
      </form>
      <p id="login-help" class="hint">
        A key from <code>wasp key create</code>, or the operator key in the data directory
        (<code>operator.key</code>) after the first start.
      </p>
      <Problem error={error} />
    </main>
  );
}

function App() {
  const [who, setWho] = useState(null);
  const [checked, setChecked] = useState(!savedKey());
  const route = useRoute();
  useEffect(() => {
    if (!savedKey()) return;
    get('/api/v1/whoami')
      .then(setWho)
      .catch(() => saveKey(''))
      .finally(() => setChecked(true));
  }, []);
  if (!checked) return <p class="hint">Loading…</p>;
  if (!who) return <Login onIn={setWho} />;
  const admin = who.role !== 'invoker';
  const logout = () => {
    saveKey('');
    setWho(null);
  };
  let page;
  if (!admin && route.page !== 'jobs') {
    page = <TryIt base={route.base} name={route.arg} />;
  } else if (route.page === 'endpoints' && route.arg) {
    page = <EndpointPage base={route.base} name={route.arg} key={route.base + route.arg} />;
  } else if (route.page === 'deploy') {
    page = <DeployPage />;
  } else if (route.page === 'jobs') {
    page = <JobsPanel base={route.base} canManage />;
  } else if (route.page === 'try') {
    page = <TryIt base={route.base} name={route.arg} />;
  } else {
    page = <EndpointList canDeploy operator={who.role === 'operator'} />;
  }
  return (
    <>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById('main').focus(); }}>
        Skip to content
      </a>
      <header class="top">
        <a class="brand" href="#/">wasp</a>
        <nav aria-label="Console">
          <ul>
            {admin ? <li><a href="#/" aria-current={route.page === '' ? 'page' : undefined}>Endpoints</a></li> : null}
            {admin ? <li><a href="#/deploy" aria-current={route.page === 'deploy' ? 'page' : undefined}>Deploy</a></li> : null}
            <li><a href="#/jobs" aria-current={route.page === 'jobs' ? 'page' : undefined}>Jobs &amp; batches</a></li>
            <li><a href="#/try" aria-current={route.page === 'try' ? 'page' : undefined}>Try it</a></li>
          </ul>
        </nav>
        <span class="who" data-role={who.role}>
          {who.tenant} · {who.role}
        </span>
        <button type="button" class="quiet" onClick={logout}>Log out</button>
      </header>
      <main id="main" tabIndex={-1}>{page}</main>
    </>
  );
}

render(<App />, document.getElementById('app'));
// For the browser tests and the curious: the API client the console uses.
window.wasp = { api };
