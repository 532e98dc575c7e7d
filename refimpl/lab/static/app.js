// refimpl lab serve: the page's logic. Vanilla JavaScript, inline SVG, no libraries, nothing fetched
// from anywhere but this server. Runs, points and diagnoses arrive as server-sent events (/api/events).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const LABEL_TEXT = { healthy: "healthy", rank_too_low: "rank too low", wrong_layers: "wrong layers",
                     overfitting: "overfitting" };
const S = { session: null, config: null, runs: new Map(), order: [], selected: null, fmStarted: false,
            fmTab: "rank_too_low", pendingClick: null };
// time from a Train click to the run's first point and to its end (read by the browser test)
window.labTimings = {};

// ---------------------------------------------------------------------------- helpers

function $(id) { return document.getElementById(id); }

function el(tag, attrs = {}, text = null) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}

function svgEl(parent, tag, attrs = {}, text = null) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  parent.appendChild(e);
  return e;
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json();
  if (!r.ok) { const e = new Error(data.error || r.statusText); e.field = data.field; e.status = r.status; throw e; }
  return data;
}

function fmt(x, d = 3) { return (typeof x === "number") ? x.toFixed(d) : "–"; }

function describe(p) {
  const extra = [p.dora ? "DoRA" : "", p.nf4 ? "NF4" : "", p.loraplus_ratio !== 1 ? `LoRA+ ${p.loraplus_ratio}` : ""]
    .filter(Boolean).join(" ");
  return `${p.task} ${p.layers} r=${p.rank} drop=${p.dropout} wd=${p.weight_decay} n=${p.examples} ` +
    `lr=${p.lr} ${p.steps} steps seed ${p.seed}${extra ? " " + extra : ""}`;
}

// ---------------------------------------------------------------------------- controls

function buildControls() {
  const form = $("controls");
  for (const c of S.config.controls) {
    const row = el("div", { class: "row", id: `row-${c.name}`, title: c.help });
    const id = `ctl-${c.name}`;
    const head = el("div", { class: "head" });
    head.appendChild(el("label", { for: id }, c.label));
    const links = el("span", { class: "links" });
    for (const [text, href] of c.links) links.appendChild(el("a", { href, target: "_blank", class: "ref" }, text));
    head.appendChild(links);
    row.appendChild(head);
    let input;
    if (c.kind === "choice") {
      input = el("select", { id, name: c.name });
      for (const [value, label] of c.choices) {
        const o = el("option", { value }, label);
        if (value === c.default) o.selected = true;
        input.appendChild(o);
      }
    } else if (c.kind === "bool") {
      input = el("input", { id, name: c.name, type: "checkbox" });
      input.checked = c.default;
    } else {
      input = el("input", { id, name: c.name, type: "number", value: String(c.default), step: String(c.step ?? "any"),
                            min: String(c.low), max: String(c.high) });
    }
    row.appendChild(input);
    form.appendChild(row);
  }
}

function readControls() {
  const p = {};
  for (const c of S.config.controls) {
    const input = $(`ctl-${c.name}`);
    if (c.kind === "bool") p[c.name] = input.checked;
    else if (c.kind === "choice") p[c.name] = input.value;
    else p[c.name] = input.value === "" ? null : Number(input.value);
  }
  return p;
}

function showFormError(err) {
  document.querySelectorAll("form .bad").forEach(r => r.classList.remove("bad"));
  $("form-error").textContent = err ? err.message : "";
  if (err && err.field && $(`row-${err.field}`)) $(`row-${err.field}`).classList.add("bad");
}

// ---------------------------------------------------------------------------- runs and events

function runEntry(id) {
  if (!S.runs.has(id)) { S.runs.set(id, { summary: null, points: [] }); S.order.push(id); }
  return S.runs.get(id);
}

function updateTiming(id) {
  // arrival times are kept per run, so a point that beats the POST's reply is still counted
  const t = window.labTimings[id], r = S.runs.get(id);
  if (!t || !r) return;
  if (r.firstAt !== undefined) t.first = r.firstAt - t.click;
  if (r.endAt !== undefined) t.end = r.endAt - t.click;
}

function onRun(summary) {
  const r = runEntry(summary.id);
  r.summary = summary;
  if ((summary.status === "done" || summary.status === "stopped") && r.endAt === undefined) r.endAt = performance.now();
  updateTiming(summary.id);
  if (summary.group === "sandbox" && S.selected === null) S.selected = summary.id;
  refreshStatus();
  redraw();
}

