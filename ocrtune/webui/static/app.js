"use strict";
// ocrtune web-ui: the Train, Runs and Checkpoint tabs. Everything goes through /api (same origin); a token,
// when the server wants one, is kept for this tab only (sessionStorage).
const $ = (s) => document.querySelector(s);
const state = { meta: null, runs: [], selected: null, source: null, log: [], token: sessionStorage.getItem("token") || "" };

async function api(path, body, raw) {
  const headers = {};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  let opts = { method: body === undefined ? "GET" : "POST", headers };
  if (raw) { opts.body = raw; }
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (r.status === 401) { $("#token-box").hidden = false; }
  if (!r.ok) { const e = new Error(data.error || `HTTP ${r.status}`); e.field = data.field; throw e; }
  return data;
}

function showGlobal(msg) { const g = $("#global-error"); g.textContent = msg || ""; g.hidden = !msg; }

// ---- tabs -------------------------------------------------------------------------------------------
document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {
  document.body.dataset.tab = b.dataset.tab;
  if (b.dataset.tab === "runs") refreshRuns();
  if (b.dataset.tab === "checkpoint") fillCheckpoints();
}));
$("#token-save").addEventListener("click", () => { state.token = $("#token").value.trim(); sessionStorage.setItem("token", state.token); start(); });

// ---- Train tab: the form is generated from the sft flags the server sends ------------------------------
function shown(v) { return v === null || v === undefined ? "" : typeof v === "boolean" ? String(v) : Array.isArray(v) ? v.join(" ") : String(v); }

function flagField(f) {
  const div = document.createElement("div");
  div.className = "flag";
  const id = "flag-" + f.name;
  const label = document.createElement("label");
  label.htmlFor = id; label.textContent = "--" + f.name;
  let input;
  const choices = f.type === "bool" ? ["true", "false"] : f.choices;
  if (choices) {
    input = document.createElement("select");
    const opts = f.default === null && f.type !== "bool" ? [""].concat(choices.map(String)) : choices.map(String);
    for (const c of opts) { const o = document.createElement("option"); o.value = c; o.textContent = c || "(default)"; input.append(o); }
  } else {
    input = document.createElement("input");
    input.placeholder = f.default === null ? "(default)" : "";
    if (f.name === "model") input.setAttribute("list", "model-names");
    if (f.name === "dataset" || f.name === "val_dataset") input.setAttribute("list", "dataset-names");
  }
  input.id = id; input.name = f.name; input.value = shown(f.default);
  input.dataset.default = shown(f.default);
  if (f.first_run !== null && f.first_run !== undefined) {  // the default model's own setting (applyModelDefaults)
    input.dataset.plain = shown(f.default); input.dataset.firstRun = shown(f.first_run);
  }
  input.addEventListener("input", () => { input.dataset.edited = "1"; });
  input.addEventListener("change", () => { input.dataset.edited = "1"; updateCommand(); });
  const help = document.createElement("div");
  help.className = "help";
  help.textContent = f.help + (f.allowed ? ` (${f.allowed})` : "") + (f.default !== null ? ` [default: ${shown(f.default)}]` : "")
    + (input.dataset.firstRun !== undefined ? ` [the bundled reader's first run: ${input.dataset.firstRun}]` : "");
  const err = document.createElement("span");
  err.className = "error field-error"; err.dataset.for = f.name; err.hidden = true;
  div.append(label, input, err, help);
  return div;
}

// With no --model (or the default model named) a run takes that model's first-run settings where no flag is given:
// the fields the user has not touched show them, and count as unchanged at them
function applyModelDefaults() {
  const model = ($("#flag-model") || { value: "" }).value.trim();
  const first = model === "" || model === state.meta.default_model;
  document.querySelectorAll("#train-form [data-first-run]").forEach((el) => {
    const value = first ? el.dataset.firstRun : el.dataset.plain;
    if (!el.dataset.edited) el.value = value;
    el.dataset.default = value;
  });
}

function formFlags() {
  const flags = {};
  document.querySelectorAll("#train-form [name]").forEach((el) => { if (el.value !== el.dataset.default) flags[el.name] = el.value; });
  return flags;
}

function clearFieldErrors(scope) { (scope || document).querySelectorAll(".field-error").forEach((e) => { e.hidden = true; e.textContent = ""; }); }
function fieldError(field, msg) {
  const el = field && document.querySelector(`.field-error[data-for="${field}"]`);
  if (el) { el.textContent = "error: " + msg; el.hidden = false; } else showGlobal("error: " + msg);
}

