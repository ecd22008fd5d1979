// The fieldline console: one page, hash routes, no framework and no build step.
//   #/login            paste an API token (kept in sessionStorage, sent as a Bearer header)
//   #/                 the fleet: every device of the tenant, live presence
//   #/devices/<id>     charts per numeric metric, events, commands
//   #/alerts           the tenant's warning/error/critical events
// Everything is built with DOM calls and textContent (never innerHTML with data), so nothing a
// device sends can become markup, and the strict Content-Security-Policy holds.

import { LineChart, displayUnit, formatValue } from './chart.js';

const TOKEN_KEY = 'fieldline.token';
const TENANT_KEY = 'fieldline.tenant';
const TOKEN_SHAPE = /^flt_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}$/;
const RANGES = [
  ['15m', '15 min'], ['1h', '1 h'], ['6h', '6 h'], ['24h', '24 h'], ['7d', '7 d'],
];
const SENSOR_TYPES = ['temperature', 'humidity'];
const KNOWN_COMMANDS = ['reset', 'set-interval', 'sensor-add', 'sensor-remove'];
const FINAL_STATUSES = new Set(['ok', 'error', 'rejected', 'expired']);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null, // whoami
  tenant: null,
  tenants: [],
  page: null, // AbortController of the page on screen
  range: '1h',
};

// -- small helpers -------------------------------------------------------------------------------

/** Build an element: h('a', {href: '#/', class: 'x', dataset: {testid: 'y'}}, 'text', child). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') el.className = value;
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, '');
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const tid = (id) => ({ testid: id });

function ago(iso) {
  if (!iso) return 'never';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 48 * 3600) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** A span that keeps saying how long ago `iso` was (the ticker below refreshes it). */
function agoSpan(iso, testid) {
  const span = h('span', { class: 'ago', dataset: { ago: iso ?? '', testid } }, ago(iso));
  if (iso) span.title = new Date(iso).toLocaleString();
  return span;
}

setInterval(() => {
  for (const el of document.querySelectorAll('[data-ago]')) el.textContent = ago(el.dataset.ago);
}, 1000);

const dateTime = new Intl.DateTimeFormat(undefined, {
  month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
  hourCycle: 'h23',
});

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/** setInterval that stops with the page. */
function every(ms, signal, fn) {
  const timer = setInterval(fn, ms);
  signal.addEventListener('abort', () => clearInterval(timer), { once: true });
}

function banner(message, kind = 'error') {
  const el = document.getElementById('banner');
  el.textContent = message || '';
  el.dataset.kind = kind;
  el.hidden = !message;
}

function compact(value) {
  const text = JSON.stringify(value ?? {});
  return text === '{}' ? '' : text;
}

// -- the API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = 'GET', body, signal, token = state.token } = {}) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(`/api/v1${path}`, {
      method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(0, 'The console cannot reach the fieldline server; is it running?');
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data?.error ?? `The server answered ${response.status}.`;
    if (response.status === 401 && token === state.token && state.me) sessionEnded(message);
    throw new ApiError(response.status, message);
  }
  return data;
}

const tenantPath = (rest = '') => `/tenants/${encodeURIComponent(state.tenant)}${rest}`;
const devicePath = (id, rest = '') => tenantPath(`/devices/${encodeURIComponent(id)}${rest}`);

function setLive(stateName, title) {
  const el = document.getElementById('live');
  el.dataset.state = stateName;
  el.title = title ?? { on: 'Live updates on', off: 'Reconnecting…', error: 'Live updates failed' }[stateName];
}

/** Read the server-sent events of the tenant's stream with fetch (EventSource cannot send the
 * token header); reconnects with backoff until the page goes away. */