function onPoint(p) {
  const r = runEntry(p.run);
  r.points.push(p);
  if (r.firstAt === undefined) { r.firstAt = performance.now(); updateTiming(p.run); }
  scheduleRedraw();
}

let redrawPending = false;
function scheduleRedraw() {
  if (redrawPending) return;
  redrawPending = true;
  requestAnimationFrame(() => { redrawPending = false; redraw(); });
}

function sandboxRuns() { return S.order.map(id => S.runs.get(id)).filter(r => r.summary && r.summary.group === "sandbox"); }
function runNumber(id) { return S.order.filter(i => S.runs.get(i).summary?.group === "sandbox").indexOf(id) + 1; }

function redraw() {
  drawSandboxPlot();
  drawRunsTable();
  drawDiagnosis();
  drawTree();
  drawFailureModes();
  fillMergeSelects();
}

async function train() {
  showFormError(null);
  const click = performance.now();
  try {
    const run = await api("POST", "/api/runs", { session: S.session, params: readControls() });
    window.labTimings[run.id] = { click };
    updateTiming(run.id);
    S.selected = run.id;
    // the event stream may already have brought a newer status than this reply's
    if (S.runs.get(run.id)?.summary) redraw(); else onRun(run);
  } catch (err) { showFormError(err); }
}

async function stop() {
  for (const r of sandboxRuns()) {
    if (r.summary.status === "running" || r.summary.status === "queued") {
      try { await api("POST", `/api/runs/${r.summary.id}/stop`, { session: S.session }); } catch (err) { showFormError(err); }
    }
  }
}

// ---------------------------------------------------------------------------- loss plot

function niceMax(v) { return Math.max(0.5, Math.ceil(v * 2) / 2); }

