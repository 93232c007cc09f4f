// The live dashboard: polls the API every REFRESH_MS and redraws tables and uPlot charts.
// Charts come from /api/v1/metrics/history (the sampler's persisted snapshots, 1 s buckets)
// plus the current /api/v1/metrics reading as the newest point. The key lives in sessionStorage.
'use strict';

const REFRESH_MS = 2000;
const HISTORY_S = 600;
const KEY_NAME = 'msc_admin_key';
const dashboard = { charts: {}, updated: 0, errors: 0 };
window.dashboard = dashboard;

function authHeaders() {
  const key = sessionStorage.getItem(KEY_NAME);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: authHeaders() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((body.error && body.error.message) || `${response.status} on ${path}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---- formatting -------------------------------------------------------------------------------
function bytes(n) {
  if (n == null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const ms = (s) => (s == null ? '–' : (s * 1000).toFixed(1));
const fixed = (x, digits) => (x == null ? '–' : Number(x).toFixed(digits));
const batches = (sizes) => Object.entries(sizes || {}).map(([size, n]) => `${size}×${n}`).join('  ') || '–';

function fillTable(id, rows, empty) {
  const tbody = document.querySelector(`#${id} tbody`);
  tbody.replaceChildren();
  if (!rows.length) {
    const td = tbody.insertRow().insertCell();
    td.colSpan = document.querySelectorAll(`#${id} th`).length;
    td.className = 'empty';
    td.textContent = empty;
    return;
  }
  for (const cells of rows) {
    const tr = tbody.insertRow();
    for (const cell of cells) {
      const td = tr.insertCell();
      const numeric = typeof cell === 'object' && cell !== null;
      td.textContent = numeric ? cell.n : String(cell ?? '–');
      if (numeric) td.className = 'num';
    }
  }
}
const num = (n) => ({ n });

// ---- charts -----------------------------------------------------------------------------------
function chart(name, series, xIsTime = true) {
  const el = document.querySelector(`[data-chart="${name}"]`);
  if (!dashboard.charts[name]) {
    const opts = {
      width: Math.max(300, el.clientWidth), height: 200,
      scales: { x: { time: xIsTime } },
      series: [{ label: xIsTime ? 'time' : 'epoch' }, ...series.map((s) => ({ label: s.label, stroke: s.color, width: 2, spanGaps: true }))],
      axes: [xIsTime ? {} : { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, { size: 60 }],
    };
    dashboard.charts[name] = new uPlot(opts, [[], ...series.map(() => [])], el);
  }
  return dashboard.charts[name];
}

function draw(name, data) {
  const plot = dashboard.charts[name];
  plot.setData(data);
  const values = data.slice(1).flat().filter((v) => v != null);
  const el = document.querySelector(`[data-chart="${name}"]`);
  el.dataset.points = String(values.length);
  el.dataset.max = String(values.length ? Math.max(...values) : 0);
}

const COLORS = ['#2f6fdb', '#d9480f', '#2b8a3e', '#862e9c', '#e67700', '#0b7285'];

function drawHistory(history, now) {
  const points = history.map((h) => ({ ...h, t: Date.parse(h.timestamp) / 1000 }));
  if (now) points.push(now);
  const xs = points.map((p) => p.t);
  chart('throughput', [{ label: 'inferences/s', color: COLORS[0] }]);
  draw('throughput', [xs, points.map((p) => p.throughput)]);
  chart('latency', [{ label: 'p50 ms', color: COLORS[1] }]);
  draw('latency', [xs, points.map((p) => (p.latency == null ? null : p.latency * 1000))]);
  chart('queue', [{ label: 'active', color: COLORS[2] }, { label: 'queued', color: COLORS[3] }]);
  draw('queue', [xs, points.map((p) => p.active_requests), points.map((p) => p.queued_requests)]);
  chart('memory', [{ label: 'memory %', color: COLORS[4] }]);
  draw('memory', [xs, points.map((p) => (p.memory_utilization == null ? null : p.memory_utilization * 100))]);
}

function drawLoss(jobs) {
  const training = jobs.filter((j) => j.kind === 'training' && j.loss_history && j.loss_history.length).slice(0, COLORS.length);
  const key = training.map((j) => j.request_id).join(',');
  if (dashboard.lossKey !== key && dashboard.charts.loss) {  // the set of jobs changed: new series
    dashboard.charts.loss.destroy();
    delete dashboard.charts.loss;
  }
  dashboard.lossKey = key;
  chart('loss', training.map((j, i) => ({ label: j.request_id, color: COLORS[i] })), false);
  const epochs = Math.max(0, ...training.map((j) => j.loss_history.length));
  const xs = Array.from({ length: epochs }, (_, i) => i + 1);
  draw('loss', [xs, ...training.map((j) => xs.map((_, i) => j.loss_history[i] ?? null))]);
}

// ---- one refresh ------------------------------------------------------------------------------
async function refresh() {
  const status = document.getElementById('status');
  try {
    const health = await api('/health');
    const pill = document.getElementById('health');
    pill.textContent = health.status;
    pill.className = `pill ${health.status === 'healthy' ? 'healthy' : 'down'}`;
    document.getElementById('health-detail').textContent =
      `v${health.version} · up ${Math.round(health.uptime)} s · GPU ${health.gpu_status} · memory ${(health.memory_usage * 100).toFixed(0)}%`;
  } catch (error) {
    document.getElementById('health').textContent = 'unreachable';
    document.getElementById('health').className = 'pill down';
  }
  try {
    const since = new Date(Date.now() - HISTORY_S * 1000).toISOString();
    const [metricsBody, historyBody, modelsBody, vgpusBody, jobsBody] = await Promise.all([
      api('/api/v1/metrics'),
      api(`/api/v1/metrics/history?interval=1&start_time=${encodeURIComponent(since)}`),
      api('/api/v1/models'),
      api('/api/v1/virtualization/gpus'),
      api('/api/v1/jobs?limit=20'),
    ]);
    const m = metricsBody.metrics;
    const perModel = m.models || {};
    const models = modelsBody.models;
    fillTable('models', models.map((model) => {
      const s = perModel[model.model_id] || {};
      return [model.model_id, model.model_type, model.status,
        model.virtual_gpu_id || (model.device ?? '–'), num(bytes(model.memory_usage)),
        num(`${s.queue_depth ?? 0} (${s.queue_depth_max ?? 0})`), batches(s.batch_sizes),
        num(fixed(s.requests_per_second, 2)), num(ms(s.latency_p50)), num(ms(s.latency_p99))];
    }), 'no model loaded');
    fillTable('devices', (m.devices || []).map((d) => [d.index, d.name, num(bytes(d.memory_total)),
      num(bytes(d.memory_unreserved)), num(d.compute_units)]), 'no device');
    fillTable('vgpus', vgpusBody.virtual_gpus.map((v) => {
      const used = models.filter((x) => x.virtual_gpu_id === v.virtual_gpu_id).reduce((a, x) => a + (x.memory_usage || 0), 0);
      return [v.virtual_gpu_id, v.physical_gpu_id, num(bytes(v.memory_size)), num(bytes(used)), num(v.compute_units),
        v.scheduling_policy, v.status];
    }), 'no virtual GPU');
    fillTable('jobs', jobsBody.jobs.map((j) => [j.request_id, j.kind, j.model_id, j.status,
      j.kind === 'training' ? `${j.epochs_completed}/${j.epochs ?? '?'} epochs` : '',
      j.kind === 'training' ? num(fixed(j.current_loss, 4)) : '']), 'no async job yet');
    const now = { t: Date.now() / 1000, throughput: m.throughput, latency: m.latency, active_requests: m.active_requests,
      queued_requests: m.queued_requests, memory_utilization: m.memory_utilization };
    drawHistory(historyBody.history, now);
    drawLoss(jobsBody.jobs);
    dashboard.updated += 1;
    status.textContent = '';
  } catch (error) {
    dashboard.errors += 1;
    status.textContent = error.status === 401 || error.status === 403
      ? `${error.message} — enter an admin API key above.` : `Could not refresh: ${error.message}`;
  }
}

document.getElementById('key-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const input = document.getElementById('key');
  if (input.value.trim()) sessionStorage.setItem(KEY_NAME, input.value.trim());
  input.value = '';
  refresh();
});
document.getElementById('forget').addEventListener('click', () => {
  sessionStorage.removeItem(KEY_NAME);
  refresh();
});
window.addEventListener('resize', () => {
  for (const [name, plot] of Object.entries(dashboard.charts)) {
    const el = document.querySelector(`[data-chart="${name}"]`);
    plot.setSize({ width: Math.max(300, el.clientWidth), height: 200 });
  }
});

refresh();
setInterval(refresh, REFRESH_MS);