async function openStream(query, handlers, signal) {
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const response = await fetch(`/api/v1${tenantPath('/stream')}${query}`, {
        headers: { Authorization: `Bearer ${state.token}`, Accept: 'text/event-stream' },
        signal, cache: 'no-store',
      });
      if (response.status === 401) {
        const data = await response.json().catch(() => null);
        sessionEnded(data?.error);
        return;
      }
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        setLive('error', data?.error ?? `stream: ${response.status}`);
        if (response.status === 429) delay = 15000;
      } else {
        setLive('on');
        delay = 1000;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, '\n');
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            dispatch(buffer.slice(0, end), handlers);
            buffer = buffer.slice(end + 2);
          }
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    if (signal.aborted) return;
    if (document.getElementById('live').dataset.state === 'on') setLive('off');
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 15000);
  }
}

function dispatch(frame, handlers) {
  let name = 'message';
  const data = [];
  for (const line of frame.split('\n')) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  const handler = handlers[name];
  if (!handler || data.length === 0) return;
  try {
    handler(JSON.parse(data.join('\n')));
  } catch (error) {
    console.error(`stream event ${name}:`, error);
  }
}

// -- session -------------------------------------------------------------------------------------

function sessionEnded(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.me = null;
  state.loginMessage = message ?? 'Your token is no longer accepted; paste a valid one.';
  location.hash = '#/login';
  route();
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(TENANT_KEY);
  state.token = null;
  state.me = null;
  state.tenant = null;
  state.loginMessage = null;
  location.hash = '#/login';
  route();
}

async function signIn(token) {
  const me = await api('/whoami', { token });
  state.token = token;
  state.me = me;
  sessionStorage.setItem(TOKEN_KEY, token);
  if (me.tenant) {
    state.tenants = [me.tenant];
    state.tenant = me.tenant;
  } else {
    const { tenants } = await api('/tenants', { token });
    state.tenants = tenants;
    const saved = sessionStorage.getItem(TENANT_KEY);
    state.tenant = tenants.includes(saved) ? saved : (tenants[0] ?? null);
  }
  renderSession();
}

function renderSession() {
  const signedIn = Boolean(state.me);
  document.getElementById('nav').hidden = !signedIn;
  document.getElementById('session').hidden = !signedIn;
  if (!signedIn) return;
  const me = state.me;
  const who = document.getElementById('who');
  who.replaceChildren(
    h('span', { class: 'who-tenant' }, me.tenant ?? 'all tenants'),
    h('span', { class: `role role-${me.role}`, dataset: tid('role') }, me.role),
  );
  who.title = `token ${me.name ?? ''} (${me.token_id})`;
  const pick = document.getElementById('tenant-pick');
  pick.hidden = me.tenant !== null;
  if (me.tenant === null) {
    const select = document.getElementById('tenant-select');
    select.replaceChildren(...state.tenants.map((t) => h('option', { value: t }, t)));
    select.value = state.tenant ?? '';
  }
}

const canCommand = () => state.me && (state.me.role === 'operator' || state.me.role === 'admin');

// -- router --------------------------------------------------------------------------------------

