// flowsession's web UI: small scripts over the REST API (/api/...) and its server-sent events.
// The API token is in an HttpOnly cookie; each change carries the page's CSRF token.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const csrf = () => $('meta[name="csrf-token"]').content;
const enc = encodeURIComponent;

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}
const show = (v) => typeof v === "string" ? v : JSON.stringify(v, null, 1);

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status; this.hint = error.hint || ""; this.code = error.code || "";
  }
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf();
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch("/api" + path, opts);
  if (r.status === 401) { location.href = "/signin?next=" + enc(location.pathname + location.search); throw new ApiError(401, {}); }
  const data = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, (data && data.error) || { message: String(data) });
  return data;
}

function toast(text, bad = false) {
  const t = $("#toast");
  t.textContent = text; t.className = bad ? "show bad" : "show";
  clearTimeout(t._h); t._h = setTimeout(() => { t.className = ""; }, bad ? 9000 : 4000);
}
function errorText(e) { return e.hint ? `${e.message} — ${e.hint}` : e.message; }
function fail(e, where) {
  if (e.status === 401) return;
  if (where) { where.hidden = false; where.textContent = errorText(e); }
  toast(errorText(e), true);
}

// An operation (start, install, reset, run): its events as they come (SSE), then its outcome.
function follow(op, onEvent) {
  return new Promise((resolve) => {
    const es = new EventSource(`/api/operations/${enc(op.id)}/events`);
    es.onmessage = (m) => { try { onEvent && onEvent(JSON.parse(m.data)); } catch (_) {} };
    const done = async () => { es.close(); resolve(await api("GET", `/operations/${enc(op.id)}`)); };
    es.addEventListener("end", done);
    es.onerror = () => { if (es.readyState === EventSource.CLOSED) done(); };
  });
}

function fmtTime() {
  for (const c of $$("[data-time]")) {
    const t = parseFloat(c.dataset.time);
    if (t && !c.textContent) c.textContent = new Date(t * 1000).toLocaleString();
  }
}

