// CVPO dashboard: vanilla JS, no libraries, no network beyond this origin (works offline).
// The pages are public shells; every datum comes from the JSON API with the user's Bearer token.
// All text goes in through textContent (never innerHTML), so job labels and names cannot inject markup.
"use strict";

(() => {
  const TOKEN_KEY = "cvpo.token";
  const page = document.body.dataset.page;
  const pageId = document.body.dataset.id;
  const $ = (id) => document.getElementById(id);
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

  // ------------------------------------------------------------------ token
  // sessionStorage by default: the admin token lives only as long as the tab, so a shared or
  // unattended browser does not keep it on disk. "Remember" opts into localStorage.
  const getToken = () => sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY);
  const forgetToken = () => { sessionStorage.removeItem(TOKEN_KEY); localStorage.removeItem(TOKEN_KEY); };

  function askToken(message) {
    forgetToken();
    $("app").hidden = true;
    $("signout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (!value) { $("login-error").textContent = "Enter the API token."; return; }
    ($("remember").checked ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
    location.reload();
  });
  $("signout").addEventListener("click", () => { forgetToken(); location.reload(); });

  // ------------------------------------------------------------------ API
  class ApiError extends Error {
    constructor(status, problem) {
      super(describeProblem(status, problem));
      this.status = status;
      this.problem = problem;
    }
  }

  function describeProblem(status, p) {
    const head = `${status} ${p.title || ""}: ${p.detail || "request failed"}`.trim();
    const lines = (p.errors || []).map((e) => `• ${(e.loc || []).filter((x) => x !== "body").join(".")}: ${e.msg}`);
    return [head, ...lines].join("\n");
  }

  async function api(path, opts = {}) {
    const headers = { Authorization: `Bearer ${getToken()}`, ...(opts.headers || {}) };
    let body;
    if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
    const res = await fetch(path, { method: opts.method || "GET", headers, body, signal: opts.signal });
    if (res.status === 401) {
      askToken("The service refused this token (401). Enter a valid one.");
      throw new ApiError(401, { detail: "unauthorized" });
    }
    if (!res.ok) {
      let problem = {};
      try { problem = await res.json(); } catch { /* not JSON */ }
      throw new ApiError(res.status, problem);
    }
    if (opts.raw) return res;
    return res.status === 204 ? null : res.json();
  }

  // Idempotency keys make a retried submit safe; crypto.randomUUID needs a secure context, this does not.
  const newKey = () => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

  // ------------------------------------------------------------------ DOM helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function fmt(v, digits = 2) {
    if (v === null || v === undefined) return "—";
    if (typeof v !== "number") return String(v);
    if (Math.abs(v) >= 1000) return v.toLocaleString("en-US", { maximumFractionDigits: 0 });
    return v.toFixed(digits);
  }
  const fmtSteps = (v) => (v >= 1e6 ? `${+(v / 1e6).toFixed(2)}M` : v >= 1e3 ? `${+(v / 1e3).toFixed(1)}k` : String(v));
  // Local time as YYYY-MM-DD HH:MM:SS: compact, sortable and unambiguous in any locale.
  const pad = (n) => String(n).padStart(2, "0");
  const localTime = (d) => `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const timeEl = (iso) => (iso ? el("time", { datetime: iso, title: iso, text: localTime(new Date(iso)) }) : "—");
  const sourceText = (src) => `from ${src.checkpoint_id || "the best checkpoint"} (epoch ${src.epoch ?? "?"})`;
  const badge = (status) => el("span", { class: `badge s-${status}`, text: status });

  function flash(...parts) {
    const f = $("flash");
    f.replaceChildren(...parts);
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => f.replaceChildren(), 8000);
  }

  function kv(dl, rows) {
    dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
  }

  // Cost over its limit is red and says so in words (colour alone is not enough).
  function costNode(cost, limit) {
    const over = typeof cost === "number" && typeof limit === "number" && cost > limit;
    const text = limit === null || limit === undefined ? fmt(cost) : `${fmt(cost)} / ${fmt(limit, 1)}`;
    return el("span", over ? { class: "over", title: "above the cost limit" } : {}, text, over ? " (over)" : "");
  }

  // Certificates (README "Serving policies"): the decision as a badge in words, the numbers as a table.
  function certBadge(certified, override) {
    const text = certified ? "CERTIFIED" : override ? `NOT CERTIFIED (override: ${override.reason})` : "NOT CERTIFIED";
    return el("span", { class: `badge s-${certified ? "certified" : "not-certified"}`, text });
  }

  function certNode(cert, idPrefix) {
    if (!cert) return el("p", { class: "hint", text: "No certificate: this policy was registered before certification existed." });
    const rows = (cert.constraints || []).map((c) => {
      const over = c.limit !== null && c.cost_upper_bound > c.limit;
      return el("tr", {}, el("td", { text: c.signal }), el("td", { class: "num", text: fmt(c.limit) }),
        el("td", { class: "num", text: fmt(c.cost_mean) }),
        el("td", { class: over ? "num over" : "num", text: fmt(c.cost_upper_bound) + (over ? " (over)" : "") }),
        el("td", { class: "num", text: fmt(c.within_limit_share) }),
        el("td", { class: "num", text: fmt(c.stochastic_cost_mean) }));
    });
    const pct = `${Math.round((cert.confidence || 0.95) * 100)} %`;
    const table = el("table", { id: `${idPrefix}-constraints` },
      el("thead", {}, el("tr", {}, ...["Constraint", "Limit", "Mean cost", `${pct} upper bound`, "Share within limit", "Sampled-action mean"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...rows));
    const dl = el("dl", { class: "kv", id: `${idPrefix}-facts` });
    const seeds = cert.seeds || {};
    kv(dl, [
      ["Decision", certBadge(cert.certified, null)],
      ["Episodes", `${cert.episodes} deterministic (seeds ${seeds.base}…${seeds.base + cert.episodes - 1}), ${cert.stochastic_episodes ?? 0} sampled`],
      ["Task", cert.env_id], ["Return", cert.return_ci ? `${fmt(cert.return_mean)} (CI ${fmt(cert.return_ci[0])} … ${fmt(cert.return_ci[1])})` : fmt(cert.return_mean)],
      ["Interval", cert.interval || "—"],
    ]);
    const out = el("div", {}, dl, el("div", { class: "table-wrap" }, table));
    // Cost critic calibration on the certification episodes (artefacts that carry the critic).
    const cal = cert.critic_calibration;
    if (cal) {
      out.append(el("p", { id: `${idPrefix}-critic-calibration`, text: `Cost critic at the start states (${cal.episodes} episodes, γ ${cal.gamma}): ` +
        cal.constraints.map((c) => `${c.signal} predicted ${fmt(c.predicted_mean)} vs realised ${fmt(c.realised_mean)} (discounted)`).join("; ") }));
    }
    return out;
  }

  function loop(fn, periodMs) {
    let stopped = false;
    const tick = async () => {
      if (stopped) return;
      if (document.visibilityState !== "hidden") { try { await fn(); } catch (e) { if (e.status === 401) return; } }
      setTimeout(tick, periodMs);
    };
    tick();
    return () => { stopped = true; };
  }

  // ------------------------------------------------------------------ SVG line chart
  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    return n;
  }

  function niceTicks(lo, hi, count = 5) {
    if (lo === hi) { lo -= 1; hi += 1; }
    const raw = (hi - lo) / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const start = Math.floor(lo / step) * step;
    const ticks = [];
    for (let t = start; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
    if (ticks[ticks.length - 1] < hi) ticks.push(+(ticks[ticks.length - 1] + step).toFixed(10));
    return ticks;
  }

  // series: [{name, cls, points: [[x, y]], dashed?}]; the first series is the one counted in data-points.
  function drawChart(container, series, label) {
    const W = 420, H = 240, L = 52, R = 12, T = 10, B = 30;
    const finite = (p) => Number.isFinite(p[0]) && Number.isFinite(p[1]);
    const all = series.flatMap((s) => s.points.filter(finite));
    const main = series[0].points.filter(finite);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "data-points": main.length });
    const last = main.length ? main[main.length - 1][1] : null;
    root.setAttribute("aria-label", `${label}: ${main.length} points${last === null ? "" : `, latest ${fmt(last)}`}`);
    if (!all.length) {
      const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" });
      t.textContent = "No points yet";
      root.append(t);
    } else {
      const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
      const xt = niceTicks(Math.min(0, ...xs), Math.max(...xs), 4);
      const yt = niceTicks(Math.min(...ys), Math.max(...ys), 4);
      const [x0, x1, y0, y1] = [xt[0], xt[xt.length - 1], yt[0], yt[yt.length - 1]];
      const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
      const sy = (y) => H - B - ((y - y0) / (y1 - y0 || 1)) * (H - T - B);
      const step = yt[1] - yt[0];
      const digits = Number.isInteger(step) ? 0 : Math.min(4, Math.max(0, Math.ceil(-Math.log10(step)) + 1));
      for (const y of yt) {
        root.append(svg("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "gridline" }));
        const t = svg("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" });
        t.textContent = fmt(y, digits);
        root.append(t);
      }
      for (const x of xt) {
        const t = svg("text", { x: sx(x), y: H - B + 16, "text-anchor": "middle" });
        t.textContent = fmtSteps(x);
        root.append(t);
      }
      root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
      root.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
      for (const s of series) {
        const pts = s.points.filter(finite);
        if (!pts.length) continue;
        const d = pts.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
        root.append(svg("path", { d, class: `line ${s.cls}` }));
        // Dots mark epochs while they are few enough to tell apart; long runs are plain lines.
        if (!s.dashed && pts.length <= 200) for (const p of pts) root.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: s.cls }));
      }
    }
    const legend = el("div", { class: "legend" },
      ...series.map((s) => el("span", {}, el("i", { class: `${s.cls}${s.dashed ? " dashed" : ""}` }), s.name)));
    container.replaceChildren(root, legend);
  }

  // ------------------------------------------------------------------ jobs page
  async function jobsPage() {
    const envSel = $("f-env"), presetSel = $("f-preset");
    const [envs, presets] = await Promise.all([api("/envs"), api("/presets")]);
    const tasks = new Map(envs.items.map((t) => [t.id, t]));
    const presetMap = new Map(presets.items.map((p) => [p.id, p]));
    const families = [...new Set(envs.items.map((t) => t.family))];
    envSel.replaceChildren(...families.map((f) => el("optgroup", { label: f },
      ...envs.items.filter((t) => t.family === f).map((t) => el("option", { value: t.id, text: t.id })))));
    envSel.value = tasks.has("SafetyPointGoal1-v0") ? "SafetyPointGoal1-v0" : envs.items[0].id;

    function describePreset() {
      const name = presetSel.value || tasks.get(envSel.value).preset;
      const p = presetMap.get(name);
      if (!p) { $("preset-info").textContent = "Preset: none (engine defaults)."; return; }
      const parts = Object.entries(p.settings || {}).map(([sec, vals]) =>
        `${sec}: ${Object.entries(vals).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ")}`);
      $("preset-info").textContent = `Preset ${name} (tasks ${(p.tasks || []).join(", ")}) — ${parts.join("; ")}`;
    }
    function onTask() {
      const t = tasks.get(envSel.value);
      $("f-limit").value = t.cost_limit;
      presetSel.replaceChildren(
        el("option", { value: "", text: `Task default (${t.preset || "none"})` }),
        ...presets.items.map((p) => el("option", { value: p.id, text: p.id })),
        el("option", { value: "none", text: "none (engine defaults)" }));
      describePreset();
    }
    envSel.addEventListener("change", onTask);
    presetSel.addEventListener("change", describePreset);
    onTask();

    let pendingKey = null;
    $("job-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const err = $("job-form-error");
      err.textContent = "";
      let spec;
      try { spec = readJobForm(); } catch (e) { err.textContent = e.message; return; }
      const button = $("submit-job");
      button.disabled = true;
      pendingKey = pendingKey || newKey();
      try {
        const job = await api("/jobs", { method: "POST", json: spec, headers: { "Idempotency-Key": pendingKey } });
        pendingKey = null;
        flash("Submitted ", el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, text: job.id }), ` (${job.status}).`);
        await refresh();
      } catch (e) {
        if (e instanceof ApiError) pendingKey = null; // the server answered: a new body needs a new key
        err.textContent = e.message;
      } finally {
        button.disabled = false;
      }
    });

    const tbody = $("jobs-table").tBodies[0];
    const rows = new Map();
    let wanted = 50;
    let more = false;
    let firstRefresh = true;
    $("jobs-more").addEventListener("click", () => { wanted += 50; refresh(); });

    function row(job) {
      let tr = rows.get(job.id);
      if (!tr) {
        const link = el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, text: job.id });
        tr = el("tr", { "data-job": job.id }, el("td", {}, link), ...Array.from({ length: 7 }, () => el("td")));
        rows.set(job.id, tr);
      }
      const c = tr.cells, latest = job.latest || {}, p = job.progress;
      const limit = latest.cost_limit ?? (job.cost_limits || [])[0];
      const frac = Math.max(0, Math.min(1, p.fraction || 0));
      c[1].replaceChildren(badge(job.status));
      c[2].textContent = job.env_id;
      c[3].replaceChildren(
        el("progress", { max: 1, value: frac, "aria-label": `Progress of ${job.id}` }),
        ` ${Math.round(frac * 100)}%`);
      c[4].className = c[5].className = "num";
      c[4].textContent = fmt(latest.eval_return);
      c[5].replaceChildren(costNode(latest.eval_cost, limit));
      c[6].textContent = `${job.attempt}/${job.max_attempts}`;
      c[7].replaceChildren(timeEl(job.created_at));
      return tr;
    }

    async function refresh() {
      const items = [];
      let token = null;
      do {
        const q = new URLSearchParams({ page_size: String(Math.min(100, wanted - items.length)) });
        if (token) q.set("page_token", token);
        const pageData = await api(`/jobs?${q}`);
        items.push(...pageData.items);
        token = pageData.next_page_token;
      } while (token && items.length < wanted);
      more = Boolean(token);
      const order = items.map(row);
      const seen = new Set(items.map((j) => j.id));
      for (const [id, tr] of rows) if (!seen.has(id)) { tr.remove(); rows.delete(id); }
      const current = Array.from(tbody.rows);
      if (current.length !== order.length || order.some((tr, i) => current[i] !== tr)) tbody.replaceChildren(...order);
      $("jobs-empty").hidden = items.length > 0;
      $("jobs-more").hidden = !more;
      $("jobs-updated").textContent = `(updated ${localTime(new Date()).slice(11)})`;
      if (firstRefresh && !items.length) $("new-job").open = true; // nothing to look at yet: offer the form
      firstRefresh = false;
    }

    loop(async () => {
      try { await refresh(); } catch (e) {
        if (e.status === 401) throw e;
        $("jobs-updated").textContent = `(update failed: ${e.message.split("\n")[0]})`;
      }
    }, 2000);
  }

  function readJobForm() {
    const num = (id, what, integer) => {
      const raw = $(id).value.trim();
      if (raw === "") return undefined;
      const v = Number(raw);
      if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) throw new Error(`${what}: enter ${integer ? "a whole number" : "a number"}.`);
      return v;
    };
    let hyper = {};
    const text = $("f-hyper").value.trim();
    if (text) {
      try { hyper = JSON.parse(text); } catch (e) { throw new Error(`Hyperparameters: not valid JSON (${e.message}).`); }
      if (typeof hyper !== "object" || hyper === null || Array.isArray(hyper)) throw new Error("Hyperparameters: give a JSON object.");
    }
    const spec = {
      env_id: $("f-env").value,
      total_env_steps: num("f-steps", "Total env steps", true),
      cost_limit: num("f-limit", "Cost limit", false),
      device: $("f-device").value,
      max_attempts: num("f-attempts", "Max attempts", true),
      hyperparams: hyper,
    };
    const seed = num("f-seed", "Seed", true);
    if (seed !== undefined) spec.seed = seed;
    const episodes = num("f-eval", "Eval episodes", true);
    if (episodes !== undefined) spec.eval = { episodes };
    if ($("f-preset").value) spec.preset = $("f-preset").value;
    for (const k of Object.keys(spec)) if (spec[k] === undefined) delete spec[k];
    return spec;
  }

  // ------------------------------------------------------------------ job page
  async function jobPage() {
    const id = pageId;
    const enc = encodeURIComponent(id);
    $("crumb-id").textContent = id;
    $("job-title").textContent = id;
    let job = null;
    const points = new Map(); // epoch → {env_step, eval_return, eval_cost, cost_limit, lambdas, train_*}
    let lastSeq = 0;
    let redrawQueued = false;

    // λ is solved per minibatch and its end-of-epoch value often sits at a bound: plot the epoch's mean
    // over its updates (cost_multiplier_i in the metrics) where the metrics have it.
    function epochMeanLambdas(v) {
      const out = [];
      for (let i = 0; `cost_multiplier_${i}` in v; i++) out.push(v[`cost_multiplier_${i}`]);
      return out.length ? out : null;
    }
    function fromHistory(p) {
      const v = p.values || {};
      return {
        epoch: p.epoch, env_step: p.env_step, eval_return: v.eval_return, eval_cost: v.eval_cost,
        train_return: v.train_return, train_cost: v.train_cost, eval_cost_stochastic: v.eval_cost_stochastic,
        cost_limit: (v.cost_limits || [])[0], lambdas: epochMeanLambdas(v) || v.cost_multipliers || [],
      };
    }
    function fromEvent(d) {
      return {
        epoch: d.epoch, env_step: d.env_step, eval_return: d.eval_return, eval_cost: d.eval_cost,
        train_return: d.train_return, train_cost: d.train_cost, cost_limit: d.cost_limit,
        eval_cost_stochastic: d.eval_cost_stochastic,
        lambdas: (d.lagrange_multipliers_mean && d.lagrange_multipliers_mean.length ? d.lagrange_multipliers_mean : null)
          || d.lagrange_multipliers || (d.lagrange_multiplier === undefined ? [] : [d.lagrange_multiplier]),
      };
    }
    // A resumed attempt rewrites epochs from its checkpoint on: a point for an epoch already shown with a
    // different env_step replaces that epoch and drops the later ones, as the store does.
    function addPoint(p) {
      const old = points.get(p.epoch);
      if (!old || old.env_step !== p.env_step) for (const e of [...points.keys()]) if (e >= p.epoch) points.delete(e);
      points.set(p.epoch, p);
      if (!redrawQueued) { redrawQueued = true; requestAnimationFrame(redraw); }
    }

    const tableBox = $("points-table").closest("details");
    tableBox.addEventListener("toggle", () => { if (tableBox.open) redraw(); });

    function redraw() {
      redrawQueued = false;
      const ps = [...points.values()].sort((a, b) => a.epoch - b.epoch);
      const xy = (key) => ps.map((p) => [p.env_step, p[key]]);
      drawChart($("chart-reward"), [
        { name: "eval return", cls: "reward", points: xy("eval_return") },
        { name: "train return", cls: "train", points: xy("train_return") },
      ], "Eval return");
      drawChart($("chart-cost"), [
        { name: "eval cost", cls: "cost", points: xy("eval_cost") },
        { name: "train cost", cls: "train", points: xy("train_cost") },
        { name: "eval cost (sampled actions)", cls: "train", dashed: true, points: xy("eval_cost_stochastic") },
        { name: "cost limit", cls: "limit", dashed: true, points: xy("cost_limit") },
      ], "Eval cost");
      const nl = Math.max(1, ...ps.map((p) => p.lambdas.length));
      drawChart($("chart-lambda"), Array.from({ length: nl }, (_, i) => ({
        name: nl > 1 ? `λ${i + 1}` : "λ", cls: i ? "train" : "lambda", points: ps.map((p) => [p.env_step, p.lambdas[i]]),
      })), "Lagrange multiplier");
      $("points-count").textContent = `(${ps.length} epoch${ps.length === 1 ? "" : "s"})`;
      if (!tableBox.open) return; // filled when opened: long runs have thousands of rows
      $("points-table").tBodies[0].replaceChildren(...ps.map((p) => el("tr", {},
        el("td", { text: p.epoch }), el("td", { class: "num", text: p.env_step }),
        el("td", { class: "num", text: fmt(p.eval_return) }), el("td", { class: "num" }, costNode(p.eval_cost, null)),
        el("td", { class: "num", text: fmt(p.cost_limit) }), el("td", { class: "num", text: p.lambdas.map((x) => fmt(x, 3)).join(", ") || "—" }))));
    }

    function renderJob(j) {
      job = j;
      const latest = j.latest || {}, p = j.progress, best = j.best;
      const limit = latest.cost_limit ?? (j.cost_limits || [])[0];
      $("job-status").replaceChildren(badge(j.status));
      kv($("job-summary"), [
        ["Task", j.env_id], ["Seed", String(j.spec.seed ?? "—")],
        ["Attempt", `${j.attempt}/${j.max_attempts}`], ["Epoch", String(p.epoch)],
        ["Eval return", fmt(latest.eval_return)], ["Eval cost / limit", costNode(latest.eval_cost, limit)],
        ["λ", (latest.lagrange_multipliers || []).map((x) => fmt(x, 3)).join(", ") || "—"],
        ["Eval cost, sampled actions", fmt(latest.eval_cost_stochastic)],
        ["Policy σ (mean)", fmt(latest.policy_std, 3)],
        ["Safety margin δ", latest.margin == null ? "—" : `${fmt(latest.margin, 3)} (trained against ${(latest.effective_cost_limits || []).map((x) => fmt(x)).join(", ")})`],
        ["Cost critic: predicted / realised", latest.critic_cost_predicted == null ? "—" : `${fmt(latest.critic_cost_predicted, 2)} / ${fmt(latest.critic_cost_realised, 2)}`],
        ["λ at floor / at cap (share of updates)", latest.lambda_at_floor_share == null ? "—" : `${fmt(latest.lambda_at_floor_share, 2)} / ${fmt(latest.lambda_at_cap_share, 2)}`],
        ["Max E-step KL", fmt(latest.estep_kl_max, 4)],
        ["Validated choice (loop.select)", latest.selected_epoch == null ? "—" : `epoch ${latest.selected_epoch}; this epoch: validation return ${fmt(latest.validation_return)}, cost ${fmt(latest.validation_cost)} (bound ${fmt(latest.validation_cost_bound)})`],
        ["Best", best ? `epoch ${best.epoch ?? "?"}: return ${fmt(best.eval_return)}, cost ${fmt(best.eval_cost)}` : "—"],
        ["Created", timeEl(j.created_at)], ["Started", timeEl(j.started_at)], ["Finished", timeEl(j.finished_at)],
        ["Env steps/s", fmt(p.env_steps_per_s, 0)],
      ]);
      setProgress(p.env_step, p.total_env_steps, p);
      $("job-failure").hidden = !j.failure;
      $("job-failure").textContent = j.failure ? `Failed (${j.failure.reason}): ${j.failure.message}` : "";
      $("cancel-job").hidden = TERMINAL.has(j.status);
      $("cancel-job").disabled = j.status === "cancelling";
      renderPromotion(j);
      $("job-spec").textContent = JSON.stringify(j.spec, null, 2);
      $("job-config").textContent = JSON.stringify(j.config, null, 2);
    }

    // The job's certification: the produced policy's certificate, or why no candidate became a policy.
    function renderPromotion(j) {
      const box = $("job-certificate");
      const pr = j.promotion;
      if (!pr) { box.replaceChildren(); return; }
      if (j.certificate) {
        box.replaceChildren(el("h3", { text: "Certificate of the promoted policy" }), certNode(j.certificate, "job-cert"));
        return;
      }
      const tried = (pr.candidates || []).map((c) => el("li", {},
        `${c.source} (${(c.roles || []).join(", ")}): `,
        c.error ? c.error : `${c.certified ? "certified" : "not certified"}, ` +
          (c.certificate ? c.certificate.constraints.map((k) => `${k.signal} upper bound ${fmt(k.cost_upper_bound)} / limit ${fmt(k.limit)}`).join("; ") : "")));
      box.replaceChildren(
        el("p", { class: "error", id: "promotion-reason", text: `No policy: ${pr.reason}` }),
        el("p", { class: "hint", text: "An admin can still promote a checkpoint below with an override reason." }),
        el("ul", { id: "promotion-candidates" }, ...tried));
    }

    // info: the job's progress block or a heartbeat's progress event (rate, ETA, phase) when known.
    function setProgress(step, total, info) {
      const frac = total ? Math.min(1, step / total) : 0;
      $("job-progress").value = frac;
      let text = `${step.toLocaleString("en-US")} / ${total.toLocaleString("en-US")} env steps (${Math.round(frac * 100)}%)`;
      const rate = info && info.env_steps_per_s;
      if (rate) text += `, ${fmt(rate, 0)} steps/s, ETA ${Math.max(0, Math.round((total - step) / rate))} s`;
      if (info && info.phase === "evaluating") text += " — evaluating";
      $("job-progress-text").textContent = text;
    }

    async function loadJob() { renderJob(await api(`/jobs/${enc}`)); }

    async function loadHistory() {
      let after = null;
      do {
        const q = new URLSearchParams({ limit: "1000" });
        if (after !== null) q.set("after_step", String(after));
        const data = await api(`/jobs/${enc}/metrics?${q}`);
        data.points.forEach((p) => addPoint(fromHistory(p)));
        after = data.next_after_step;
      } while (after !== null && after !== undefined);
    }

    async function loadPolicies() {
      const [pols, ckpts] = await Promise.all([api(`/policies?job_id=${enc}`), api(`/jobs/${enc}/checkpoints`)]);
      const list = $("job-policies");
      list.replaceChildren(...pols.items.map((p) => el("li", {},
        el("a", { href: `/ui/policies/${encodeURIComponent(p.id)}`, text: p.id }),
        ` — ${sourceText(p.source)}, eval return ${fmt(p.source.eval_return)}, cost `,
        costNode(p.source.eval_cost, (p.cost_limits || [])[0]), p.shield ? `, shield: ${p.shield.type}` : "", " ",
        certBadge(p.certified, p.override))));
      if (!pols.items.length) list.append(el("li", { class: "hint", text: "No policy yet: a succeeded job promotes its best certified checkpoint." }));
      const promotable = ckpts.items.filter((c) => c.promotable);
      const box = $("promote");
      box.replaceChildren();
      if (!promotable.length || !job || !TERMINAL.has(job.status)) return;
      const sel = el("select", { id: "promote-ckpt" }, el("option", { value: "best", text: "best (feasible, else lowest cost)" }),
        el("option", { value: "final", text: "final" }),
        ...promotable.map((c) => el("option", { value: c.id, text: `${c.id} (epoch ${c.epoch}, return ${fmt(c.eval_return)}, cost ${fmt(c.eval_cost)})` })));
      const button = el("button", { type: "submit", text: "Promote to a new policy" });
      const form = el("form", { class: "inline" }, el("label", { for: "promote-ckpt", text: "Checkpoint" }), sel, button);
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        button.disabled = true;
        try {
          const pol = await api("/policies", { method: "POST", json: { job_id: id, checkpoint_id: sel.value } });
          flash("Promoted ", el("a", { href: `/ui/policies/${encodeURIComponent(pol.id)}`, text: pol.id }), ".");
          await loadPolicies();
        } catch (e) { flash(e.message); } finally { button.disabled = false; }
      });
      box.append(form);
    }

    $("cancel-job").addEventListener("click", async () => {
      if (!window.confirm(`Cancel ${id}? Training stops at the next checkpoint.`)) return;
      try {
        renderJob(await api(`/jobs/${enc}/cancel`, { method: "POST" }));
        flash(`Cancel requested for ${id}.`);
      } catch (e) { flash(e.message); }
    });

    // Live updates: fetch() streams /events with the Authorization header (EventSource cannot send
    // one) and parses the SSE frames itself. After repeated failures it falls back to polling.
    function onEvent(type, data) {
      if (type === "metrics") {
        addPoint(fromEvent(data));
        if (job) setProgress(data.env_step, job.progress.total_env_steps);
      } else if (type === "progress") {
        // Between epoch ends the worker's heartbeat reports env steps, rate and phase.
        if (job) setProgress(data.env_step, job.progress.total_env_steps, data);
      } else if (type === "status" || type === "attempt") {
        if (data.status) $("job-status").replaceChildren(badge(data.status));
        if (TERMINAL.has(data.status)) $("stream-state").textContent = `Finished: ${data.status}.`;
        loadJob().catch(() => {}); // policies are listed once the stream has closed (follow)
      }
    }

    async function stream() {
      const headers = { Authorization: `Bearer ${getToken()}`, Accept: "text/event-stream" };
      if (lastSeq) headers["Last-Event-ID"] = String(lastSeq);
      const res = await fetch(`/jobs/${enc}/events`, { headers });
      if (res.status === 401) { askToken("The service refused this token (401)."); return "stop"; }
      if (!res.ok || !res.body) throw new Error(`events: HTTP ${res.status}`);
      $("stream-state").textContent = "Live: streaming events.";
      document.body.dataset.live = "stream";
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return "ended";
        buf += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let type = "message", data = "", seq = null;
          for (const line of frame.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (field === "event") type = val;
            else if (field === "data") data += (data ? "\n" : "") + val;
            else if (field === "id") seq = Number(val);
          }
          if (seq !== null) lastSeq = seq;
          if (data) { try { onEvent(type, JSON.parse(data)); } catch (e) { console.warn("bad event", e); } }
        }
      }
    }

    async function follow() {
      let failures = 0;
      while (job && !TERMINAL.has(job.status)) {
        try {
          if ((await stream()) === "stop") return;
          failures = 0;
          await loadJob();
        } catch (e) {
          failures += 1;
          if (failures >= 3) { poll(); return; }
        }
        if (job && !TERMINAL.has(job.status)) await new Promise((r) => setTimeout(r, 1000 * (failures + 1)));
      }
      $("stream-state").textContent = `Finished: ${job.status}.`;
      await loadPolicies();
    }

    function poll() {
      $("stream-state").textContent = "Live: polling every 3 s (event stream unavailable).";
      document.body.dataset.live = "poll";
      const stop = loop(async () => {
        const last = Math.max(-1, ...[...points.values()].map((p) => p.env_step));
        const q = last >= 0 ? `?after_step=${last}` : "";
        (await api(`/jobs/${enc}/metrics${q}`)).points.forEach((p) => addPoint(fromHistory(p)));
        await loadJob();
        if (TERMINAL.has(job.status)) { stop(); $("stream-state").textContent = `Finished: ${job.status}.`; await loadPolicies(); }
      }, 3000);
    }

    try {
      await loadJob();
    } catch (e) {
      if (e.status === 404) $("job-title").textContent = `No job ${id}`;
      $("job-failure").textContent = e.message;
      $("job-failure").hidden = false;
      return;
    }
    await loadHistory();
    redraw();
    await loadPolicies();
    if (!TERMINAL.has(job.status)) follow();
    else $("stream-state").textContent = `Finished: ${job.status}.`;
  }

  // ------------------------------------------------------------------ policy page
  async function policyPage() {
    const id = pageId;
    const enc = encodeURIComponent(id);
    $("crumb-id").textContent = id;
    $("policy-title").textContent = id;
    let pol;
    try {
      pol = await api(`/policies/${enc}`);
    } catch (e) {
      $("act-error").textContent = e.message;
      return;
    }
    const src = pol.source || {};
    const limit = (pol.cost_limits || [])[0];
    $("policy-ready").replaceChildren(el("span", { class: `badge s-${pol.ready ? "ready" : "not-ready"}`, text: pol.ready ? "ready" : "not ready" }));
    $("policy-certified").replaceChildren(certBadge(pol.certified, pol.override));
    const certBox = $("policy-certificate");
    certBox.replaceChildren(certNode(pol.certificate, "policy-cert"));
    if (pol.override) {
      certBox.prepend(el("p", { class: "error", id: "policy-override", text: `Promoted without certification by ${pol.override.actor} (${pol.override.at || ""}): ${pol.override.reason}` }));
    }
    if (src.job_id) {
      $("crumb-job").textContent = src.job_id;
      $("crumb-job").href = `/ui/jobs/${encodeURIComponent(src.job_id)}`;
    }
    const space = (s) => `shape [${s.shape.join(", ")}]` + (s.low ? `, low [${s.low.map((x) => fmt(x)).join(", ")}], high [${s.high.map((x) => fmt(x)).join(", ")}]` : "");
    const arch = pol.architecture ? Object.entries(pol.architecture).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ") : "—";
    kv($("policy-meta"), [
      ["Task", pol.env_id], ["Created", timeEl(pol.created_at)],
      ["Source job", src.job_id ? el("a", { href: `/ui/jobs/${encodeURIComponent(src.job_id)}`, text: src.job_id }) : "—"],
      ["Source", sourceText(src)],
      ["Eval return", fmt(src.eval_return)], ["Eval cost / limit", costNode(src.eval_cost, limit)],
      ["Cost limits", (pol.cost_limits || []).map((x) => fmt(x, 1)).join(", ") || "—"],
      ["Observation space", space(pol.observation_space)], ["Action space", space(pol.action_space)],
      ["Normaliser", pol.normalizer.present ? `frozen statistics, clip ±${pol.normalizer.clip}` : "none"],
      ["Max batch", String(pol.max_batch)], ["Architecture", arch], ["sha256", pol.sha256],
      ["Config hash", pol.config_hash || "—"],
      ["Cost critic", pol.has_cost_critic ? `${pol.cost_critic.members} member(s), γ ${pol.cost_critic.gamma}: /act can return cost_to_go` : "none"],
    ]);
    $("policy-shield").textContent = pol.shield
      ? Object.entries(pol.shield).map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`).join("\n")
      : "None: actions are only clipped to the action box.";
    $("policy-aliases").textContent = "No aliases: the service has no alias registry yet; refer to policies by id.";

    if (src.job_id) {
      api(`/policies?job_id=${encodeURIComponent(src.job_id)}`).then((data) => {
        $("policy-versions").replaceChildren(...data.items.map((p) => el("li", {},
          p.id === id ? el("strong", { "aria-current": "page", text: `${p.id} (this one)` })
            : el("a", { href: `/ui/policies/${encodeURIComponent(p.id)}`, text: p.id }),
          ` — ${sourceText(p.source)}, return ${fmt(p.source.eval_return)}, cost ${fmt(p.source.eval_cost)}${p.shield ? `, shield ${p.shield.type}` : ""}`)));
      }).catch((e) => { $("policy-versions").replaceChildren(el("li", { class: "error", text: e.message })); });
    }

    async function download(format) {
      const status = $("export-status");
      status.textContent = `Preparing ${format}…`;
      try {
        const res = await api(`/policies/${enc}/export?format=${format}`, { raw: true });
        const blob = await res.blob();
        const name = (/filename="([^"]+)"/.exec(res.headers.get("content-disposition") || "") || [])[1] || `${id}.${format === "onnx" ? "onnx" : "zip"}`;
        const a = el("a", { href: URL.createObjectURL(blob), download: name });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(a.href), 10000);
        status.textContent = `Downloaded ${name} (${(blob.size / 1024).toFixed(1)} KiB).`;
      } catch (e) { status.textContent = e.message; }
    }
    $("export-onnx").addEventListener("click", () => download("onnx"));
    $("export-bundle").addEventListener("click", () => download("bundle"));

    const obsDim = pol.observation_space.shape.reduce((a, b) => a * b, 1);
    $("act-dim").textContent = String(obsDim);
    const fill = (f) => { $("act-obs").value = Array.from({ length: obsDim }, f).join(", "); };
    fill(() => 0);
    $("act-zeros").addEventListener("click", () => fill(() => 0));
    $("act-random").addEventListener("click", () => fill(() => (Math.random() * 2 - 1).toFixed(3)));

    $("act-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const err = $("act-error");
      err.textContent = "";
      let rows;
      try { rows = parseObservations($("act-obs").value); } catch (e) { err.textContent = e.message; return; }
      const body = { observations: rows, deterministic: $("act-det").checked };
      const seed = $("act-seed").value.trim();
      if (seed !== "") body.seed = Number(seed);
      $("act-submit").disabled = true;
      try {
        const out = await api(`/policies/${enc}/act`, { method: "POST", json: body });
        renderAct(out);
      } catch (e) {
        err.textContent = e.message;
        $("act-result").replaceChildren();
      } finally { $("act-submit").disabled = false; }
    });
  }

  // Rows of numbers: a JSON array, or lines of comma/space separated numbers. Bad tokens are named here;
  // shape and finiteness are left to the server, whose 422 names the row and column.
  function parseObservations(text) {
    text = text.trim();
    if (!text) throw new Error("Enter an observation.");
    if (text.startsWith("[")) {
      let v;
      try { v = JSON.parse(text); } catch (e) { throw new Error(`Not valid JSON: ${e.message}`); }
      return Array.isArray(v[0]) ? v : [v];
    }
    return text.split("\n").filter((l) => l.trim()).map((line, r) => line.split(/[\s,]+/).filter(Boolean).map((tok, c) => {
      const v = Number(tok);
      if (!Number.isFinite(v)) throw new Error(`row ${r}, column ${c}: ${JSON.stringify(tok)} is not a finite number`);
      return v;
    }));
  }

  function renderAct(out) {
    const shield = out.shield;
    const head = el("tr", {}, el("th", { scope: "col", text: "Row" }), el("th", { scope: "col", text: "Action" }),
      el("th", { scope: "col", text: "Clipped to the box" }), shield ? el("th", { scope: "col", text: "Shielded" }) : null);
    const body = out.actions.map((a, i) => el("tr", {}, el("td", { text: String(i) }),
      el("td", { class: "mono", text: `[${a.map((x) => x.toFixed(4)).join(", ")}]` }),
      el("td", { class: out.clipped[i] ? "over" : "", text: out.clipped[i] ? "yes" : "no" }),
      shield ? el("td", { class: shield.applied[i] ? "over" : "", text: shield.applied[i] ? `yes${shield.reasons[i] ? `: ${shield.reasons[i]}` : ""}` : "no" }) : null));
    $("act-result").replaceChildren(
      el("table", { class: "act-out", id: "act-table" }, el("thead", {}, head), el("tbody", {}, ...body)),
      el("p", { class: "hint", text: `${out.deterministic ? "Deterministic (mean)" : "Sampled"} action from artefact ${out.artefact_sha256.slice(0, 12)}…${shield ? "" : "; this policy has no shield"}.` }));
  }

  // ------------------------------------------------------------------ start
  const pages = { jobs: jobsPage, job: jobPage, policy: policyPage };
  if (!getToken()) { askToken(); return; }
  $("app").hidden = false;
  $("signout").hidden = false;
  pages[page]().catch((e) => { if (e.status !== 401) flash(e.message); });
})();