async function route() {
  state.page?.abort();
  const page = new AbortController();
  state.page = page;
  banner('');
  const view = document.getElementById('view');
  const hash = location.hash.replace(/^#/, '') || '/';

  if (!state.me && state.token) {
    try {
      await signIn(state.token);
    } catch (error) {
      if (page.signal.aborted) return;
      sessionStorage.removeItem(TOKEN_KEY);
      state.token = null;
      state.loginMessage = error.message;
    }
  }
  if (page.signal.aborted) return;
  renderSession();
  if (!state.me) {
    setNav(null);
    loginPage(view);
    return;
  }
  if (!state.tenant) {
    view.replaceChildren(h('section', { class: 'page' }, h('h1', {}, 'No tenants yet'),
      h('p', { class: 'muted' }, 'This admin token sees no tenant: no device has sent anything.')));
    return;
  }
  const device = hash.match(/^\/devices\/([^/?#]+)/);
  try {
    if (device) {
      setNav('fleet');
      await devicePage(view, decodeURIComponent(device[1]), page.signal);
    } else if (hash.startsWith('/alerts')) {
      setNav('alerts');
      await alertsPage(view, page.signal);
    } else {
      setNav('fleet');
      if (hash === '/login') history.replaceState(null, '', '#/');
      await fleetPage(view, page.signal);
    }
  } catch (error) {
    if (error.name === 'AbortError' || page.signal.aborted) return;
    view.replaceChildren(h('section', { class: 'page' },
      h('div', { class: 'card notice', dataset: tid('page-error') },
        h('h2', {}, error.status === 404 ? 'Not found' : 'Something went wrong'),
        h('p', {}, error.message),
        h('p', {}, h('a', { href: '#/' }, 'Back to the fleet')))));
  }
}

function setNav(active) {
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === active) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

// -- login ---------------------------------------------------------------------------------------

function loginPage(view) {
  const error = h('p', { class: 'form-error', role: 'alert', dataset: tid('login-error') });
  error.hidden = !state.loginMessage;
  error.textContent = state.loginMessage ?? '';
  const input = h('input', {
    id: 'token', name: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false',
    required: true, placeholder: 'flt_…', dataset: tid('token-input'),
  });
  const button = h('button', { type: 'submit', class: 'btn btn-primary', dataset: tid('login-submit') },
    'Sign in');
  const form = h('form', { class: 'login-form', novalidate: true },
    h('label', { for: 'token' }, 'API token'), input, error, button);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    error.hidden = true;
    if (!TOKEN_SHAPE.test(token)) {
      error.textContent = 'That is not a fieldline token: it starts with flt_ (create one with '
        + '`fieldline web token create TENANT --role viewer`).';
      error.hidden = false;
      return;
    }
    button.disabled = true;
    try {
      await signIn(token);
      state.loginMessage = null;
      location.hash = '#/';
      if (location.hash === '#/') route();
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
  view.replaceChildren(h('section', { class: 'login', dataset: tid('login-page') },
    h('div', { class: 'card login-card' },
      h('h1', {}, 'Sign in'),
      h('p', { class: 'muted' }, 'Paste an API token. An operator creates one with ',
        h('code', {}, 'fieldline web token create TENANT --role viewer'),
        '; it stays in this browser tab only.'),
      form)));
  input.focus();
}

// -- fleet ---------------------------------------------------------------------------------------

function statusBadge(status, testid = 'device-status') {
  return h('span', { class: `badge status-${status}`, dataset: { testid, status } }, status);
}

function latestChips(latest, units = {}) {
  const names = Object.keys(latest ?? {}).sort();
  if (names.length === 0) return h('span', { class: 'muted' }, '–');
  return h('span', { class: 'chips' }, names.map((name) => h('span', { class: 'chip' },
    h('span', { class: 'chip-name' }, name),
    h('span', { class: 'chip-value' }, formatValue(latest[name].value),
      units[name] ? ` ${units[name]}` : ''))));
}

async function fleetPage(view, signal) {
  let devices = (await api(tenantPath('/devices'), { signal })).devices;
  const search = h('input', {
    id: 'fleet-search', type: 'search', placeholder: 'Filter by device id', autocomplete: 'off',
    dataset: tid('fleet-search'),
  });
  const body = h('tbody');
  const summary = h('div', { class: 'stats', dataset: tid('fleet-summary') });
  const empty = h('p', { class: 'empty', dataset: tid('fleet-empty') });
  const table = h('table', { class: 'table', dataset: tid('fleet-table') },
    h('thead', {}, h('tr', {},
      ['Device', 'Status', 'Last seen', 'Firmware', 'Boot', 'Latest values'].map((c) =>
        h('th', { scope: 'col' }, c)))),
    body);

  const draw = () => {
    const needle = search.value.trim().toLowerCase();
    const shown = devices.filter((d) => d.id.toLowerCase().includes(needle));
    body.replaceChildren(...shown.map((d) => h('tr', { dataset: { testid: 'device-row', device: d.id } },
      h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d.id)}`, class: 'device-link',
        dataset: tid('device-link') }, d.id)),
      h('td', {}, statusBadge(d.status)),
      h('td', {}, agoSpan(d.last_seen, 'device-last-seen')),
      h('td', { class: 'mono' }, d.fw ?? '–'),
      h('td', { class: 'num' }, d.boot ?? '–'),
      h('td', {}, latestChips(d.latest)))));
    const online = devices.filter((d) => d.status === 'online').length;
    summary.replaceChildren(
      stat('Devices', devices.length, 'total'),
      stat('Online', online, 'online'),
      stat('Offline', devices.length - online, 'offline'));
    empty.hidden = shown.length > 0;
    empty.textContent = devices.length === 0
      ? 'No devices yet: they appear here once they connect and send their status.'
      : `No device id contains “${search.value.trim()}”.`;
    table.hidden = shown.length === 0;
  };
  search.addEventListener('input', draw);

  view.replaceChildren(h('section', { class: 'page', dataset: tid('fleet-page') },
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Fleet'),
        h('p', { class: 'muted' }, `Every device of tenant ${state.tenant}, live.`)),
      summary),
    h('div', { class: 'card' },
      h('div', { class: 'card-head' },
        h('label', { for: 'fleet-search', class: 'visually-hidden' }, 'Search devices'),
        search),
      table, empty)));
  draw();

  const reload = async () => {
    try {
      devices = (await api(tenantPath('/devices'), { signal })).devices;
      draw();
    } catch (error) {
      if (!signal.aborted) banner(error.message);
    }
  };
  every(5000, signal, reload); // latest values and last seen (the stream carries presence)
  openStream('', {
    devices: ({ devices: changes }) => {
      let unknown = false;
      for (const change of changes) {
        const d = devices.find((x) => x.id === change.id);
        if (!d) unknown = true;
        else Object.assign(d, { status: change.status, last_seen: change.last_seen });
      }
      if (unknown) reload();
      else draw();
    },
  }, signal);
}

function stat(label, value, kind) {
  return h('div', { class: `stat stat-${kind}`, dataset: { testid: `stat-${kind}` } },
    h('span', { class: 'stat-value' }, value), h('span', { class: 'stat-label' }, label));
}

// -- device --------------------------------------------------------------------------------------

async function devicePage(view, id, signal) {
  const [device, commands, events] = await Promise.all([
    api(devicePath(id), { signal }),
    api(devicePath(id, '/commands?limit=20'), { signal }),
    api(devicePath(id, '/events?since=24h&limit=50'), { signal }),
  ]);
  const info = device.metric_info ?? [];
  const numeric = info.filter((m) => m.kind === 'numeric');
  const others = info.filter((m) => m.kind !== 'numeric');
  const units = Object.fromEntries(info.map((m) => [m.name, displayUnit(m.unit)]));

  // header
  const badgeSlot = h('span', {}, statusBadge(device.status));
  const seenSlot = h('span', {}, agoSpan(device.last_seen, 'device-last-seen'));
  const facts = h('dl', { class: 'facts' },
    fact('Status', badgeSlot), fact('Last seen', seenSlot),
    fact('Firmware', h('span', { class: 'mono' }, device.fw ?? '–')),
    fact('Boot', device.boot ?? '–'),
    fact('First seen', device.first_seen ? dateTime.format(Date.parse(device.first_seen)) : '–'));

  // charts
  const charts = new Map();
  const latestLabels = new Map();
  const chartGrid = h('div', { class: 'charts' });
  numeric.forEach((m, i) => {
    const box = h('div', { class: 'chart-box' });
    const latest = h('span', { class: 'chart-latest', dataset: tid('chart-latest') });
    const value = device.latest?.[m.name];
    if (value) latest.textContent = `${formatValue(value.value)} ${units[m.name]}`.trim();
    latestLabels.set(m.name, latest);
    chartGrid.append(h('figure', { class: 'chart-card', dataset: { testid: 'chart', metric: m.name } },
      h('figcaption', {},
        h('span', { class: 'chart-title' }, title(m),
          m.display_name && m.display_name !== m.name
            ? h('span', { class: 'muted mono small' }, ` ${m.name}`) : null),
        latest),
      box));
    charts.set(m.name, { box, metric: m, index: i });
  });
  if (numeric.length === 0) {
    chartGrid.append(h('p', { class: 'empty' }, 'No numeric metrics yet: charts appear once the '
      + 'device sends telemetry.'));
  }
  if (others.length) {
    chartGrid.append(h('p', { class: 'muted small' }, 'Not charted (not numeric): ',
      others.map((m) => m.name).join(', ')));
  }

  const rangeButtons = RANGES.map(([value, label]) => h('button', {
    type: 'button', class: 'seg', 'aria-pressed': String(value === state.range),
    dataset: { testid: `range-${value}`, range: value },
  }, label));
  const rangePicker = h('div', { class: 'segmented', role: 'group', 'aria-label': 'Time range',
    dataset: tid('range-picker') }, rangeButtons);

  // events
  const eventList = h('ul', { class: 'events', dataset: tid('event-list') });
  const drawEvents = (list) => {
    eventList.replaceChildren(...(list.length ? list.map(eventItem)
      : [h('li', { class: 'empty' }, 'No events in the last 24 h.')]));
  };
  drawEvents(events.events);

  // commands
  const commandList = h('ul', { class: 'commands', dataset: tid('command-list') });
  const known = new Map(); // id -> {command, item}
  const drawCommand = (c) => {
    const old = known.get(c.id);
    // the stream's `ok` can overtake the POST's own `sent` answer: never step back
    if (old && stage(old.command) > stage(c)) return;
    const item = commandItem(c);
    if (old) old.item.replaceWith(item);
    else commandList.prepend(item);
    known.set(c.id, { command: c, item });
    commandList.querySelector('.empty')?.remove();
  };
  for (const c of commands.commands.slice().reverse()) drawCommand(c);
  if (commands.commands.length === 0) {
    commandList.append(h('li', { class: 'empty' }, 'No commands sent to this device yet.'));
  }
  const panel = canCommand()
    ? commandPanel(id, device, drawCommand)
    : h('div', { class: 'card notice', dataset: tid('readonly-note') },
      h('h2', {}, 'Commands'),
      h('p', { class: 'muted' }, `A ${state.me.role} token reads only; sending commands needs an `
        + 'operator token.'));

  view.replaceChildren(h('section', { class: 'page device-page', dataset: { testid: 'device-page', device: id } },
    h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' },
      h('a', { href: '#/' }, 'Fleet'), h('span', { 'aria-hidden': 'true' }, ' / '), id),
    h('div', { class: 'page-head' }, h('h1', { dataset: tid('device-title') }, id), facts),
    h('div', { class: 'device-grid' },
      h('div', { class: 'main-col' },
        h('div', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', {}, 'Telemetry'), rangePicker),
          chartGrid),
        h('div', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', {}, 'Recent events'),
            h('span', { class: 'muted small' }, 'last 24 h')),
          eventList)),
      h('aside', { class: 'side-col' },
        panel,
        h('div', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', {}, 'Sent commands')), commandList)))));

  // the charts need their laid-out width to size the request
  for (const entry of charts.values()) {
    entry.chart = new LineChart(entry.box, {
      metric: entry.metric.name, unit: entry.metric.unit, series: entry.index,
    });
  }
  signal.addEventListener('abort', () => { for (const e of charts.values()) e.chart.destroy(); });

  const load = async () => {
    for (const b of rangeButtons) b.setAttribute('aria-pressed', String(b.dataset.range === state.range));
    await Promise.all([...charts.values()].map(async ({ chart, metric }) => {
      const q = new URLSearchParams({ since: state.range, points: String(chart.pointsWanted()) });
      chart.host.dataset.loading = '1';
      try {
        chart.setData(await api(devicePath(id, `/metrics/${encodeURIComponent(metric.name)}?${q}`),
          { signal }));
      } catch (error) {
        if (!signal.aborted) banner(error.message);
      } finally {
        delete chart.host.dataset.loading;
      }
    }));
  };
  for (const b of rangeButtons) {
    b.addEventListener('click', () => {
      state.range = b.dataset.range;
      load();
    });
  }
  await load();

  every(15000, signal, async () => {
    try {
      drawEvents((await api(devicePath(id, '/events?since=24h&limit=50'), { signal })).events);
    } catch (error) {
      if (!signal.aborted) banner(error.message);
    }
  });
  openStream(`?device=${encodeURIComponent(id)}`, {
    devices: ({ devices }) => {
      const me = devices.find((d) => d.id === id);
      if (!me) return;
      badgeSlot.replaceChildren(statusBadge(me.status));
      seenSlot.replaceChildren(agoSpan(me.last_seen, 'device-last-seen'));
    },
    values: ({ device: which, values }) => {
      if (which !== id) return;
      for (const [name, v] of Object.entries(values)) {
        charts.get(name)?.chart?.append(v.time, v.value);
        const label = latestLabels.get(name);
        if (label && typeof v.value === 'number') {
          label.textContent = `${formatValue(v.value)} ${units[name] ?? ''}`.trim();
        }
      }
      const newest = Object.values(values).map((v) => v.time).sort().pop();
      if (newest) seenSlot.replaceChildren(agoSpan(newest, 'device-last-seen'));
    },
    command: (c) => {
      if (c.device === id) drawCommand(c);
    },
  }, signal);
}

/** A metric's title: its display name, or its id made readable (`oil_temp` → `Oil temp`). */
function title(metric) {
  if (metric.display_name && metric.display_name !== metric.name) return metric.display_name;
  const words = metric.name.replace(/[_-]+/g, ' ');
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function fact(label, value) {
  return h('div', { class: 'fact' }, h('dt', {}, label), h('dd', {}, value));
}

/** An event's body as one line: its message, then its other fields. */
function describe(e) {
  const body = e.body ?? {};
  if (e.kind === 'presence' && body.to) {
    return `${body.from ?? 'unknown'} → ${body.to}${body.cause ? ` (${body.cause})` : ''}`;
  }
  const { message, ...rest } = body;
  const extra = Object.entries(rest).map(([k, v]) =>
    `${k} ${v !== null && typeof v === 'object' ? JSON.stringify(v) : v}`).join(' · ');
  if (message && extra) return `${message} — ${extra}`;
  return message ?? extra;
}

function eventItem(e) {
  const message = describe(e);
  return h('li', { class: 'event', dataset: { testid: 'event-item', severity: e.severity } },
    h('span', { class: `sev sev-${e.severity}` }, e.severity),
    h('span', { class: 'event-kind' }, e.kind),
    h('span', { class: 'event-text', title: message }, message),
    h('time', { datetime: e.time, class: 'muted small' }, dateTime.format(Date.parse(e.time))));
}

/** How far a command has got: pending, sent, then a final status. */
function stage(c) {
  if (FINAL_STATUSES.has(c.status)) return 2;
  return c.status === 'sent' ? 1 : 0;
}

function commandItem(c) {
  const detail = c.result?.detail ?? (typeof c.result === 'string' ? c.result : null);
  const pending = !FINAL_STATUSES.has(c.status);
  return h('li', { class: 'command', dataset: { testid: 'command-item', commandId: c.id, name: c.name } },
    h('div', { class: 'command-line' },
      h('span', { class: 'command-name mono' }, c.name),
      h('span', { class: `badge cmd-${c.status}${pending ? ' pending' : ''}`,
        dataset: { testid: 'command-status', status: c.status } }, c.status)),
    compact(c.args) ? h('code', { class: 'command-args' }, compact(c.args)) : null,
    detail ? h('p', { class: 'command-detail', dataset: tid('command-detail') }, detail) : null,
    h('span', { class: 'muted small' }, 'sent ', agoSpan(c.issued_at, 'command-time')));
}

function commandPanel(id, device, drawCommand) {
  const feedback = h('p', { class: 'cmd-feedback', role: 'status', dataset: tid('cmd-feedback') });
  const say = (text, kind = 'info') => {
    feedback.textContent = text;
    feedback.dataset.kind = kind;
  };
  const send = async (name, args, button) => {
    button.disabled = true;
    say('');
    try {
      const command = await api(devicePath(id, '/commands'), {
        method: 'POST', body: { name, args, ttl_s: 60 },
      });
      drawCommand(command);
      if (command.warning) say(command.warning, 'warning');
    } catch (error) {
      say(error.message, 'error');
    } finally {
      button.disabled = false;
    }
  };

  const reset = h('button', { type: 'button', class: 'btn', dataset: tid('cmd-reset') }, 'Reset');
  reset.addEventListener('click', () => send('reset', {}, reset));

  const interval = h('input', {
    id: 'cmd-interval', type: 'number', min: '0.1', step: '0.1', value: '5', required: true,
    inputmode: 'decimal', dataset: tid('cmd-interval-input'),
  });
  const setInterval_ = h('button', { type: 'button', class: 'btn', dataset: tid('cmd-set-interval') },
    'Set interval');
  setInterval_.addEventListener('click', () => {
    const seconds = Number(interval.value);
    if (!interval.value || !Number.isFinite(seconds) || seconds <= 0) {
      say('The interval is a number of seconds above 0.', 'error');
      return;
    }
    send('set-interval', { interval_s: seconds }, setInterval_);
  });

  const sensor = h('input', {
    id: 'cmd-sensor', type: 'text', placeholder: 'e.g. probe', autocomplete: 'off',
    spellcheck: 'false', dataset: tid('cmd-sensor-name'),
  });
  const sensorType = h('select', { id: 'cmd-sensor-type', dataset: tid('cmd-sensor-type') },
    SENSOR_TYPES.map((t) => h('option', { value: t }, t)));
  const needName = () => {
    if (sensor.value.trim()) return true;
    say('Name the sensor first.', 'error');
    return false;
  };
  const add = h('button', { type: 'button', class: 'btn', dataset: tid('cmd-sensor-add') }, 'Add');
  add.addEventListener('click', () => needName()
    && send('sensor-add', { id: sensor.value.trim(), type: sensorType.value }, add));
  const remove = h('button', { type: 'button', class: 'btn', dataset: tid('cmd-sensor-remove') },
    'Remove');
  remove.addEventListener('click', () => needName()
    && send('sensor-remove', { id: sensor.value.trim() }, remove));

  const declared = Array.isArray(device.commands) ? device.commands : [];
  const names = [...new Set([...KNOWN_COMMANDS, ...declared])];
  const customName = h('input', {
    id: 'cmd-name', type: 'text', list: 'cmd-names', placeholder: 'command name',
    autocomplete: 'off', spellcheck: 'false', dataset: tid('cmd-custom-name'),
  });
  const customArgs = h('textarea', {
    id: 'cmd-args', rows: '2', spellcheck: 'false', placeholder: '{"key": "value"}',
    dataset: tid('cmd-custom-args'),
  });
  const custom = h('button', { type: 'button', class: 'btn', dataset: tid('cmd-custom-send') }, 'Send');
  custom.addEventListener('click', () => {
    const name = customName.value.trim();
    if (!name) {
      say('Give the command a name.', 'error');
      return;
    }
    let args = {};
    if (customArgs.value.trim()) {
      try {
        args = JSON.parse(customArgs.value);
      } catch (error) {
        say(`The arguments are not JSON: ${error.message}`, 'error');
        return;
      }
      if (args === null || typeof args !== 'object' || Array.isArray(args)) {
        say('The arguments are a JSON object, e.g. {"interval_s": 5}.', 'error');
        return;
      }
    }
    send(name, args, custom);
  });

  return h('div', { class: 'card', dataset: tid('command-panel') },
    h('div', { class: 'card-head' }, h('h2', {}, 'Commands')),
    h('div', { class: 'cmd-row' },
      h('div', { class: 'cmd-text' }, h('strong', {}, 'Reset'),
        h('span', { class: 'muted small' }, 'Restart: a new boot, sequence from 1')),
      reset),
    h('div', { class: 'cmd-row' },
      h('label', { for: 'cmd-interval', class: 'cmd-text' }, h('strong', {}, 'Interval'),
        h('span', { class: 'muted small' }, 'Seconds between messages')),
      h('div', { class: 'inline' }, interval, setInterval_)),
    h('div', { class: 'cmd-row cmd-stack' },
      h('label', { for: 'cmd-sensor', class: 'cmd-text' }, h('strong', {}, 'Sensor'),
        h('span', { class: 'muted small' }, 'Add or remove a simulated sensor')),
      h('div', { class: 'inline' }, sensor,
        h('label', { for: 'cmd-sensor-type', class: 'visually-hidden' }, 'Sensor type'), sensorType),
      h('div', { class: 'inline end' }, add, remove)),
    h('details', { class: 'cmd-custom' },
      h('summary', {}, 'Other command'),
      h('label', { for: 'cmd-name' }, 'Name'), customName,
      h('datalist', { id: 'cmd-names' }, names.map((n) => h('option', { value: n }))),
      h('label', { for: 'cmd-args' }, 'Arguments (JSON object)'), customArgs,
      custom),
    feedback);
}

// -- alerts --------------------------------------------------------------------------------------

async function alertsPage(view, signal) {
  const select = h('select', { id: 'alerts-range', dataset: tid('alerts-range') },
    [['1h', 'Last hour'], ['24h', 'Last 24 hours'], ['7d', 'Last 7 days']].map(([v, l]) =>
      h('option', { value: v }, l)));
  select.value = '24h';
  const body = h('tbody');
  const empty = h('p', { class: 'empty', dataset: tid('alerts-empty') });
  const table = h('table', { class: 'table', dataset: tid('alerts-table') },
    h('thead', {}, h('tr', {}, ['Time', 'Device', 'Severity', 'Kind', 'Message'].map((c) =>
      h('th', { scope: 'col' }, c)))), body);
  const load = async () => {
    const { events } = await api(tenantPath(`/alerts?since=${select.value}&limit=200`), { signal });
    body.replaceChildren(...events.map((e) => h('tr', { dataset: { testid: 'alert-row', severity: e.severity } },
      h('td', { class: 'nowrap' }, h('time', { datetime: e.time }, dateTime.format(Date.parse(e.time)))),
      h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(e.device)}` }, e.device)),
      h('td', {}, h('span', { class: `sev sev-${e.severity}` }, e.severity)),
      h('td', { class: 'mono' }, e.kind),
      h('td', {}, describe(e)))));
    table.hidden = events.length === 0;
    empty.hidden = events.length > 0;
    empty.textContent = `No warnings, errors or critical events: ${select.selectedOptions[0].textContent.toLowerCase()}.`;
  };
  select.addEventListener('change', () => load().catch((e) => banner(e.message)));
  view.replaceChildren(h('section', { class: 'page', dataset: tid('alerts-page') },
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Alerts'),
        h('p', { class: 'muted' }, 'Warnings, errors and critical events: the edge rules\' '
          + 'alerts and the devices\' own.'))),
    h('div', { class: 'card' },
      h('div', { class: 'card-head' },
        h('label', { for: 'alerts-range', class: 'visually-hidden' }, 'Time range'), select),
      table, empty)));
  await load();
  every(15000, signal, () => load().catch((e) => { if (!signal.aborted) banner(e.message); }));
}

// -- start ---------------------------------------------------------------------------------------

document.getElementById('logout').addEventListener('click', logout);
document.getElementById('tenant-select').addEventListener('change', (event) => {
  state.tenant = event.target.value;
  sessionStorage.setItem(TENANT_KEY, state.tenant);
  location.hash = '#/';
  route();
});
window.addEventListener('hashchange', route);
route();