// --- the flow page ---------------------------------------------------------------------------
function flowPage(root) {
  const flow = root.dataset.flow, F = `/flows/${enc(flow)}`;
  const stateEl = $("#session-state"), log = $("#oplog");
  let current = null, polling = null;

  function logLine(text) {
    $("#oplog-box").open = true;
    log.textContent += text + "\n"; log.scrollTop = log.scrollHeight;
  }
  function render(session) {
    current = session;
    const state = session ? session.state : "NOT_STARTED";
    stateEl.textContent = state; stateEl.className = "state st-" + state;
    const live = ["RUNNING", "INSTALLING", "RESETTING", "BUILDING", "STARTING", "STOPPING"].includes(state);
    if ($("#when-stopped")) $("#when-stopped").hidden = live;
    if ($("#when-running")) {
      $("#when-running").hidden = !live;
      $("#when-running summary").textContent = state === "RUNNING" ? "Compute session running" : `Compute session: ${state.toLowerCase()}`;
    }
    const info = $("#session-info");
    info.textContent = session && live ? [
      `session ${session.id}`, session.vm_size && `VM size ${session.vm_size}`,
      session.compute_type || session.compute_kind, session.image && `image ${session.image}`,
      session.idle_timeout_s && `idle time ${Math.round(session.idle_timeout_s / 60)} min`,
      session.reason].filter(Boolean).join(" · ") : (session && session.reason ? `last session: ${session.reason}` : "");
    imageNotice(live ? session : null);
    const transient = ["INSTALLING", "RESETTING", "BUILDING", "STARTING", "STOPPING"].includes(state);
    clearTimeout(polling);
    if (session) polling = setTimeout(refresh, transient ? 1000 : 5000);
  }
  let images = null;
  async function imageNotice(session) {  // a newer version of the session's image: say so
    const notice = $("#image-notice");
    if (!session || !session.image) { notice.hidden = true; return; }
    const [name, version] = session.image.split(/:(?=\d+$)/);
    try { images = images || await api("GET", "/images"); } catch (_) { return; }
    const newest = Math.max(...images.filter((i) => i.name === name && i.state === "READY").map((i) => i.version));
    notice.hidden = !(newest > +version);
    notice.textContent = `The image ${name} has a newer version (${newest}; this session uses ${version}): ` +
      "Change compute session settings or start again with advanced settings to use it.";
  }
  async function refresh() {
    try { render(await api("GET", `${F}/session`)); }
    catch (e) {  // none (404): nothing to follow until this page starts one
      if (e.status === 404) { render(null); clearTimeout(polling); } else polling = setTimeout(refresh, 5000);
    }
  }
  async function operation(promise, what) {
    log.textContent = ""; $("#oplog-status").textContent = what;
    logLine(`${what}…`);
    try {
      const op = await promise;
      const end = await follow(op, (ev) => {
        if (ev.event === "heartbeat") return;
        if (ev.message) logLine(ev.message);
        if (ev.state) { stateEl.textContent = ev.state; stateEl.className = "state st-" + ev.state; }
      });
      if (end.status === "failed") {
        logLine("failed: " + errorText(end.error || {}));
        if (end.error && end.error.log_tail) logLine(end.error.log_tail);
        toast(`${what} failed: ${errorText(end.error || {})}`, true);
      } else { logLine(`${what}: done`); toast(`${what}: done`); }
      $("#oplog-status").textContent = `${what}: ${end.status}`;
      return end;
    } catch (e) { fail(e); logLine("error: " + errorText(e)); }
    finally { refresh(); }
  }
  const start = (body) => operation(api("POST", `${F}/session`, body), "Starting the compute session");
  $("#start")?.addEventListener("click", () => start());
  $("#m-install")?.addEventListener("click", () => { $("#when-running").open = false; operation(api("POST", `${F}/session/install`), "Installing packages from requirements.txt"); });
  $("#m-reset")?.addEventListener("click", () => { $("#when-running").open = false; operation(api("POST", `${F}/session/reset`), "Resetting the compute session"); });
  $("#m-stop")?.addEventListener("click", async () => {
    $("#when-running").open = false;
    try { render(await api("POST", `${F}/session/stop`)); toast("Compute session stopped"); } catch (e) { fail(e); }
  });

  $("#m-logs")?.addEventListener("click", async () => {  // the supervisor's and workers' log
    $("#when-running").open = false;
    if (!current) return;
    try {
      const l = await api("GET", `/sessions/${enc(current.id)}/logs?tail_bytes=65536`);
      $("#oplog-status").textContent = `the log of session ${l.session_id} (${l.state})`;
      log.textContent = l.text || "(empty)"; $("#oplog-box").open = true; log.scrollTop = log.scrollHeight;
    } catch (e) { fail(e); }
  });

  // installed packages
  const pkgDialog = $("#packages");
  let pkgs = [];
  function drawPkgs() {
    const f = $("#pkg-filter").value.trim().toLowerCase();
    const rows = pkgs.filter((p) => !f || p.name.toLowerCase().includes(f));
    $("#pkg-count").textContent = `${rows.length} of ${pkgs.length} packages`;
    $("#pkg-table tbody").replaceChildren(...rows.map((p) => el("tr", { "data-origin": p.origin },
      el("td", { text: p.name }), el("td", { text: p.version }), el("td", { text: p.origin }))));
  }
  async function openPkgs() {
    if ($("#when-running")) $("#when-running").open = false;
    try { pkgs = await api("GET", `${F}/session/packages`); } catch (e) { return fail(e); }
    drawPkgs(); pkgDialog.showModal(); $("#pkg-filter").focus();
  }
  $("#m-packages")?.addEventListener("click", openPkgs);
  $("#m-packages-ro")?.addEventListener("click", openPkgs);
  $("#pkg-filter").addEventListener("input", drawPkgs);
  $("#pkg-close").addEventListener("click", () => pkgDialog.close());

  // the advanced settings wizard: compute -> base image -> review -> apply and start
  const wiz = $("#wizard");
  let step = 1, wizImages = [];
  const ctype = () => $('input[name="ctype"]:checked', wiz).value;
  function goto(n) {
    step = n;
    for (const s of $$(".step", wiz)) s.hidden = +s.dataset.step !== n;
    for (const s of $$(".steps li", wiz)) s.classList.toggle("on", +s.dataset.step === n);
    $("#w-back").disabled = n === 1; $("#w-next").hidden = n === 3; $("#w-apply").hidden = n !== 3;
    if (n === 3) {
      const b = wizardBody();
      $("#w-review").replaceChildren(...Object.entries({ "compute type": b.compute_type, ...b,
        image: b.image || "the flow's image (or the default)" })
        .filter(([k, v]) => v && k !== "compute_type" || k === "compute type")
        .flatMap(([k, v]) => [el("dt", { text: k.replace("_", " ") }), el("dd", { text: v })]));
    }
  }
  function wizardBody() {
    const b = { compute_type: ctype(), idle_time: $("#w-idle").value };
    if (b.compute_type === "serverless") {
      b.vm_size = $("#w-vm").value || undefined;
      const id = $("#w-identity").value; if (id && id !== "user") b.identity = id;
    } else b.instance = $("#w-instance").value || undefined;
    if ($('input[name="imgchoice"]:checked', wiz).value === "other" && $("#w-image").value)
      b.image = $("#w-image").value + ($("#w-image-version").value ? ":" + $("#w-image-version").value : "");
    return b;
  }
  function fillVersions() {
    const img = wizImages.find((i) => i.name === $("#w-image").value);
    const versions = wizImages.filter((i) => i.name === $("#w-image").value).map((i) => i.version);
    $("#w-image-version").replaceChildren(...versions.sort((a, b) => b - a).map((v) => el("option", { value: v, text: `${v}${img && img.version === v ? "" : ""}` })));
  }
  async function openWizard() {
    $("#w-error").hidden = true; goto(1); wiz.showModal();
    try {
      const [sizes, computes, imgs, ids] = await Promise.all([
        api("GET", "/computes/sizes"), api("GET", "/computes"), api("GET", "/images"),
        api("GET", "/identities").catch(() => [])]);
      $("#w-vm").replaceChildren(el("option", { value: "", text: "a size that fits (default)" }),
        ...sizes.sizes.map((s) => el("option", { value: s.name, text: `${s.name} — ${s.vcpu} vCPU, ${Math.round(s.memory_bytes / 2 ** 30)} GB` })));
      $("#w-quota").textContent = `vCPU quota: ${sizes.vcpu_in_use} in use of ${sizes.vcpu_quota}`;
      const inst = computes.filter((c) => c.kind === "instance");
      $("#w-instance").replaceChildren(...(inst.length ? inst.map((c) => el("option", { value: c.name, text: `${c.name} (${c.vm_size}, ${c.state})` }))
        : [el("option", { value: "", text: "no compute instance: create one on the Computes page" })]));
      $("#w-identity").replaceChildren(el("option", { value: "user", text: "user identity (yours)" }),
        ...ids.map((i) => el("option", { value: i.name, text: `managed identity ${i.name}` })));
      wizImages = imgs;
      const names = [...new Set(imgs.map((i) => i.name))];
      $("#w-image").replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
      fillVersions();
    } catch (e) { fail(e, $("#w-error")); }
  }
  $("#start-advanced")?.addEventListener("click", openWizard);
  for (const r of $$('input[name="ctype"]', wiz)) r.addEventListener("change", () => {
    for (const d of $$("[data-for]", wiz)) d.hidden = d.dataset.for !== ctype();
  });
  for (const r of $$('input[name="imgchoice"]', wiz)) r.addEventListener("change", () => {
    const other = $('input[name="imgchoice"]:checked', wiz).value === "other";
    $("#w-image").disabled = $("#w-image-version").disabled = !other;
  });
  $("#w-image").addEventListener("change", fillVersions);
  $("#w-next").addEventListener("click", () => goto(Math.min(3, step + 1)));
  $("#w-back").addEventListener("click", () => goto(Math.max(1, step - 1)));
  $("#w-cancel").addEventListener("click", () => wiz.close());
  $("#w-apply").addEventListener("click", () => { const b = wizardBody(); wiz.close(); start(b); });

  // change settings
  const sd = $("#settings");
  $("#m-settings")?.addEventListener("click", async () => {
    $("#when-running").open = false; $("#s-error").hidden = true;
    try {
      const sizes = await api("GET", "/computes/sizes");
      $("#s-vm").replaceChildren(el("option", { value: "", text: "unchanged" }), ...sizes.sizes.map((s) => el("option", { value: s.name, text: s.name })));
    } catch (e) { fail(e, $("#s-error")); }
    sd.showModal();
  });
  $("#s-cancel").addEventListener("click", () => sd.close());
  $("#s-apply").addEventListener("click", async () => {
    const body = {};
    if ($("#s-idle").value.trim()) body.idle_time = $("#s-idle").value.trim();
    if ($("#s-vm").value) body.vm_size = $("#s-vm").value;
    try { render(await api("PATCH", `${F}/session`, body)); sd.close(); toast("Settings applied"); }
    catch (e) { fail(e, $("#s-error")); }
  });

  // files: tree, editor, Save / Save and install / Save only
  const editor = $("#editor");
  let open = null;
  const isReq = (f) => f.endsWith("requirements.txt");
  for (const a of $$("#file-tree a")) a.addEventListener("click", async (ev) => {
    ev.preventDefault();
    try {
      const f = await api("GET", `${F}/files/${a.dataset.file.split("/").map(enc).join("/")}`);
      open = a.dataset.file; editor.value = f.content; editor.disabled = !+root.dataset.canEdit;
      $("#editor-label").textContent = `Editing ${open}`;
      for (const x of $$("#file-tree a")) x.classList.toggle("open", x === a);
      const req = isReq(open);
      if ($("#save")) { $("#save").hidden = req; $("#save").disabled = false;
        $("#save-install").hidden = !req; $("#save-only").hidden = !req; }
    } catch (e) { fail(e); }
  });
  async function save() {
    await api("PUT", `${F}/files/${open.split("/").map(enc).join("/")}`, { content: editor.value });
    toast(`Saved ${open}`);
  }
  $("#save")?.addEventListener("click", () => save().catch(fail));
  $("#save-only")?.addEventListener("click", () => save().catch(fail));
  $("#save-install")?.addEventListener("click", async () => {
    try { await save(); } catch (e) { return fail(e); }
    if (!current || current.state !== "RUNNING") { toast(`Saved ${open}: it is installed when the compute session starts`); return; }
    operation(api("POST", `${F}/session/install`), "Installing packages from requirements.txt");
  });

  // test: inputs -> outputs and the trace per node
  $("#test-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const inputs = {};
    for (const f of $$("[data-type]", ev.target)) {
      const t = f.dataset.type, v = f.value;
      try {
        if (t === "all") { Object.assign(inputs, JSON.parse(v || "{}")); continue; }
        inputs[f.name] = ["list", "object"].includes(t) || f.tagName === "TEXTAREA" ? (v.trim() ? JSON.parse(v) : null)
          : t === "int" ? parseInt(v, 10) : t === "double" ? parseFloat(v) : t === "bool" ? v === "true" : v;
      } catch (_) { toast(`input ${f.name}: not valid JSON`, true); return; }
    }
    const out = $("#test-result");
    out.replaceChildren(el("p", { text: "Running one line… (a compute session starts if none runs)" }));
    for (const g of $$("#graph .node")) g.classList.remove("st-Completed", "st-Failed", "st-Bypassed");
    const t0 = performance.now();
    try {
      const r = await api("POST", `${F}/test`, { inputs, trace: true });
      out.replaceChildren(el("h3", { text: `Outputs (${((performance.now() - t0) / 1000).toFixed(2)} s)` }),
        el("pre", { class: "outputs", id: "test-outputs", text: show(r.outputs) }), traceTable(r.trace || []));
      for (const t of r.trace || []) $(`#graph .node[data-node="${CSS.escape(t.node)}"]`)?.classList.add("st-" + t.status);
    } catch (e) {
      out.replaceChildren(el("p", { class: "error", role: "alert", text: errorText(e) }));
    }
    refresh();
  });
  function traceTable(trace) {
    return el("table", { class: "grid", id: "trace" },
      el("caption", { text: "Trace: each node" }),
      el("thead", {}, el("tr", {}, ...["Node", "Status", "Duration", "Tokens", "Inputs", "Output"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...trace.map((t) => el("tr", { class: "st-" + t.status, "data-node": t.node },
        el("td", { text: t.node }), el("td", { text: t.status === "Bypassed" ? "Bypassed (skipped)" : t.status }),
        el("td", { text: t.duration == null ? "" : `${(t.duration * 1000).toFixed(1)} ms` }),
        el("td", { text: t.tokens && t.tokens.total_tokens != null ? `${t.tokens.total_tokens} (${t.tokens.prompt_tokens ?? "?"} + ${t.tokens.completion_tokens ?? "?"})` : "" }),
        el("td", { class: "mono small", text: show(t.inputs) }),
        el("td", { class: "mono small", text: t.error ? t.error : show(t.output) })))));
  }

  // batch run: data, mapping (suggested from the data's columns), base run, variant, workers
  let uploadedLines = null;
  async function columnsOf(lines) {
    const cols = [...new Set(lines.slice(0, 50).flatMap((l) => Object.keys(l)))];
    $("#columns").replaceChildren(...cols.map((c) => el("option", { value: "${data." + c + "}" })));
    for (const i of $$("#mapping [data-input]")) {  // a column of the input's name; else the input's default
      if (cols.includes(i.dataset.input)) i.value = "${data." + i.dataset.input + "}";
      else if (i.value === "${data." + i.dataset.input + "}") i.value = "";
    }
    return cols;
  }
  const parseJsonl = (text) => text.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
  async function suggestFromFile() {
    const f = $("#run-data")?.value;
    if (!f || !f.endsWith(".jsonl")) return;
    try { columnsOf(parseJsonl((await api("GET", `${F}/files/${f.split("/").map(enc).join("/")}`)).content)); } catch (_) {}
  }
  $("#run-data")?.addEventListener("change", suggestFromFile);
  $("#submit-box")?.addEventListener("toggle", suggestFromFile);
  $("#run-upload")?.addEventListener("change", async (ev) => {
    const file = ev.target.files[0]; if (!file) return;
    try { uploadedLines = parseJsonl(await file.text()); $("#run-data").value = ""; columnsOf(uploadedLines); }
    catch (e) { toast(`${file.name}: not JSON lines (${e.message})`, true); }
  });
  $("#run-form")?.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { flow, column_mapping: {} };
    if ($("#run-data").value) body.data = $("#run-data").value;
    else if (uploadedLines) body.data_lines = uploadedLines;
    for (const i of $$("#mapping [data-input]")) if (i.value.trim()) body.column_mapping[i.dataset.input] = i.value.trim();
    if ($("#run-base").value) body.run = $("#run-base").value;
    if ($("#run-variant").value.trim()) body.variant = $("#run-variant").value.trim();
    if ($("#run-workers").value) body.workers = parseInt($("#run-workers").value, 10);
    if ($("#run-name").value.trim()) body.name = $("#run-name").value.trim();
    try {
      const r = await api("POST", "/runs", body);
      location.href = `/runs/${enc(r.run.name)}`;
    } catch (e) { fail(e); }
  });
  render(JSON.parse(root.dataset.session || "null"));  // as the page was rendered: no request
}

