// The Phalanx dashboard: polls this controller's JSON API once a second and draws what it
// answers. Every request carries the phalanx_token cookie that the page's own answer set
// (same origin, so nothing else is needed); every text from the cluster goes into the
// page as text, never as markup.
"use strict";

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 4000;
const EVENTS_SHOWN = 200;

// How many times this page has followed the leader to another controller just before.
const HOPS = Number(new URLSearchParams(location.search).get("hop")) || 0;
const HOPS_MAX = 5;
const LOADED_AT = Date.now();
// The token came in the address: the cookie holds it now, the address bar need not.
if (location.search) {
  history.replaceState(null, "", location.pathname);
}

const $ = (id) => document.getElementById(id);
let lastStatus = null;
let lossPlot = null;
let failures = 0;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "background") e.style.background = v; // CSSOM: allowed by the page's CSP
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fillBody(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

function badge(health) {
  return el("span", { class: "badge h-" + health }, health);
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v >= 1000) return (v / 1000).toFixed(2) + " s";
  if (v >= 10) return Math.round(v) + " ms";
  return v >= 0.1 ? v.toFixed(1) + " ms" : "< 0.1 ms";
}

function device(d) {
  if (!d) return "";
  if (d.model) return d.kind === "cpu-emulated" ? `${d.model} (emulated)` : `${d.model} (${d.kind}:${d.index})`;
  return `${d.kind}:${d.index}`;
}

async function getJson(path) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  try {
    const r = await fetch(path, { credentials: "same-origin", cache: "no-store", signal: ctl.signal });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    return { status: r.status, body };
  } finally {
    clearTimeout(timer);
  }
}

function setConn(state, text) {
  const c = $("conn");
  c.dataset.state = state;
  c.textContent = text;
}

function banner(nodes) {
  const b = $("banner");
  if (!nodes) { b.hidden = true; b.replaceChildren(); return; }
  b.replaceChildren(...nodes);
  b.hidden = false;
}

// Another controller's page, over this page's own scheme (https, or http under --insecure):
// a page that moved to plain http on a TLS controller would get no answer and stay broken.
function pageOf(address, query) {
  return `${location.protocol}//${address}/ui/${query || ""}`;
}

function otherControllerLinks(s) {
  if (!s) return [];
  const out = [];
  for (const m of s.members || []) {
    if (m.id === s.node_id || !m.address) continue;
    out.push(" ", el("a", { href: pageOf(m.address) }, `node ${m.id} (${m.address})`));
  }
  return out;
}

// ------------------------------------------------------------------ sections

function renderControllers(s) {
  const leader = (s.members || []).find((m) => m.id === s.leader_id);
  $("leader").textContent = s.leader_id
    ? `node ${s.leader_id}` + (leader ? ` (${leader.address})` : "")
    : "none (election in progress)";
  $("term").textContent = s.term;
  $("commit").textContent = s.commit_index;
  const matched = s.matched || {};
  fillBody($("controllers"), (s.members || []).map((m) => {
    const role = m.id === s.node_id ? s.role : (m.id === s.leader_id ? "leader" : "follower");
    const here = m.id === s.node_id ? " · this page" : "";
    return el("tr", { "data-node": m.id, "data-role": role },
      el("td", {}, `node ${m.id}`),
      el("td", {}, m.address),
      el("td", { class: role === "leader" ? "role-leader" : "" }, role + here),
      el("td", {}, matched[m.id] !== undefined ? matched[m.id] : "–"));
  }));
}

function rankOf(job) {
  const ranks = new Map();
  const plan = job && job.plan;
  if (plan && !["completed", "cancelled", "failed"].includes(job.state)) {
    plan.ranks.forEach((w, i) => ranks.set(w, i));
  }
  return ranks;
}

