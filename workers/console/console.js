// The operators' console: one page over the JSON admin routes (API.md, "Operators").
//
// No framework and no build step: the DOM is built with `h()` (text always goes in as
// text nodes, never as HTML), pages are hash routes (#/calls/<id>), and the admin's
// token lives in sessionStorage and travels only in the Authorization header — never in
// a URL. The Worker serves this file with a CSP that forbids inline code and any other
// origin.
'use strict';

(() => {
  const TOKEN_KEY = 'cmb.console.token';
  const WHO_KEY = 'cmb.console.who';
  const REQUEST_TIMEOUT_MS = 15000;
  const LIVE_REFRESH_MS = 5000;
  const PAGE_SIZE = 50;
  const LIVE_STATUSES = ['queued', 'ringing', 'in_progress'];
  const STATUSES = ['scheduled', 'queued', 'ringing', 'in_progress', 'completed', 'busy',
    'no_answer', 'failed', 'canceled'];
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);
  let refreshTimer = null;
  let renderSeq = 0;
  let liveAuto = true;

  // ---- DOM ----

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k === 'className' ? 'class' : k, v === true ? '' : String(v));
    }
  }

  function appendAll(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
  }

  function link(href, text) {
    return h('a', { href }, text);
  }

  function setStatus(text, kind) {
    const el = $('status');
    el.textContent = text || '';
    el.dataset.kind = kind || 'info';
  }

  // ---- formatting (UTC, so every operator reads the same times) ----

  function when(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  function clock(d) {
    return d.toISOString().slice(11, 19) + 'Z';
  }

  function seconds(n) {
    if (n === null || n === undefined) return '—';
    const m = Math.floor(n / 60);
    return m ? `${m}m ${String(n % 60).padStart(2, '0')}s` : `${n}s`;
  }

  // Dollars to four places, rounded half up in integers (no binary-float ties).
  function usdMicros(n) {
    if (n === null || n === undefined) return '—';
    const sign = n < 0 ? '−' : '';
    const t = Math.round(Math.abs(n) / 100);
    return `${sign}$${Math.floor(t / 10000)}.${String(t % 10000).padStart(4, '0')}`;
  }

  function usdCents(n) {
    if (n === null || n === undefined) return '—';
    const sign = n < 0 ? '−' : '';
    return `${sign}$${(Math.abs(n) / 100).toFixed(2)}`;
  }

  function quantity(n) {
    return Number.isInteger(n) ? String(n) : String(Number(n.toPrecision(4)));
  }

  function ms(n) {
    return n === null || n === undefined ? '—' : `${Math.round(n)} ms`;
  }

  function dash(v) {
    return v === null || v === undefined || v === '' ? '—' : String(v);
  }

  function badge(text, kind) {
    return h('span', { class: `badge ${kind || text}` }, text);
  }

  function utcDay(d) {
    return d.toISOString().slice(0, 10);
  }

  // ---- the API ----

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // `token`: the session's when left out; `null` sends none.
  async function api(path, { method = 'GET', body, headers = {}, token } = {}) {
    const bearer = token === undefined ? sessionStorage.getItem(TOKEN_KEY) : token;
    const sent = { accept: 'application/json', ...headers };
    if (bearer) sent.authorization = `Bearer ${bearer}`;
    if (body !== undefined) sent['content-type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(path, {
        method,
        headers: sent,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: 'omit',
        cache: 'no-store',
        signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      });
    } catch (e) {
      throw new ApiError(0, 'unreachable', `${method} ${path}: ${e.message}`);
    }
    let data = null;
    try {
      data = await resp.json();
    } catch {
      // Not JSON: the status says what happened.
    }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      if (resp.status === 401 && token === undefined) signOut('Your session has ended: sign in again.');
      throw new ApiError(resp.status, err.code || `http_${resp.status}`,
        err.message || `${method} ${path} answered ${resp.status}.`);
    }
    return data;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
    }
    const text = q.toString();
    return text ? `?${text}` : '';
  }

  const id = encodeURIComponent;

  // ---- signing in and out ----

  async function signIn(ev) {
    ev.preventDefault();
    const form = ev.target;
    const email = form.email.value.trim();
    const password = form.password.value;
    form.querySelector('button').disabled = true;
    setStatus('Signing in…');
    try {
      const data = await api('/api/auth/login', { method: 'POST', body: { email, password }, token: null });
      if (!data.user || data.user.role !== 'admin') {
        // Not ours to keep: end that session at once.
        await api('/api/auth/logout', { method: 'POST', token: data.token }).catch(() => {});
        setStatus('This account is not an admin: the console is for operators.', 'error');
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, data.token);
      sessionStorage.setItem(WHO_KEY, data.user.email);
      form.password.value = '';
      setStatus(`Signed in as ${data.user.email}.`);
      if (!location.hash || location.hash === '#/') location.hash = '#/live';
      else render();
    } catch (e) {
      setStatus(e.status === 401 ? 'Wrong email or password.' : e.message, 'error');
    } finally {
      form.querySelector('button').disabled = false;
    }
  }

  function signOut(message) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(WHO_KEY);
    if (token && !message) {
      api('/api/auth/logout', { method: 'POST', token }).catch(() => {});
    }
    setStatus(message || 'Signed out.');
    render();
  }

  // ---- routing ----

  function currentRoute() {
    const [path, qs] = location.hash.replace(/^#/, '').split('?');
    return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(qs || '') };
  }

  function go(path, params) {
    location.hash = `#${path}${query(params || {})}`;
  }

  const VIEWS = {
    live: viewLive,
    calls: (rest, params) => (rest[0] ? viewCall(rest[0]) : viewCalls(params)),
    users: (rest, params) => (rest[0] ? viewUser(rest[0]) : viewUsers(params)),
    analytics: (rest, params) => viewAnalytics(params),
    events: (rest, params) => viewEvents(params),
  };

  async function render() {
    clearTimeout(refreshTimer);
    refreshTimer = null;
    const signedIn = Boolean(sessionStorage.getItem(TOKEN_KEY));
    const page = $('page');
    $('signin').hidden = signedIn;
    $('nav').hidden = !signedIn;
    $('signout').hidden = !signedIn;
    $('who').textContent = signedIn ? sessionStorage.getItem(WHO_KEY) || '' : '';
    if (!signedIn) {
      renderSeq += 1;
      page.replaceChildren();
      page.removeAttribute('data-view');
      document.title = 'Sign in · Call Me Back console';
      $('signin-email').focus();
      return;
    }
    const { parts, params } = currentRoute();
    const view = VIEWS[parts[0]];
    if (!view) {
      location.replace('#/live');
      return;
    }
    for (const a of $('nav').querySelectorAll('a')) {
      if (a.getAttribute('href') === `#/${parts[0]}`) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const seq = ++renderSeq;
    page.setAttribute('aria-busy', 'true');
    let nodes;
    try {
      nodes = await view(parts.slice(1), params);
    } catch (e) {
      nodes = [h('h1', {}, 'Something went wrong'), h('p', { class: 'error', role: 'alert' }, e.message)];
      if (e.status === 403) nodes.push(h('p', {}, 'This account is no longer an admin.'));
    }
    if (seq !== renderSeq) return; // A later render owns the page.
    page.replaceChildren(...nodes);
    page.dataset.view = parts.length > 1 ? `${parts[0]}-detail` : parts[0];
    page.dataset.route = location.hash;
    page.setAttribute('aria-busy', 'false');
    const title = page.querySelector('h1');
    document.title = `${title ? title.textContent : 'Console'} · Call Me Back console`;
    if (parts[0] === 'live' && liveAuto) {
      // No requests while the tab is hidden; the next tick after it shows refreshes.
      const tick = () => {
        if (seq !== renderSeq) return;
        if (document.hidden) refreshTimer = setTimeout(tick, LIVE_REFRESH_MS);
        else render();
      };
      refreshTimer = setTimeout(tick, LIVE_REFRESH_MS);
    }
  }

  // ---- tables ----

  // `columns`: [header, row => cell]; rows carry `data-id` so a test can find them.
  function table(name, caption, columns, rows, key) {
    if (!rows.length) return h('p', { class: 'muted', 'data-empty': name }, `No ${caption.toLowerCase()}.`);
    return h('table', { 'data-table': name },
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, columns.map(([head]) => h('th', { scope: 'col' }, head)))),
      h('tbody', {}, rows.map((row) => h('tr', { 'data-id': key ? key(row) : undefined },
        columns.map(([, cell]) => h('td', {}, cell(row)))))));
  }

  function details(pairs) {
    return h('dl', { class: 'facts' }, pairs.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
  }

  function pager(path, params, total) {
    const offset = Number(params.get('offset') || 0);
    const rest = Object.fromEntries(params);
    const shown = Math.min(total, offset + PAGE_SIZE);
    return h('nav', { class: 'pager', 'aria-label': 'Pages' },
      h('span', {}, total ? `${offset + 1}–${shown} of ${total}` : '0 of 0'),
      h('button', { type: 'button', disabled: offset === 0,
        onclick: () => go(path, { ...rest, offset: Math.max(0, offset - PAGE_SIZE) || '' }) }, 'Previous'),
      h('button', { type: 'button', disabled: shown >= total,
        onclick: () => go(path, { ...rest, offset: offset + PAGE_SIZE }) }, 'Next'));
  }

  // A filter form whose fields become the hash's query.
  function filters(path, fields) {
    const form = h('form', { class: 'filters', role: 'search',
      onsubmit: (ev) => {
        ev.preventDefault();
        const values = {};
        for (const [name] of fields) values[name] = form.elements[name].value.trim();
        go(path, values);
      } },
    fields.map(([name, label, control]) => h('label', {}, h('span', {}, label), control)),
    h('button', { type: 'submit' }, 'Apply'));
    return form;
  }

  function input(name, value, attrs) {
    return h('input', { name, value: value || '', ...attrs });
  }

  function select(name, value, options) {
    return h('select', { name }, options.map(([v, text]) => h('option', { value: v, selected: v === value }, text)));
  }

  function callColumns() {
    return [
      ['Call', (c) => link(`#/calls/${id(c.id)}`, c.id.slice(0, 8))],
      ['User', (c) => (c.user_id ? link(`#/users/${id(c.user_id)}`, c.user_email || c.user_id.slice(0, 8)) : '—')],
      ['Persona', (c) => dash(c.persona_id)],
      ['Number', (c) => dash(c.phone_number)],
      ['Status', (c) => badge(c.status)],
      ['Started', (c) => when(c.started_at || c.scheduled_time)],
      ['Duration', (c) => seconds(c.duration_seconds)],
      ['Credits', (c) => dash(c.cost_cents)],
    ];
  }

  // ---- pages ----

  async function viewLive() {
    const lists = await Promise.all(LIVE_STATUSES.map((status) => api(`/admin/calls${query({ status, limit: 100 })}`)));
    const calls = lists.flatMap((l) => l.calls);
    const toggle = h('label', { class: 'inline' },
      h('input', { type: 'checkbox', checked: liveAuto,
        onchange: (ev) => { liveAuto = ev.target.checked; render(); } }),
      ` Refresh every ${LIVE_REFRESH_MS / 1000} s`);
    return [
      h('h1', {}, 'Live calls'),
      h('p', { class: 'muted' }, `${calls.length} queued, ringing or in progress · updated ${clock(new Date())} · `, toggle),
      table('live', 'Live calls', callColumns(), calls, (c) => c.id),
    ];
  }

  async function viewCalls(params) {
    const status = params.get('status') || '';
    const userId = params.get('user_id') || '';
    const data = await api(`/admin/calls${query({ status, user_id: userId, limit: PAGE_SIZE, offset: params.get('offset') })}`);
    return [
      h('h1', {}, 'Calls'),
      filters('/calls', [
        ['status', 'Status', select('status', status, [['', 'Any'], ...STATUSES.map((x) => [x, x])])],
        ['user_id', 'User id', input('user_id', userId, { size: 36 })],
      ]),
      table('calls', 'Calls', callColumns(), data.calls, (c) => c.id),
      pager('/calls', params, data.total),
    ];
  }

  async function viewCall(callId) {
    const [d, ev] = await Promise.all([
      api(`/admin/calls/${id(callId)}`),
      api(`/admin/events${query({ call_id: callId, limit: 100 })}`),
    ]);
    const c = d.call;
    const costs = d.costs || {};
    return [
      h('h1', {}, `Call ${c.id.slice(0, 8)}`),
      details([
        ['Id', c.id],
        ['Status', badge(c.status)],
        ['Why', dash(c.status_reason)],
        ['User', c.user_id ? link(`#/users/${id(c.user_id)}`, c.user_email || c.user_id) : '—'],
        ['Persona', dash(c.persona_id)],
        ['Number', dash(c.phone_number)],
        ['Scheduled', when(c.scheduled_time)],
        ['Started', when(c.started_at)],
        ['Ended', when(c.ended_at)],
        ['Duration', seconds(c.duration_seconds)],
        ['Credits charged', dash(c.cost_cents)],
      ]),
      h('h2', {}, 'Transcript'),
      d.transcript.length
        ? h('ol', { class: 'transcript', 'data-list': 'transcript' }, d.transcript.map((t) => h('li', { class: t.role },
          h('span', { class: 'who' }, t.role === 'assistant' ? 'Persona' : t.role === 'user' ? 'Caller' : t.role),
          h('span', { class: 'when' }, when(t.at)),
          h('span', { class: 'text' }, t.text),
          t.interrupted ? h('span', { class: 'badge warn' }, 'interrupted') : null)))
        : h('p', { class: 'muted', 'data-empty': 'transcript' }, 'No transcript.'),
      h('h2', {}, 'Latency per turn'),
      d.latencies.length
        ? barChart({
          name: 'latency',
          title: 'End of the caller’s turn to the persona’s first audio, and the LLM’s first token, per turn',
          labels: d.latencies.map((l) => `turn ${l.turn}`),
          series: [
            { name: 'End of turn → first audio', values: d.latencies.map((l) => l.end_of_turn_to_first_audio_ms), cls: 'a' },
            { name: 'LLM first token', values: d.latencies.map((l) => l.llm_first_token_ms), cls: 'b' },
          ],
          format: ms,
        })
        : h('p', { class: 'muted', 'data-empty': 'latency' }, 'No turns measured.'),
      h('h2', {}, 'Cost'),
      table('costs', 'Provider costs', [
        ['Provider', (p) => p.provider],
        ['Quantity', (p) => `${quantity(p.quantity)} ${p.unit || ''}`.trim()],
        ['Cost', (p) => usdMicros(p.cost_micros)],
      ], costs.providers || [], (p) => p.provider),
      details([
        ['Provider cost', usdMicros(costs.total_cost_micros)],
        ['Revenue', usdMicros(costs.revenue_micros)],
        ['Margin', usdMicros(costs.margin_micros)],
      ]),
      h('h2', {}, 'Events'),
      eventsTable(ev.events),
      h('h2', {}, 'Ledger'),
      ledgerTable(d.ledger || []),
    ];
  }

  function ledgerTable(rows) {
    return table('ledger', 'Ledger entries', [
      ['When', (l) => when(l.created_at)],
      ['Kind', (l) => l.kind],
      ['Amount', (l) => (l.amount > 0 ? `+${l.amount}` : String(l.amount))],
      ['Reason', (l) => dash(l.reason)],
    ], rows, (l) => l.id);
  }

  async function viewUsers(params) {
    const q = params.get('q') || '';
    const data = await api(`/admin/users${query({ q, limit: PAGE_SIZE, offset: params.get('offset') })}`);
    return [
      h('h1', {}, 'Users'),
      filters('/users', [['q', 'Email, name or number', input('q', q, { type: 'search', size: 30, maxlength: 48 })]]),
      table('users', 'Users', [
        ['Email', (u) => link(`#/users/${id(u.id)}`, u.email || '(erased)')],
        ['Name', (u) => dash(u.name)],
        ['Number', (u) => dash(u.phone_number)],
        ['Role', (u) => u.role],
        ['Credits', (u) => String(u.credits)],
        ['Debt', (u) => String(u.debt)],
        ['State', (u) => (u.is_banned ? badge('banned', 'error') : u.erased_at ? badge('erased', 'muted') : badge('active', 'ok'))],
        ['Joined', (u) => when(u.created_at)],
      ], data.users, (u) => u.id),
      pager('/users', params, data.total),
    ];
  }

  async function viewUser(userId) {
    const [d, audit, calls] = await Promise.all([
      api(`/admin/users/${id(userId)}`),
      api(`/admin/audit${query({ target_id: userId, limit: 50 })}`),
      api(`/admin/calls${query({ user_id: userId, limit: 20 })}`),
    ]);
    const u = d.user;
    return [
      h('h1', {}, u.email || 'Erased user'),
      details([
        ['Id', u.id],
        ['Name', dash(u.name)],
        ['Number', dash(u.phone_number)],
        ['Role', u.role],
        ['Tier', dash(u.tier)],
        ['Credits', h('span', { 'data-field': 'credits' }, String(u.credits))],
        ['Debt', String(u.debt)],
        ['State', h('span', { 'data-field': 'state' }, u.is_banned ? 'banned' : u.erased_at ? 'erased' : 'active')],
        ['Joined', when(u.created_at)],
      ]),
      h('h2', {}, 'Actions'),
      h('div', { class: 'actions' }, banForm(u), creditsForm(u)),
      h('h2', {}, 'Recent calls'),
      table('user-calls', 'Recent calls', callColumns(), calls.calls, (c) => c.id),
      h('h2', {}, 'Audit'),
      table('audit', 'Admin actions on this user', [
        ['When', (a) => when(a.at)],
        ['Action', (a) => a.action],
        ['By', (a) => dash(a.actor)],
        ['Reason', (a) => dash(a.reason)],
      ], audit.entries || audit.audit || [], (a) => a.id),
      h('h2', {}, 'Ledger'),
      ledgerTable(d.ledger || []),
    ];
  }

  function banForm(u) {
    const verb = u.is_banned ? 'Unban' : 'Ban';
    const reason = h('input', { name: 'reason', id: 'ban-reason', maxlength: 500 });
    const form = h('form', { class: 'stack', 'aria-labelledby': 'ban-title',
      onsubmit: (ev) => action(ev, `/admin/users/${id(u.id)}/${verb.toLowerCase()}`,
        { reason: reason.value.trim() || undefined }, {}, `${verb === 'Ban' ? 'Banned' : 'Unbanned'} ${u.email}.`) },
    h('h3', { id: 'ban-title' }, u.is_banned ? 'Lift the ban' : 'Ban this user'),
    h('p', { class: 'muted' }, u.is_banned
      ? 'Their account works again at once.'
      : 'Their sessions stop working and their scheduled and live calls are ended.'),
    h('label', { for: 'ban-reason' }, 'Reason (kept in the audit log)'),
    reason,
    h('button', { type: 'submit', class: u.is_banned ? '' : 'danger' }, verb));
    return form;
  }

  function creditsForm(u) {
    // One key per form shown: a double submit grants once.
    const key = crypto.randomUUID();
    const amount = h('input', { name: 'amount', id: 'credits-amount', type: 'number', step: 1, required: true });
    const reason = h('input', { name: 'reason', id: 'credits-reason', required: true, maxlength: 500 });
    return h('form', { class: 'stack', 'aria-labelledby': 'credits-title',
      onsubmit: (ev) => action(ev, `/admin/users/${id(u.id)}/credits`,
        { amount: Number(amount.value), reason: reason.value.trim() }, { 'idempotency-key': key },
        `Adjusted ${u.email}'s credits by ${amount.value}.`) },
    h('h3', { id: 'credits-title' }, 'Grant or take credits'),
    h('label', { for: 'credits-amount' }, 'Amount (negative takes)'),
    amount,
    h('label', { for: 'credits-reason' }, 'Reason (kept in the audit log)'),
    reason,
    h('button', { type: 'submit' }, 'Apply'));
  }

  async function action(ev, path, body, headers, done) {
    ev.preventDefault();
    const button = ev.target.querySelector('button');
    button.disabled = true;
    try {
      await api(path, { method: 'POST', body, headers });
      setStatus(done, 'ok');
      await render();
    } catch (e) {
      setStatus(e.message, 'error');
      button.disabled = false;
    }
  }

  async function viewAnalytics(params) {
    const today = new Date();
    const to = params.get('to') || utcDay(today);
    const from = params.get('from') || utcDay(new Date(today.getTime() - 13 * 86400e3));
    const range = query({ from, to });
    const [calls, revenue, costs] = await Promise.all([
      api(`/admin/analytics/calls${range}`),
      api(`/admin/analytics/revenue${range}`),
      api(`/admin/analytics/costs${range}`),
    ]);
    const days = costs.days.map((d) => d.day.slice(5));
    const t = costs.totals || {};
    const margin = (t.revenue_micros || 0) - (t.cost_micros || 0);
    const pct = t.revenue_micros ? `${((100 * margin) / t.revenue_micros).toFixed(1)}%` : '—';
    return [
      h('h1', {}, 'Analytics'),
      filters('/analytics', [
        ['from', 'From (UTC)', input('from', from, { type: 'date' })],
        ['to', 'To (UTC)', input('to', to, { type: 'date' })],
      ]),
      h('ul', { class: 'tiles', 'data-list': 'totals' },
        tile('Calls', calls.totals.calls),
        tile('Billed minutes', calls.totals.billed_minutes),
        tile('Net sales', usdCents(revenue.totals.net_sales_usd_cents)),
        tile('Call revenue', usdMicros(t.revenue_micros)),
        tile('Provider cost', usdMicros(t.cost_micros)),
        tile('Gross margin', `${usdMicros(margin)} (${pct})`)),
      h('h2', {}, 'Calls per day'),
      barChart({
        name: 'calls-per-day',
        title: 'Calls placed per UTC day',
        labels: calls.days.map((d) => d.day.slice(5)),
        series: [{ name: 'Calls', values: calls.days.map((d) => d.calls), cls: 'a' }],
        format: String,
      }),
      h('h2', {}, 'Revenue against provider cost'),
      barChart({
        name: 'revenue-cost',
        title: 'What calls earned against what the providers cost, per UTC day',
        labels: days,
        series: [
          { name: 'Revenue', values: costs.days.map((d) => d.revenue_micros), cls: 'a' },
          { name: 'Provider cost', values: costs.days.map((d) => d.cost_micros), cls: 'b' },
        ],
        format: usdMicros,
      }),
      h('h2', {}, 'Margin'),
      barChart({
        name: 'margin',
        title: 'Gross margin per UTC day',
        labels: days,
        series: [{ name: 'Gross margin', values: costs.days.map((d) => d.gross_margin_micros), cls: 'm' }],
        format: usdMicros,
      }),
    ];
  }

  function tile(label, value) {
    return h('li', {}, h('span', { class: 'label' }, label), h('span', { class: 'value' }, String(value)));
  }

  async function viewEvents(params) {
    const f = {
      level: params.get('level') || '',
      kind: params.get('kind') || '',
      call_id: params.get('call_id') || '',
      q: params.get('q') || '',
    };
    const data = await api(`/admin/events${query({ ...f, limit: PAGE_SIZE, offset: params.get('offset') })}`);
    return [
      h('h1', {}, 'Events'),
      filters('/events', [
        ['level', 'At least', select('level', f.level, [['', 'Any'], ['info', 'info'], ['warn', 'warn'], ['error', 'error']])],
        ['kind', 'Kind (or prefix.)', input('kind', f.kind, { size: 16, maxlength: 64 })],
        ['call_id', 'Call id', input('call_id', f.call_id, { size: 36 })],
        ['q', 'Text', input('q', f.q, { type: 'search', size: 20, maxlength: 48 })],
      ]),
      eventsTable(data.events),
      pager('/events', params, data.total),
    ];
  }

  function eventsTable(events) {
    return table('events', 'Events', [
      ['When', (e) => when(e.at)],
      ['Level', (e) => badge(e.level)],
      ['Kind', (e) => e.kind],
      ['Source', (e) => dash(e.source)],
      ['Call', (e) => (e.call_id ? link(`#/calls/${id(e.call_id)}`, e.call_id.slice(0, 8)) : '—')],
      ['User', (e) => (e.user_id ? link(`#/users/${id(e.user_id)}`, e.user_id.slice(0, 8)) : '—')],
      ['Details', (e) => h('code', {}, e.body && Object.keys(e.body).length ? JSON.stringify(e.body) : '')],
    ], events, (e) => String(e.id));
  }

  // ---- charts: plain SVG bars, with the numbers in a table beside them ----

  function barChart({ name, title, labels, series, format }) {
    const W = 640;
    const H = 220;
    const pad = { l: 8, r: 8, t: 24, b: 28 };
    const values = series.flatMap((x) => x.values.map((v) => v || 0));
    const max = Math.max(0, ...values);
    const min = Math.min(0, ...values);
    const span = max - min || 1;
    const plotH = H - pad.t - pad.b;
    const y = (v) => pad.t + ((max - v) / span) * plotH;
    const group = (W - pad.l - pad.r) / Math.max(1, labels.length);
    const bar = Math.max(1, Math.min(48, (group * 0.8) / series.length));
    const inset = (group - bar * series.length) / 2;
    const every = Math.ceil(labels.length / 12);
    const titleId = `chart-${name}`;
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-labelledby': titleId, class: 'chart' },
      s('title', { id: titleId }, title),
      s('line', { x1: pad.l, x2: W - pad.r, y1: y(0), y2: y(0), class: 'axis' }),
      labels.map((label, i) => [
        series.map((x, j) => {
          const v = x.values[i] || 0;
          const top = Math.min(y(v), y(0));
          return s('rect', {
            x: pad.l + i * group + inset + j * bar,
            y: top,
            width: bar,
            height: Math.max(v === 0 ? 0 : 1, Math.abs(y(v) - y(0))),
            class: `bar ${x.cls}${v < 0 ? ' neg' : ''}`,
            'data-value': v,
          }, s('title', {}, `${label} · ${x.name}: ${format(x.values[i])}`));
        }),
        i % every === 0 ? s('text', { x: pad.l + i * group + group / 2, y: H - 10, class: 'tick' }, label) : null,
      ]),
      s('text', { x: pad.l + 2, y: 15, class: 'tick start' }, `max ${format(max)}`));
    const legend = series.length > 1
      ? h('ul', { class: 'legend' }, series.map((x) => h('li', {}, h('span', { class: `swatch ${x.cls}` }), x.name)))
      : null;
    const numbers = h('details', {},
      h('summary', {}, 'The numbers'),
      table(`${name}-data`, title, [['', (r) => r.label], ...series.map((x, j) => [x.name, (r) => format(r.values[j])])],
        labels.map((label, i) => ({ label, values: series.map((x) => x.values[i]) })), (r) => r.label));
    return h('figure', { 'data-chart': name, 'data-bars': labels.length }, svg, legend, numbers);
  }

  // ---- start ----

  function start() {
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', () => signOut());
    window.addEventListener('hashchange', render);
    render();
  }

  start();
})();