// --- the run page ----------------------------------------------------------------------------
function runPage(root) {
  const name = root.dataset.run, R = `/runs/${enc(name)}`, size = +root.dataset.pageSize;
  let page = 0, t0 = Date.now(), done0 = null;
  function progress(run) {
    const done = run.completed + run.failed;
    $("#run-status").textContent = run.status; $("#run-status").className = "status s-" + run.status;
    const p = $("#run-progress"); p.max = run.total || 1; p.value = done;
    if (done0 === null) { done0 = done; t0 = Date.now(); }
    const secs = (Date.now() - t0) / 1000, rate = secs > 0.5 ? (done - done0) / secs : 0;
    const eta = rate > 0 ? Math.ceil((run.total - done) / rate) : null;
    $("#run-figures").textContent = `${run.completed} completed, ${run.failed} failed of ${run.total}` +
      (rate ? ` · ${rate.toFixed(1)} lines/s` : "") + (eta && !ended(run) ? ` · ETA ${eta} s` : "") +
      (run.duration ? ` · ${run.duration.toFixed(1)} s` : "");
    if ($("#run-cancel")) $("#run-cancel").hidden = ended(run);
  }
  const ended = (run) => ["Completed", "Failed", "Canceled"].includes(run.status);
  async function drawDetails() {  // one page from the API (size + 1 rows: is there a next one)
    const f = { all: "", failed: "&status=Failed", ok: "&status=Completed" }[$("#det-filter").value];
    let rows;
    try { rows = await api("GET", `${R}/details?offset=${page * size}&max_results=${size + 1}${f}`); }
    catch (e) { return fail(e); }
    $("#det-page").textContent = `page ${page + 1}`;
    $("#det-prev").disabled = page === 0; $("#det-next").disabled = rows.length <= size;
    $("#run-details tbody").replaceChildren(...rows.slice(0, size).map((d) =>
      el("tr", { class: d.status === "Failed" ? "bad" : "" },
        el("td", { text: d.line_number ?? "" }), el("td", { text: d.status || "" }),
        el("td", { class: "mono small", text: show(d.inputs ?? "") }),
        el("td", { class: "mono small", text: d.error ? show(d.error) : show(d.outputs ?? "") }),
        el("td", { text: d.duration != null ? `${(+d.duration).toFixed(3)} s` : "" }))));
  }
  async function loadAll() {
    drawDetails();
    try {
      const m = await api("GET", `${R}/metrics`);
      $("#run-metrics").replaceChildren(Object.keys(m).length ? el("table", { class: "grid", id: "metrics" },
        el("tbody", {}, ...Object.entries(m).map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: show(v) })))))
        : el("p", { text: "No metrics (the flow has no aggregation node, or the run has not ended)." }));
    } catch (e) { $("#run-metrics").textContent = errorText(e); }
    try {
      const logs = await api("GET", `${R}/logs`);
      $("#run-logs").replaceChildren(...logs.map((l) => el("details", {}, el("summary", { text: l.name }), el("pre", { class: "log", text: l.text.slice(-200000) }))));
    } catch (e) { $("#run-logs").textContent = errorText(e); }
  }
  $("#det-filter").addEventListener("change", () => { page = 0; drawDetails(); });
  $("#det-prev").addEventListener("click", () => { page--; drawDetails(); });
  $("#det-next").addEventListener("click", () => { page++; drawDetails(); });
  $("#run-cancel")?.addEventListener("click", async () => { try { progress(await api("POST", `${R}/cancel`)); } catch (e) { fail(e); } });
  const es = new EventSource(`/api${R}/events`);
  es.onmessage = (m) => { const run = JSON.parse(m.data); progress(run); if (ended(run)) loadAll(); };
  es.addEventListener("end", () => { es.close(); loadAll(); });
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) loadAll(); };
  loadAll();
}