let commandSeq = 0;  // answers can come back out of order: only the newest request's answer is shown
async function updateCommand() {
  const seq = ++commandSeq;
  try {
    const r = await api("/api/command", { flags: formFlags() });
    if (seq !== commandSeq) return;
    clearFieldErrors($("#train")); showGlobal("");
    $("#command").textContent = r.command; document.body.dataset.command = "ok";
  } catch (e) {
    if (seq !== commandSeq) return;
    clearFieldErrors($("#train")); showGlobal("");
    fieldError(e.field, e.message); $("#command").textContent = ""; document.body.dataset.command = "error";
  }
}

$("#copy-command").addEventListener("click", async () => {
  try { await navigator.clipboard.writeText($("#command").textContent); $("#copy-command").textContent = "Copied"; }
  catch (e) { showGlobal("the browser refused the clipboard; select the command and copy it"); }
});

$("#launch").addEventListener("click", async () => {
  clearFieldErrors($("#train"));
  $("#launch-status").textContent = "starting…";
  try {
    const r = await api("/api/launch", { flags: formFlags() });
    $("#launch-status").textContent = "started: " + r.command;
    document.body.dataset.tab = "runs";
    state.followNew = true;
    refreshRuns();
  } catch (e) { $("#launch-status").textContent = ""; fieldError(e.field, e.message); }
});

$("#upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  clearFieldErrors($("#train"));
  $("#upload-status").textContent = "uploading…";
  try {
    const r = await api("/api/upload?name=" + encodeURIComponent(file.name), undefined, file);
    $("#upload-status").textContent = "uploaded: " + r.path;
    $("#flag-dataset").value = r.path; $("#flag-dataset").dataset.edited = "1"; updateCommand();
  } catch (e) { $("#upload-status").textContent = ""; fieldError("upload", e.message); }
});

// ---- Runs tab ---------------------------------------------------------------------------------------
function progressText(p) {
  if (!p || p.step === undefined) return "";
  const parts = [`step ${p.step}${p.max_steps ? "/" + p.max_steps : ""}`];
  if (p.eta) parts.push("ETA " + p.eta);
  if (p.samples_per_s !== null && p.samples_per_s !== undefined) parts.push(p.samples_per_s + " samples/s");
  if (p.loss !== undefined) parts.push("loss " + p.loss);
  return parts.join(" · ");
}

async function refreshRuns() {
  try { state.runs = (await api("/api/runs")).runs; } catch (e) { showGlobal("error: " + e.message); return; }
  const body = $("#run-table tbody");
  body.replaceChildren();
  for (const run of state.runs) {
    const tr = document.createElement("tr");
    tr.dataset.run = run.id; tr.dataset.status = run.status;
    if (run.id === state.selected) tr.className = "selected";
    const cells = [run.id, run.status + (run.error ? ": " + run.error : ""), progressText(run.progress)];
    cells.forEach((t, i) => { const td = document.createElement("td"); td.textContent = t; if (i === 1) td.className = "status-" + run.status; tr.append(td); });
    const td = document.createElement("td");
    if (!run.id.startsWith("job:")) { const b = document.createElement("button"); b.textContent = "Open"; b.className = "open"; b.addEventListener("click", () => selectRun(run.id)); td.append(b); }
    tr.append(td); body.append(tr);
  }
  const pending = state.runs.some((r) => r.status === "starting");
  if (state.followNew) {
    const fresh = state.runs.find((r) => !r.id.startsWith("job:") && r.status === "running");
    if (fresh) { state.followNew = false; selectRun(fresh.id); }
  }
  clearTimeout(state.runTimer);
  if (pending || state.followNew) state.runTimer = setTimeout(refreshRuns, 1500);  // until the run has its folder
}