function drawCurves(svg, entries, opts = {}) {
  // entries: [{points, emphasis (bool), label}]; train orange, validation teal; faded = earlier runs
  svg.replaceChildren();
  const W = 640, H = 360, L = 46, R = 70, T = 14, B = 34;
  const chance = S.config.chance_loss;
  let maxStep = 10, maxLoss = chance * 1.1;
  for (const e of entries) for (const p of e.points) {
    maxStep = Math.max(maxStep, p.step);
    maxLoss = Math.max(maxLoss, p.train_loss, p.val_loss);
  }
  for (const e of entries) if (e.steps) maxStep = Math.max(maxStep, e.steps);
  const yMax = opts.yMax ?? niceMax(maxLoss * 1.03);
  const x = s => L + (W - L - R) * s / maxStep;
  const y = v => T + (H - T - B) * (1 - v / yMax);
  for (let v = 0; v <= yMax + 1e-9; v += yMax > 3 ? 1 : 0.5) {
    svgEl(svg, "line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" });
    svgEl(svg, "text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(1));
  }
  const stepTick = maxStep > 1000 ? 500 : maxStep > 400 ? 100 : maxStep > 100 ? 50 : 10;
  for (let s = 0; s <= maxStep; s += stepTick) {
    svgEl(svg, "line", { x1: x(s), x2: x(s), y1: T, y2: H - B, class: "grid" });
    svgEl(svg, "text", { x: x(s), y: H - B + 14, "text-anchor": "middle" }, String(s));
  }
  svgEl(svg, "line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  svgEl(svg, "line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  svgEl(svg, "text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "step");
  svgEl(svg, "text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`,
                       "text-anchor": "middle" }, "cross-entropy");
  svgEl(svg, "line", { x1: L, x2: W - R, y1: y(chance), y2: y(chance), class: "chance" });
  svgEl(svg, "text", { x: W - R + 4, y: y(chance) + 4 }, "chance");
  const ordered = [...entries.filter(e => !e.emphasis), ...entries.filter(e => e.emphasis)];
  for (const e of ordered) {
    if (!e.points.length) continue;
    const op = e.emphasis ? 1 : 0.3, w = e.emphasis ? 2.4 : 1.4;
    for (const [key, cls] of [["train_loss", "train"], ["val_loss", "val"]]) {
      const pts = e.points.map(p => `${x(p.step).toFixed(1)},${y(Math.min(p[key], yMax)).toFixed(1)}`).join(" ");
      svgEl(svg, "polyline", { points: pts, class: cls, "stroke-width": w, opacity: op, "data-run": e.id || "",
                               "data-kind": cls });
    }
    const last = e.points[e.points.length - 1];
    if (e.label) {
      svgEl(svg, "text", { x: x(last.step) + 4, y: y(Math.min(last.val_loss, yMax)) + 4, class: "endlabel",
                           opacity: op, fill: "#13938a" }, e.label);
    }
  }
  if (opts.title) svgEl(svg, "text", { x: L + 6, y: T + 12, class: "endlabel" }, opts.title);
}

function drawSandboxPlot() {
  const entries = sandboxRuns().map(r => ({ id: r.summary.id, points: r.points, steps: r.summary.params.steps,
    emphasis: r.summary.id === S.selected, label: `#${runNumber(r.summary.id)}` }));
  drawCurves($("plot"), entries);
}

function drawRunsTable() {
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  for (const r of sandboxRuns()) {
    const s = r.summary, last = r.points[r.points.length - 1];
    const tr = el("tr", { "data-run": s.id, class: s.id === S.selected ? "sel" : "" });
    tr.appendChild(el("td", {}, `#${runNumber(s.id)}`));
    tr.appendChild(el("td", { class: "cfg" }, describe(s.params)));
    const st = el("td", { class: "status" }, s.status + (s.status === "done" || s.status === "stopped" ? ` ${s.seconds}s` : ""));
    if (s.error) st.title = s.error;
    tr.appendChild(st);
    tr.appendChild(el("td", {}, last ? `${fmt(last.train_loss)} / ${fmt(last.val_loss)}` : "–"));
    const dg = el("td");
    if (s.diagnosis) dg.appendChild(el("span", { class: `chip ${s.diagnosis.label}` }, LABEL_TEXT[s.diagnosis.label]));
    tr.appendChild(dg);
    const ex = el("td");
    if (s.status === "done" || s.status === "stopped") {
      for (const [f, text] of [["json", "JSON"], ["csv", "CSV"], ["peft", "adapter"]]) {
        ex.appendChild(el("a", { href: `/api/runs/${s.id}/export?format=${f}&session=${S.session}`, download: "",
                                 class: `export-${f}` }, text));
        ex.appendChild(document.createTextNode(" "));
      }
    }
    tr.appendChild(ex);
    tr.addEventListener("click", ev => { if (ev.target.tagName !== "A") { S.selected = s.id; redraw(); } });
    body.appendChild(tr);
  }
}

// ---------------------------------------------------------------------------- diagnosis and tree

function drawDiagnosis() {
  const box = $("diagnosis");
  const r = S.selected && S.runs.get(S.selected);
  if (!r || !r.summary) return;
  const s = r.summary;
  box.replaceChildren();
  if (!s.diagnosis) {
    box.appendChild(el("p", { class: "muted" }, s.status === "error" ? `error: ${s.error}` :
      `run #${runNumber(s.id)} ${s.status}: ${r.points.length} points so far; the label comes when it ends.`));
    return;
  }
  const d = s.diagnosis;
  const head = el("p", { class: "label" });
  head.appendChild(el("span", { class: `chip ${d.label}`, id: "diagnosis-label", "data-label": d.label },
                      LABEL_TEXT[d.label]));
  head.appendChild(document.createTextNode(` run #${runNumber(s.id)}${d.partial ? " (stopped early)" : ""}`));
  box.appendChild(head);
  box.appendChild(el("p", { class: "reason" }, d.reason));
  box.appendChild(el("p", { class: "fix" }, `The lesson's fix: ${d.fix}`));
  const t = el("table", { class: "evidence" });
  for (const k of ["train_end", "val_end", "val_min", "train_end/ref", "val_min/ref", "gap_start/ref", "gap_end/ref",
                   "val_rise/ref"]) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, k));
    tr.appendChild(el("td", {}, fmt(d.evidence[k])));
    t.appendChild(tr);
  }
  box.appendChild(t);
  box.appendChild(el("p", { class: "muted" }, `reference loss = chance = ln 8 = ${fmt(d.evidence.reference_loss)}`));
}