function renderWorkers(s) {
  const ranks = rankOf(s.job);
  const workers = (s.workers || []).slice().sort((a, b) => a.id.localeCompare(b.id, undefined, { numeric: true }));
  const counts = {};
  for (const w of workers) counts[w.health] = (counts[w.health] || 0) + 1;
  $("worker-count").textContent = `${workers.length}: ` +
    Object.entries(counts).map(([h, n]) => `${n} ${h}`).join(", ");
  fillBody($("workers"), workers.map((w) => el("tr", { "data-worker": w.id, "data-health": w.health },
    el("td", {}, w.id),
    el("td", {}, badge(w.health)),
    el("td", {}, device(w.device)),
    el("td", {}, ranks.has(w.id) ? `rank ${ranks.get(w.id)}` : "–"),
    el("td", { class: "reason" }, w.health_reason || ""))));
}

function renderJob(s) {
  const j = s.job;
  if (!j) {
    $("job-line").textContent = "no job";
    $("epoch").textContent = "–";
    $("plan-reason").textContent = "";
    $("progress-bar").style.width = "0";
    $("progress-text").textContent = "";
    fillBody($("ranks"), []);
    return;
  }
  const sp = j.spec;
  $("job-line").replaceChildren(
    el("strong", {}, sp.name), ` · ${sp.model} · `, el("span", { id: "job-state", "data-state": j.state }, j.state),
    ` · ${sp.steps} steps of ${sp.global_batch} sequences · world ${sp.world_size_min}–${sp.world_size_max}`,
    j.failure ? ` · failed: ${j.failure}` : "");
  const pct = sp.steps ? Math.min(100, (100 * j.progress_step) / sp.steps) : 0;
  $("progress-bar").style.width = pct.toFixed(1) + "%";
  $("progress-text").textContent = `step ${j.progress_step} of ${sp.steps} (${pct.toFixed(0)}%)`;
  const plan = j.plan;
  $("epoch").textContent = plan ? plan.epoch : "–";
  $("plan-reason").textContent = plan ? plan.reason : "no plan yet";
  const h = j.history || {};
  const compute = plan && h.epoch === plan.epoch ? h.rank_compute_us || [] : [];
  fillBody($("ranks"), plan ? plan.ranks.map((w, i) => el("tr", { "data-rank": i },
    el("td", {}, i),
    el("td", {}, w),
    el("td", {}, plan.micro_shares && plan.micro_shares.length ? plan.micro_shares[i] : "equal"),
    el("td", {}, (j.rank_steps || [])[i] ?? "–"),
    el("td", {}, compute[i] ? ms(compute[i] / 1000) : "–"))) : []);
}

function renderRecoveries(s) {
  const recs = (s.job && s.job.recoveries) || [];
  fillBody($("recoveries"), recs.slice().reverse().map((r) => el("tr",
    { "data-epoch": r.epoch, "data-mttr-ms": r.mttr_ms ?? "" },
    el("td", {}, r.epoch),
    el("td", {}, r.source),
    el("td", {}, `step ${r.resumed_at_step}`),
    el("td", {}, `${r.steps_redone} steps`),
    el("td", {}, r.mttr_ms !== null && r.mttr_ms !== undefined ? `MTTR ${ms(r.mttr_ms)}` : "MTTR –"))));
}

function renderLoss(s) {
  const samples = (s.job && s.job.history && s.job.history.samples) || [];
  const xs = samples.map((p) => p.step);
  const ys = samples.map((p) => p.loss_millionths / 1e6);
  const box = $("loss");
  box.dataset.points = String(xs.length);
  $("loss-latest").textContent = ys.length ? `latest ${ys[ys.length - 1].toFixed(4)} at step ${xs[xs.length - 1]}` : "(no steps yet)";
  if (typeof uPlot === "undefined") return;
  const width = Math.max(300, box.clientWidth || 800);
  if (!lossPlot) {
    lossPlot = new uPlot({
      width, height: 220,
      scales: { x: { time: false } },
      axes: [
        { stroke: "#8b98a8", grid: { stroke: "#2a3542" }, label: "step" },
        { stroke: "#8b98a8", grid: { stroke: "#2a3542" }, label: "loss" },
      ],
      series: [{ label: "step" }, { label: "loss", stroke: "#58a6ff", width: 2, points: { show: xs.length < 60 } }],
    }, [xs, ys], box);
  } else {
    if (Math.abs(lossPlot.width - width) > 4) lossPlot.setSize({ width, height: 220 });
    lossPlot.setData([xs, ys]);
  }
}