// --- computes and admin ----------------------------------------------------------------------
function computesPage() {
  for (const b of $$("[data-compute-action]")) b.addEventListener("click", async () => {
    const n = enc(b.dataset.compute), a = b.dataset.computeAction;
    try { await api(a === "delete" ? "DELETE" : "POST", a === "delete" ? `/computes/${n}` : `/computes/${n}/${a}`); location.reload(); }
    catch (e) { fail(e); }
  });
  $("#compute-form")?.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try { await api("POST", "/computes", { name: $("#c-name").value, size: $("#c-size").value, idle_shutdown: $("#c-idle").value || undefined }); location.reload(); }
    catch (e) { fail(e); }
  });
}
function adminPage() {
  $("#user-form")?.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try { await api("POST", "/users", { name: $("#u-name").value, roles: [$("#u-role").value] }); location.reload(); } catch (e) { fail(e); }
  });
  $("#token-form")?.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const t = await api("POST", "/tokens", { label: $("#t-label").value });
      const p = $("#new-token"); p.hidden = false; p.textContent = `New token (shown once): ${t.token}`;
    } catch (e) { fail(e); }
  });
}

// the flow upload: a chosen folder's files keep their relative paths
function uploadForm(form) {
  form.addEventListener("submit", async (ev) => {
    const folder = $("[data-folder]", form);
    if (!folder.files.length) return;  // a zip or files: the plain form post
    ev.preventDefault();
    const fd = new FormData(form);
    fd.delete("files");
    for (const f of folder.files) fd.append("files", f, f.webkitRelativePath || f.name);
    for (const f of $("#flow-zip").files) fd.append("files", f, f.name);
    const r = await fetch(form.action, { method: "POST", body: fd });
    if (r.redirected) location.href = r.url;
    else { document.open(); document.write(await r.text()); document.close(); }
  });
}

// menus (<details class="menu">): Escape or a click elsewhere closes them
document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape") return;
  for (const m of $$("details.menu[open]")) { m.open = false; $("summary", m).focus(); }
});
document.addEventListener("click", (ev) => {
  for (const m of $$("details.menu[open]")) if (!m.contains(ev.target)) m.open = false;
});

document.addEventListener("DOMContentLoaded", () => {
  fmtTime();
  const f = $("#flow-page"); if (f) flowPage(f);
  const r = $("#run-page"); if (r) runPage(r);
  if ($("#computes")) computesPage();
  if ($("#users")) adminPage();
  const u = $("#upload"); if (u) uploadForm(u);
});