function drawTree() {
  const svg = $("tree");
  svg.replaceChildren();
  const th = S.config.thresholds;
  const r = S.selected && S.runs.get(S.selected);
  const path = r && r.summary && r.summary.diagnosis ? r.summary.diagnosis.path : [];
  const on = new Set(path.map(p => p.node));
  const answers = Object.fromEntries(path.filter(p => "yes" in p).map(p => [p.node, p]));
  const nodes = {
    flat: { x: 10, y: 10, w: 215, h: 72, lines: ["Training loss flat?", `train_end / ref > ${th.flat_fraction}, or flat`,
      `by ${th.early_fraction * 100}% of the run above ${th.plateau_fraction}`] },
    mediocre: { x: 10, y: 100, w: 215, h: 58, lines: ["Validation mediocre?", `val_min / ref > ${th.mediocre_fraction}`] },
    gap: { x: 10, y: 190, w: 215, h: 58, lines: ["Gap widening or val rising?",
      `Δgap / ref > ${th.gap_fraction} or rise > ${th.rise_fraction}`] },
    healthy: { x: 10, y: 278, w: 215, h: 42, lines: ["healthy", "nothing to fix"], leaf: true },
    rank_too_low: { x: 265, y: 10, w: 160, h: 58, lines: ["rank too low", "raise r to 16–64", "or target more layers"], leaf: true },
    wrong_layers: { x: 265, y: 100, w: 160, h: 58, lines: ["wrong layers", "all linear layers", "at a lower rank"], leaf: true },
    overfitting: { x: 265, y: 190, w: 160, h: 58, lines: ["overfitting", "more data, dropout", "0.05–0.1, weight decay"], leaf: true },
  };
  const edges = [["flat", "rank_too_low", "yes"], ["flat", "mediocre", "no"], ["mediocre", "wrong_layers", "yes"],
                 ["mediocre", "gap", "no"], ["gap", "overfitting", "yes"], ["gap", "healthy", "no"]];
  for (const [a, b, word] of edges) {
    const A = nodes[a], Bn = nodes[b];
    const horizontal = word === "yes";
    const x1 = horizontal ? A.x + A.w : A.x + 60, y1 = horizontal ? A.y + A.h / 2 : A.y + A.h;
    const x2 = horizontal ? Bn.x : Bn.x + 60, y2 = horizontal ? Bn.y + Bn.h / 2 : Bn.y;
    const taken = on.has(a) && on.has(b);
    svgEl(svg, "line", { x1, y1, x2, y2, class: taken ? "on" : "" });
    svgEl(svg, "text", { x: horizontal ? (x1 + x2) / 2 - 8 : x1 + 6, y: horizontal ? y1 - 4 : (y1 + y2) / 2 + 4,
                         class: "edge" }, word);
  }
  for (const [name, n] of Object.entries(nodes)) {
    const g = svgEl(svg, "g", { class: `${n.leaf ? "leaf" : "q"}${on.has(name) ? " on" : ""}`, "data-node": name });
    svgEl(g, "rect", { x: n.x, y: n.y, width: n.w, height: n.h });
    n.lines.forEach((line, i) => svgEl(g, "text", { x: n.x + 8, y: n.y + 16 + i * 14,
      "font-weight": i === 0 ? "600" : "normal" }, line));
    const a = answers[name];
    if (a) {
      let text = `${fmt(a.value, 2)} ${a.value > a.threshold ? ">" : "≤"} ${a.threshold}`;
      if (a.also) text += `; rise ${fmt(a.also.value, 2)}`;
      if (a.plateau) text = `${fmt(a.value, 2)}; flat from ${fmt(a.plateau.value, 2)}`;
      svgEl(g, "text", { x: n.x + 8, y: n.y + 16 + n.lines.length * 14, class: "fig" }, `${text} → ${a.yes ? "yes" : "no"}`);
    }
  }
  if (!path.length) {
    svgEl(svg, "text", { x: 265, y: 294 }, "(a finished run's path");
    svgEl(svg, "text", { x: 265, y: 308 }, "is drawn in bold)");
  }
}

// ---------------------------------------------------------------------------- failure modes

function failureRun(mode) {
  const ids = S.order.filter(id => S.runs.get(id).summary?.group === `failure:${mode}`);
  return ids.length ? S.runs.get(ids[ids.length - 1]) : null;
}