function selectRun(id) {
  state.selected = id; state.log = [];
  if (state.source) state.source.close();
  $("#run-detail").hidden = false; $("#run-title").textContent = id;
  $("#confirm-delete").hidden = true; $("#run-action-status").textContent = "";
  document.querySelectorAll("#run-table tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.run === id));
  const q = "run=" + encodeURIComponent(id) + (state.token ? "&token=" + encodeURIComponent(state.token) : "");
  const src = new EventSource("/api/events?" + q);
  state.source = src;
  src.addEventListener("log", (ev) => { state.log.push(...JSON.parse(ev.data)); drawCharts(); });
  src.addEventListener("status", (ev) => showRun(JSON.parse(ev.data)));
  src.addEventListener("end", () => { src.close(); });
}

function showRun(run) {
  document.body.dataset.runStatus = run.status;
  $("#run-progress").textContent = progressText(run.progress);
  $("#run-error").textContent = run.error ? run.error : "";
  $("#stop").disabled = run.status !== "running";
  $("#resume").disabled = ["running", "finished"].includes(run.status) || !run.checkpoints.length;  // a finished run has nothing left
  $("#delete").disabled = run.status === "running";
  const tr = document.querySelector(`#run-table tr[data-run="${CSS.escape(run.id)}"]`);
  if (tr) { tr.dataset.status = run.status; tr.children[1].textContent = run.status + (run.error ? ": " + run.error : ""); tr.children[1].className = "status-" + run.status; tr.children[2].textContent = progressText(run.progress); }
}

function drawChart(canvas, series) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 36;
  ctx.clearRect(0, 0, W, H);
  const pts = series.flatMap((s) => s.points);
  canvas.dataset.points = String(series.map((s) => s.points.length).join(","));
  if (!pts.length) return;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y1 += Math.abs(y0) * 0.1 || 1; y0 -= Math.abs(y0) * 0.1 || 1; }
  const X = (x) => pad + (x - x0) / (x1 - x0) * (W - pad - 10), Y = (y) => H - pad + 10 - (y - y0) / (y1 - y0) * (H - pad - 10);
  ctx.strokeStyle = "#999"; ctx.fillStyle = "#444"; ctx.font = "11px sans-serif";
  ctx.beginPath(); ctx.moveTo(pad, 10); ctx.lineTo(pad, H - pad + 10); ctx.lineTo(W - 10, H - pad + 10); ctx.stroke();
  ctx.fillText(y1.toPrecision(3), 2, 16); ctx.fillText(y0.toPrecision(3), 2, H - pad + 8);
  ctx.fillText("step " + x0, pad, H - 8); ctx.fillText(String(x1), W - 30, H - 8);
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    s.points.forEach(([x, y]) => ctx.fillRect(X(x) - 2, Y(y) - 2, 4, 4));
  }
}

function drawCharts() {
  const train = state.log.filter((r) => r.loss !== undefined);
  const evals = state.log.filter((r) => r.eval_loss !== undefined);
  drawChart($("#chart-loss"), [{ color: "#06c", points: train.map((r) => [r.step, r.loss]) },
                                { color: "#d60", points: evals.map((r) => [r.step, r.eval_loss]) }]);
  drawChart($("#chart-lr"), [{ color: "#2a6", points: train.map((r) => [r.step, r.learning_rate]) }]);
}

async function runAction(path, extra) {
  $("#run-action-status").textContent = "";
  try {
    await api(path, { run: state.selected, ...extra });
    $("#run-action-status").textContent = "done";
    return true;
  } catch (e) { $("#run-action-status").textContent = "error: " + e.message; return false; }
}
$("#stop").addEventListener("click", async () => { if (await runAction("/api/stop")) $("#run-action-status").textContent = "stopping: the run saves its step…"; });
$("#resume").addEventListener("click", async () => { if (await runAction("/api/resume")) { setTimeout(() => selectRun(state.selected), 1500); refreshRuns(); } });
$("#delete").addEventListener("click", () => { $("#confirm-delete").hidden = false; });
$("#delete-no").addEventListener("click", () => { $("#confirm-delete").hidden = true; });
$("#delete-yes").addEventListener("click", async () => {
  if (await runAction("/api/delete", { confirm: true })) { if (state.source) state.source.close(); $("#run-detail").hidden = true; state.selected = null; refreshRuns(); }
  $("#confirm-delete").hidden = true;
});

// ---- Checkpoint tab ---------------------------------------------------------------------------------
async function fillCheckpoints() {
  try { state.runs = (await api("/api/runs")).runs; } catch (e) { showGlobal("error: " + e.message); return; }
  const sel = $("#ck-run"), keep = sel.value || state.selected;
  sel.replaceChildren();
  for (const r of state.runs.filter((r) => r.checkpoints.length)) { const o = document.createElement("option"); o.value = o.textContent = r.id; sel.append(o); }
  if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
  fillNames();
}
function fillNames() {
  const run = state.runs.find((r) => r.id === $("#ck-run").value);
  const sel = $("#ck-name"); sel.replaceChildren();
  for (const c of run ? run.checkpoints.slice().reverse().concat(run.merged) : []) { const o = document.createElement("option"); o.value = o.textContent = c; sel.append(o); }
}
$("#ck-run").addEventListener("change", fillNames);
const target = () => ({ run: $("#ck-run").value, checkpoint: $("#ck-name").value });

function render(el, latex) {
  el.replaceChildren();
  if (!window.katex) { el.textContent = latex; return; }
  try { katex.render(latex, el, { throwOnError: true, displayMode: true }); }
  catch (e) { const s = document.createElement("span"); s.className = "render-error"; s.textContent = e.message; el.append(s); }
}