// Colour of a compute time relative to its step's median: blue at or below it, yellow at
// 1.5x, red from 2.5x; dark for no report.
function heatColour(ratio) {
  if (!(ratio > 0)) return "#0f1419";
  const stops = [[1.0, [36, 90, 143]], [1.5, [210, 153, 34]], [2.5, [248, 81, 73]]];
  if (ratio <= stops[0][0]) return `rgb(${stops[0][1]})`;
  for (let i = 1; i < stops.length; i++) {
    const [r1, c1] = stops[i];
    const [r0, c0] = stops[i - 1];
    if (ratio <= r1) {
      const t = (ratio - r0) / (r1 - r0);
      return `rgb(${c0.map((c, k) => Math.round(c + t * (c1[k] - c))).join(",")})`;
    }
  }
  return `rgb(${stops[2][1]})`;
}

function median(vs) {
  const v = vs.filter((x) => x > 0).sort((a, b) => a - b);
  if (!v.length) return 0;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

function renderHeat(s) {
  const canvas = $("heat");
  const j = s.job;
  const samples = ((j && j.history && j.history.samples) || []).filter((p) => p.compute_us.some((x) => x > 0));
  const rows = samples.reduce((n, p) => Math.max(n, p.compute_us.length), 0);
  canvas.dataset.columns = String(samples.length);
  const width = Math.max(300, canvas.clientWidth || 900);
  const labelW = 36;
  const rowH = rows ? Math.max(12, Math.min(28, Math.floor(200 / rows))) : 20;
  const height = Math.max(40, rows * rowH + 4);
  canvas.width = width;
  canvas.height = height;
  canvas.style.height = height + "px";
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#8b98a8";
  if (!samples.length) {
    g.fillText("no compute times reported yet", 8, 20);
    $("straggler").textContent = "";
    return;
  }
  const colW = (width - labelW) / samples.length;
  for (let r = 0; r < rows; r++) {
    g.fillStyle = "#8b98a8";
    g.fillText(`r${r}`, 4, 2 + r * rowH + rowH * 0.7);
  }
  samples.forEach((p, c) => {
    const med = median(p.compute_us);
    p.compute_us.forEach((us, r) => {
      g.fillStyle = heatColour(med ? us / med : 0);
      g.fillRect(labelW + c * colW, 2 + r * rowH, Math.ceil(colW), rowH - 1);
    });
    if (c > 0 && samples[c - 1].epoch !== p.epoch) {
      g.fillStyle = "#dfe6ee";
      g.fillRect(labelW + c * colW - 1, 0, 2, height);
    }
  });
  // The newest compute times name the straggler, if there is one.
  const plan = j.plan;
  const now = (j.history.epoch === (plan && plan.epoch) ? j.history.rank_compute_us : []) || [];
  const med = median(now);
  let worst = -1;
  now.forEach((us, r) => { if (worst < 0 || us > now[worst]) worst = r; });
  const line = $("straggler");
  if (worst >= 0 && med > 0) {
    const ratio = now[worst] / med;
    const who = plan ? plan.ranks[worst] : "?";
    line.dataset.ratio = ratio.toFixed(2);
    line.textContent = ratio >= 1.5
      ? `straggler: rank ${worst} (${who}) at ${ms(now[worst] / 1000)} per micro-batch, ${ratio.toFixed(1)}× the median`
      : `no straggler: the slowest rank, ${worst} (${who}), is at ${ratio.toFixed(2)}× the median (${ms(med / 1000)})`;
  } else {
    line.textContent = "";
  }
}

function renderLegend() {
  const items = [["≤ median", 1.0], ["1.5×", 1.5], ["≥ 2.5×", 2.5], ["no report", 0]];
  $("heat-legend").replaceChildren(...items.map(([t, r]) =>
    el("span", {}, el("i", { background: heatColour(r) }), t)),
    el("span", {}, el("i", { background: "#dfe6ee" }), "new plan epoch"));
}

function eventClass(kind) {
  if (/failed|suspect|quarantined|stuck|mismatch|refused|fault|cancelled/.test(kind)) return "ev-bad";
  if (/straggler|draining|waiting/.test(kind)) return "ev-warn";
  if (/resumed|healthy|restored|completed|result|durable/.test(kind)) return "ev-ok";
  if (/plan|members/.test(kind)) return "ev-plan";
  return "";
}

function renderEvents(evs) {
  fillBody($("events"), evs.slice(-EVENTS_SHOWN).reverse().map((e) =>
    el("tr", { class: eventClass(e.kind), "data-kind": e.kind },
      el("td", {}, e.seq),
      el("td", {}, e.kind),
      el("td", {}, e.subject),
      el("td", { class: "reason" }, e.reason))));
}

function renderSummary(s) {
  const j = s.job;
  const parts = [`node ${s.node_id} (${s.role})`, `term ${s.term}`];
  if (j) parts.push(`job ${j.spec.name} ${j.state}, step ${j.progress_step}/${j.spec.steps}`);
  if (j && j.plan) parts.push(`epoch ${j.plan.epoch}`);
  $("summary").textContent = parts.join(" · ");
}

// ------------------------------------------------------------------ following the leader

// A page on a follower, or on a controller that stopped answering, moves to the leader's
// page (or to the next controller's). The cookie goes along on the same host: cookies do
// not depend on the port. A page that moved HOPS_MAX times in a row stays (and says why).
function follow(address) {
  if (!address || address === location.host) return false;
  const hop = Date.now() - LOADED_AT > 60000 ? 1 : HOPS + 1;
  if (hop > HOPS_MAX) return false;
  setConn("connecting", `moving to ${address}`);
  location.href = pageOf(address, `?hop=${hop}`);
  return true;
}

function nextController(s) {
  const members = (s && s.members) || [];
  const leader = members.find((m) => m.id === s.leader_id && m.address !== location.host);
  if (leader) return leader.address;
  const i = members.findIndex((m) => m.address === location.host);
  const next = members[(i + 1) % members.length];
  return next ? next.address : null;
}

// ------------------------------------------------------------------ polling

async function pollOnce() {
  let st;
  try {
    st = await getJson("/v1/status");
  } catch (e) {
    failures += 1;
    setConn("lost", "no answer");
    banner(["This controller does not answer. Try another:", ...otherControllerLinks(lastStatus)]);
    if (failures >= 3) follow(nextController(lastStatus));
    return;
  }
  failures = 0;
  if (st.status === 401) {
    setConn("lost", "unauthorized");
    banner(["Not authorized: open the address that ", el("code", {}, "phalanx dashboard --dir DIR"),
      " prints (it carries the token once; the page keeps it in a cookie)."]);
    return;
  }
  if (st.status !== 200 || !st.body) {
    setConn("lost", `status ${st.status}`);
    banner([`The controller answered ${st.status}: ${(st.body && st.body.message) || "no message"}`]);
    return;
  }
  const s = st.body;
  lastStatus = s;
  if (s.role !== "leader" && s.leader_id) {
    const leader = (s.members || []).find((m) => m.id === s.leader_id);
    if (leader && follow(leader.address)) return;
  }
  banner(null);
  renderSummary(s);
  renderControllers(s);
  renderJob(s);
  renderWorkers(s);
  renderRecoveries(s);
  renderLoss(s);
  renderHeat(s);
  let ev = null;
  try {
    ev = await getJson(`/v1/events?limit=${EVENTS_SHOWN}`);
  } catch (_) {
    ev = null;
  }
  const note = $("events-note");
  if (ev && ev.status === 200 && Array.isArray(ev.body)) {
    note.replaceChildren();
    renderEvents(ev.body);
  } else if (ev && ev.status === 421 && ev.body && ev.body.leader_address) {
    note.replaceChildren("The event log is read from the leader: ",
      el("a", { href: pageOf(ev.body.leader_address) }, `open node ${ev.body.leader_id}'s dashboard`), ".");
  } else {
    note.textContent = `The event log is unavailable right now (${ev ? ev.status : "no answer"}); retrying.`;
  }
  setConn("live", "live");
  $("updated").textContent = new Date().toLocaleTimeString();
}

async function loop() {
  try {
    await pollOnce();
  } finally {
    setTimeout(loop, POLL_MS);
  }
}

renderLegend();
loop();