function caption(box, mode, r) {
  const p = S.config.failure_modes[mode];
  box.replaceChildren();
  const head = el("div");
  head.appendChild(el("b", {}, mode === "healthy" ? "Healthy baseline" : LABEL_TEXT[mode]));
  head.appendChild(document.createTextNode(`: ${p.task}, ${p.layers}, r=${p.rank}, dropout ${p.dropout}, ` +
    `wd ${p.weight_decay}, ${p.examples} examples, ${p.steps} steps`));
  box.appendChild(head);
  if (!r) { box.appendChild(el("div", { class: "muted" }, "not trained yet")); return; }
  const d = r.summary.diagnosis;
  const line = el("div", { class: "fm-diagnosis", "data-mode": mode });
  if (d) {
    line.appendChild(document.createTextNode("diagnose(): "));
    line.appendChild(el("span", { class: `chip ${d.label}`, "data-label": d.label }, LABEL_TEXT[d.label]));
    line.appendChild(document.createTextNode(` ${d.reason}. Fix: ${d.fix}.`));
  } else {
    line.textContent = `${r.summary.status}… ${r.points.length} points`;
  }
  box.appendChild(line);
}

function drawFailureModes() {
  if (!S.config) return;
  const healthy = failureRun("healthy"), mode = failureRun(S.fmTab);
  // one x and y scale for the pair, so the failure mode is read against the healthy run
  const steps = Math.max(S.config.failure_modes.healthy.steps, S.config.failure_modes[S.fmTab].steps);
  const losses = [healthy, mode].flatMap(r => r ? r.points.flatMap(p => [p.train_loss, p.val_loss]) : []);
  const yMax = niceMax(Math.max(S.config.chance_loss * 1.1, ...losses) * 1.03);
  drawCurves($("fm-healthy"), [{ points: healthy ? healthy.points : [], emphasis: true, steps }],
             { title: "healthy", yMax });
  drawCurves($("fm-mode"), [{ points: mode ? mode.points : [], emphasis: true, steps }],
             { title: LABEL_TEXT[S.fmTab], yMax });
  caption($("fm-healthy-cap"), "healthy", healthy);
  caption($("fm-mode-cap"), S.fmTab, mode);
}

async function startFailureModes() {
  S.fmStarted = true;
  try { await api("POST", "/api/failure-modes", { session: S.session }); } catch (err) { $("fm-mode-cap").textContent = err.message; }
}

// ---------------------------------------------------------------------------- merge view

function fillMergeSelects() {
  const done = S.order.map(id => S.runs.get(id)).filter(r => r.summary && r.summary.status === "done");
  // until the user picks, A is the latest facts_low adapter and B the latest facts_high one (else the latest two)
  const ids = done.map(r => r.summary.id);
  [["merge-a", "facts_low", 1], ["merge-b", "facts_high", 2]].forEach(([id, want, nth]) => {
    const sel = $(id), keep = sel.value;
    if (ids.join() === sel.dataset.ids) return;
    sel.dataset.ids = ids.join();
    sel.replaceChildren();
    for (const r of done) {
      const s = r.summary;
      const name = s.group === "sandbox" ? `#${runNumber(s.id)}` : s.group.replace("failure:", "");
      sel.appendChild(el("option", { value: s.id }, `${name}: ${s.params.task} ${s.params.layers} r=${s.params.rank}`));
    }
    const auto = [...done].reverse().find(r => r.summary.params.task === want)?.summary.id ?? ids[ids.length - nth];
    const pick = sel.dataset.user === "1" && ids.includes(keep) ? keep : auto;
    if (pick) sel.value = pick;
  });
}

async function trainPair() {
  const base = readControls();
  for (const task of ["facts_low", "facts_high"]) {
    try { await api("POST", "/api/runs", { session: S.session, params: { ...base, task } }); }
    catch (err) { $("merge-error").textContent = err.message; return; }
  }
  $("merge-error").textContent = "training both adapters; they appear in the lists when done";
}

async function merge() {
  $("merge-error").textContent = "";
  const body = { session: S.session, a: $("merge-a").value, b: $("merge-b").value, lam: Number($("merge-lam").value),
                 ties_density: Number($("merge-ties").value), dare_density: Number($("merge-dare").value),
                 seed: Number($("merge-seed").value) };
  try { drawBars(await api("POST", "/api/merge", body)); } catch (err) { $("merge-error").textContent = err.message; }
}

