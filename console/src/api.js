// The console's only way to the server: the public API, with the user's key.

const KEY = 'wasp.key';

/** The key the user logged in with (kept for this browser tab's session). */
export function savedKey() {
  return sessionStorage.getItem(KEY) || '';
}

export function saveKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

/** An answer that was not 2xx: the API's error object, with the status. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || '';
    this.field = e.field || '';
  }
}

/**
 * Calls the API. `body` is sent as is when it is a string, a Blob or a File, and as JSON
 * otherwise. Answers the parsed JSON (or text), and throws ApiError on a non-2xx answer.
 */
export async function api(method, path, body, { type, raw, signal } = {}) {
  const headers = {};
  const key = savedKey();
  if (key) headers.authorization = `Bearer ${key}`;
  let payload = body;
  if (body !== undefined && typeof body !== 'string' && !(body instanceof Blob)) {
    payload = JSON.stringify(body);
    headers['content-type'] = 'application/json';
  } else if (type) {
    headers['content-type'] = type;
  }
  const response = await fetch(path, { method, headers, body: payload, signal });
  if (raw) return response;
  const text = await response.text();
  let parsed = text;
  if ((response.headers.get('content-type') || '').includes('json') && text) {
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = text;
    }
  }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

export const get = (path, options) => api('GET', path, undefined, options);

/** `name` as one path segment. */
export const seg = (name) => encodeURIComponent(name);