$("#eval").addEventListener("click", async () => {
  clearFieldErrors($("#checkpoint"));
  $("#eval-status").textContent = "evaluating…"; document.body.dataset.eval = "busy";
  try {
    const r = await api("/api/eval", { ...target(), dataset: $("#eval-dataset").value, max_new_tokens: Number($("#eval-tokens").value) || 64 });
    const sum = $("#eval-summary"); sum.replaceChildren();
    for (const [k, v] of Object.entries(r.summary)) {
      if (typeof v !== "number") continue;
      const tr = document.createElement("tr"); tr.innerHTML = "<th></th><td></td>";
      tr.children[0].textContent = k; tr.children[1].textContent = String(v); tr.dataset.metric = k; sum.append(tr);
    }
    const body = $("#eval-rows tbody"); body.replaceChildren();
    for (const row of r.rows) {
      const tr = document.createElement("tr");
      for (const v of [row.index, row.reference, row.prediction, null, row.bleu4, row.edit_distance_char, row.exact_match]) {
        const td = document.createElement("td");
        if (v === null && tr.children.length === 3) render(td, row.prediction || ""); else td.textContent = v === null || v === undefined ? "" : String(v);
        tr.append(td);
      }
      body.append(tr);
    }
    $("#eval-status").textContent = "done"; document.body.dataset.eval = "done";
  } catch (e) { $("#eval-status").textContent = ""; fieldError("eval", e.message); document.body.dataset.eval = "error"; }
});

$("#merge").addEventListener("click", async () => {
  clearFieldErrors($("#checkpoint"));
  $("#merge-status").textContent = "merging…"; document.body.dataset.merge = "busy";
  try {
    const r = await api("/api/export", target());
    $("#merge-status").textContent = "merged: " + r.merged; document.body.dataset.merge = "done";
    fillCheckpoints();
  } catch (e) { $("#merge-status").textContent = ""; fieldError("merge", e.message); document.body.dataset.merge = "error"; }
});

async function ocr(file) {
  clearFieldErrors($("#checkpoint"));
  if (!file.type.startsWith("image/")) { fieldError("ocr", `${file.name} is not a supported image`); return; }
  const url = await new Promise((ok) => { const fr = new FileReader(); fr.onload = () => ok(fr.result); fr.readAsDataURL(file); });
  $("#ocr-preview").src = url; $("#ocr-preview").hidden = false;
  $("#ocr-status").textContent = "reading…"; document.body.dataset.ocr = "busy";
  try {
    const r = await api("/api/ocr", { ...target(), image: url });
    $("#ocr-latex").value = r.latex; render($("#ocr-render"), r.latex);
    $("#ocr-status").textContent = "done"; document.body.dataset.ocr = "done";
  } catch (e) { $("#ocr-status").textContent = ""; fieldError("ocr", e.message); document.body.dataset.ocr = "error"; }
}
$("#ocr-file").addEventListener("change", (ev) => ev.target.files[0] && ocr(ev.target.files[0]));
$("#ocr-latex").addEventListener("input", () => render($("#ocr-render"), $("#ocr-latex").value));
const drop = $("#drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); if (ev.dataTransfer.files[0]) ocr(ev.dataTransfer.files[0]); });

// ---- start ------------------------------------------------------------------------------------------
async function start() {
  try { state.meta = await api("/api/meta"); } catch (e) { showGlobal("error: " + e.message); return; }
  $("#token-box").hidden = !state.token;
  const lists = { "model-names": state.meta.models.map((m) => [m.name, m.source]).concat(state.meta.local_models.map((m) => [m, "merged checkpoint"])),
                  "dataset-names": state.meta.datasets.map((d) => [d.name, d.source + (d.rows ? " — rows: " + Object.entries(d.rows).map(([k, v]) => `${k} ${v}`).join(", ") : "")])
                    .concat(state.meta.uploads.map((u) => [state.meta.upload_dir + "/" + u, "uploaded"])) };
  for (const [id, items] of Object.entries(lists)) {
    let dl = document.getElementById(id);
    if (!dl) { dl = document.createElement("datalist"); dl.id = id; document.body.append(dl); }
    dl.replaceChildren(...items.map(([v, l]) => { const o = document.createElement("option"); o.value = v; o.label = l; return o; }));
  }
  const main = $("#main-flags"), more = $("#more-flags");
  main.replaceChildren(); more.replaceChildren();
  for (const f of state.meta.flags) (f.main ? main : more).append(flagField(f));
  applyModelDefaults();
  $("#flag-model").addEventListener("input", applyModelDefaults);
  $("#flag-model").addEventListener("change", () => { applyModelDefaults(); updateCommand(); });
  await updateCommand();
  await refreshRuns();
  document.body.dataset.ready = "1";
}
start();