function drawBars(res) {
  const svg = $("bars");
  svg.replaceChildren();
  svg.dataset.done = "1";
  const W = 1300, H = 380, L = 46, R = 80, T = 34, B = 40;
  const colors = ["#3b6fd6", "#9b59b6", "#6b8e23"];
  const groups = res.rows, series = res.series;
  const gw = (W - L - R) / groups.length, bw = gw * 0.8 / series.length;
  const y = v => T + (H - T - B) * (1 - v);
  for (let v = 0; v <= 1.0001; v += 0.25) {
    svgEl(svg, "line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" });
    svgEl(svg, "text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2));
  }
  svgEl(svg, "line", { x1: L, x2: W - R, y1: y(1 / 8), y2: y(1 / 8), class: "chance" });
  svgEl(svg, "text", { x: W - R + 4, y: y(1 / 8) + 4 }, "chance 1/8");
  groups.forEach((row, i) => {
    series.forEach((name, j) => {
      const acc = row[name].acc, x0 = L + i * gw + gw * 0.1 + j * bw;
      svgEl(svg, "rect", { x: x0, y: y(acc), width: bw - 2, height: y(0) - y(acc), fill: colors[j], class: "bar" });
      svgEl(svg, "text", { x: x0 + bw / 2 - 1, y: y(acc) - 3, "text-anchor": "middle" }, acc.toFixed(2));
    });
    svgEl(svg, "text", { x: L + i * gw + gw / 2, y: H - B + 16, "text-anchor": "middle" }, row.method);
  });
  series.forEach((name, j) => {
    svgEl(svg, "rect", { x: L + 10 + j * 260, y: 8, width: 12, height: 12, fill: colors[j] });
    svgEl(svg, "text", { x: L + 26 + j * 260, y: 18, "font-size": "13" }, `${name} accuracy`);
  });
  const t = $("merge-table");
  t.replaceChildren();
  const head = el("tr");
  head.appendChild(el("th", {}, "merged model"));
  for (const name of series) { head.appendChild(el("th", {}, `${name} acc`)); head.appendChild(el("th", {}, "loss")); }
  t.appendChild(head);
  for (const row of groups) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, row.method));
    for (const name of series) { tr.appendChild(el("td", {}, fmt(row[name].acc, 2))); tr.appendChild(el("td", {}, fmt(row[name].loss))); }
    t.appendChild(tr);
  }
}

// ---------------------------------------------------------------------------- start

function showView(name) {
  document.querySelectorAll("#tabs button").forEach(b => b.classList.toggle("on", b.dataset.view === name));
  document.querySelectorAll(".view").forEach(v => v.classList.toggle("on", v.id === `view-${name}`));
  if (name === "failures" && !S.fmStarted) startFailureModes();
}

async function pollStatus() {
  await refreshStatus();
  setTimeout(pollStatus, 2000);
}

async function refreshStatus() {
  try {
    const st = await api("GET", "/api/status");
    $("server-status").textContent = (st.base_ready ? "base model ready" : "pretraining the base model (≈10 s)…") +
      ` · ${st.active} run(s) queued or running (at most ${st.max_runs} at once)`;
    $("server-status").dataset.ready = st.base_ready ? "1" : "0";
  } catch (err) { $("server-status").textContent = "server unreachable"; }
}

async function start() {
  S.config = await api("GET", "/api/config");
  S.session = (await api("POST", "/api/session")).session;
  document.body.dataset.session = S.session;
  buildControls();
  const es = new EventSource(`/api/events?session=${S.session}`);
  es.addEventListener("run", e => onRun(JSON.parse(e.data)));
  es.addEventListener("point", e => onPoint(JSON.parse(e.data)));
  window.addEventListener("pagehide", () => navigator.sendBeacon(`/api/session/${S.session}/close`));
  $("train").addEventListener("click", train);
  $("stop").addEventListener("click", stop);
  document.querySelectorAll("#tabs button").forEach(b => b.addEventListener("click", () => showView(b.dataset.view)));
  document.querySelectorAll("#fm-tabs button[data-mode]").forEach(b => b.addEventListener("click", () => {
    S.fmTab = b.dataset.mode;
    document.querySelectorAll("#fm-tabs button[data-mode]").forEach(o => o.classList.toggle("on", o === b));
    drawFailureModes();
  }));
  $("fm-run").addEventListener("click", startFailureModes);
  $("merge-go").addEventListener("click", merge);
  for (const id of ["merge-a", "merge-b"]) $(id).addEventListener("change", () => { $(id).dataset.user = "1"; });
  $("merge-pair").addEventListener("click", trainPair);
  redraw();
  pollStatus();
  document.body.dataset.ready = "1";
}

start();
