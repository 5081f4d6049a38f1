// llmtune UI: one page over the JSON API in llmtune/ui/. No framework, no build step, nothing from the network.
"use strict";

const view = document.getElementById("view");
let cleanup = [];  // what the current view must stop (event streams, timers) when the user leaves it

// --- small helpers -------------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                             body: JSON.stringify(body)};
  const response = await fetch(path, options);
  if (response.status === 401) { location.href = "/login"; throw new Error("Log in first."); }
  const data = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok) throw new Error(data.error || errorText(data) || `${response.status} ${response.statusText}`);
  return data;
}

function errorText(data) {  // FastAPI's own validation errors: [{loc, msg}]
  if (Array.isArray(data.detail)) return data.detail.map(d => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ");
  return data.detail ? String(data.detail) : "";
}

function number(value) {
  if (typeof value !== "number") return value === null || value === undefined ? "-" : String(value);
  return Math.abs(value) >= 1e4 || (Math.abs(value) < 1e-3 && value !== 0) ? value.toExponential(2) : value.toFixed(4);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  seconds = Math.round(seconds);
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 60 ? `${minutes}m${String(seconds % 60).padStart(2, "0")}s`
                      : `${Math.floor(minutes / 60)}h${String(minutes % 60).padStart(2, "0")}m`;
}

function when(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleString([], {dateStyle: "short", timeStyle: "short"}) : "-";
}

function badge(state) { return el("span", {class: `state state-${state}`, "data-state": state}, state); }

function notice(text, kind = "error") { return el("div", {class: `notice ${kind}`}, text); }

function busy(button, promise) {
  button.disabled = true;
  return promise.finally(() => { button.disabled = false; });
}

// --- charts: SVG line charts, one per metric group, points added as they arrive -------------------------------

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

function lineChart(title, series, domain) {
  // series: [{name, points: [[x, y], ...]}]
  const width = 420, height = 220, pad = {left: 56, right: 12, top: 24, bottom: 30};
  const all = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("data-points", String(all.length));
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("text", {x: pad.left, y: 15, class: "chart-title"}, title);
  if (!all.length) { add("text", {x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted"}, "no points yet"); return svg; }
  let [x0, x1] = domain || [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const X = x => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const Y = y => height - pad.bottom - (y - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    add("line", {x1: pad.left, x2: width - pad.right, y1: Y(y), y2: Y(y), class: "grid"});
    add("text", {x: pad.left - 4, y: Y(y) + 4, "text-anchor": "end", class: "tick"}, number(y));
  }
  add("text", {x: pad.left, y: height - 8, class: "tick"}, `step ${x0}`);
  add("text", {x: width - pad.right, y: height - 8, "text-anchor": "end", class: "tick"}, `step ${x1}`);
  series.forEach((s, i) => {
    const points = s.points.filter(p => Number.isFinite(p[1]));
    const colour = COLOURS[i % COLOURS.length];
    if (points.length > 1) add("polyline", {points: points.map(p => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none",
                                            stroke: colour, "stroke-width": 2});
    for (const p of points.length <= 60 ? points : [points[points.length - 1]]) add("circle", {cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: colour});
    if (series.length > 1) add("text", {x: width - pad.right, y: pad.top + 12 * (i + 1), "text-anchor": "end", fill: colour, class: "tick"}, s.name);
  });
  return svg;
}

// Which curves a log history has: loss (training and evaluation), GRPO's reward, learning rate, gradient norm, and
// the evaluation metrics together in one chart. The before/after evaluations are the table's, not the curves'.
function curveGroups(logs) {
  const groups = {};
  const put = (group, name, step, value) => {
    if (typeof value !== "number" || !Number.isFinite(value)) return;
    ((groups[group] ||= {})[name] ||= []).push([step, value]);
  };
  for (const log of logs) {
    const step = log.step ?? 0;
    put("loss", "train", step, log.loss);
    put("reward", "reward", step, log.reward);
    put("learning rate", "lr", step, log.learning_rate);
    put("gradient norm", "grad norm", step, log.grad_norm);
    for (const [key, value] of Object.entries(log)) {
      const match = key.match(/^eval_(.+)$/);
      if (!match || /runtime|per_second|epoch$/.test(match[1])) continue;
      if (match[1] === "loss") put("loss", "eval", step, value); else put("evaluation", match[1], step, value);
    }
  }
  return groups;
}

function drawCharts(container, groupsByRun) {
  // groupsByRun: {runName: curveGroups}; one chart per group, one line per run (and per series within a run)
  container.replaceChildren();
  const names = [...new Set(Object.values(groupsByRun).flatMap(g => Object.keys(g)))];
  const order = ["loss", "reward", "evaluation", "learning rate", "gradient norm"];
  names.sort((a, b) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99) || a.localeCompare(b));
  const single = Object.keys(groupsByRun).length === 1;
  const steps = Object.values(groupsByRun).flatMap(g => Object.values(g).flatMap(s => Object.values(s).flat().map(p => p[0])));
  const domain = [0, Math.max(1, ...steps)];  // every chart on the same steps, from the start
  for (const group of names) {
    const series = [];
    for (const [run, groups] of Object.entries(groupsByRun)) {
      for (const [name, points] of Object.entries(groups[group] || {})) {
        series.push({name: single ? name : `${run} ${name}`, points});
      }
    }
    container.append(el("div", {class: "chart-box", id: `chart-${group.replace(/\W+/g, "-")}`}, lineChart(group, series, domain)));
  }
  if (!names.length) container.append(el("p", {class: "muted"}, "No curves yet: the first log comes after training.log_every steps."));
}

function headlineTable(headline) {
  const rows = Object.entries(headline || {});
  if (!rows.length) return el("p", {class: "muted"}, "No before -> after scores yet.");
  return el("table", {id: "headline-table", class: "table"},
    el("thead", {}, el("tr", {}, el("th", {}, "metric"), el("th", {}, "before"), el("th", {}, "after"), el("th", {}, "change"))),
    el("tbody", {}, rows.map(([name, v]) => el("tr", {"data-metric": name}, el("td", {}, name), el("td", {}, number(v.before)),
      el("td", {}, number(v.after)),
      el("td", {class: typeof v.before === "number" ? (v.after >= v.before ? "up" : "down") : ""},
         typeof v.before === "number" ? (v.after - v.before >= 0 ? "+" : "") + number(v.after - v.before) : "")))));
}

// --- views ---------------------------------------------------------------------------------------------------

async function runsView() {
  const table = el("table", {id: "runs-table", class: "table"});
  const compare = el("button", {id: "compare-selected", onclick: () => {
    const picked = [...table.querySelectorAll("input[type=checkbox]:checked")].map(box => box.value);
    location.hash = `#/compare?runs=${picked.map(encodeURIComponent).join(",")}`;
  }}, "Compare selected");
  const folder = el("span", {class: "muted"});
  view.replaceChildren(el("div", {class: "toolbar"}, el("h1", {}, "Runs"), folder,
                          el("a", {class: "button primary", href: "#/new"}, "New run"), compare), table);
  const picked = new Set();
  const refresh = async () => {
    const data = await api("/api/runs");
    table.querySelectorAll("input:checked").forEach(box => picked.add(box.value));
    folder.textContent = data.folder;
    table.replaceChildren(
      el("thead", {}, el("tr", {}, ["", "run", "state", "task", "model", "method", "precision", "started", "duration",
                                     "progress", "before -> after"].map(h => el("th", {}, h)))),
      el("tbody", {}, data.runs.length ? data.runs.map(run => {
        const scored = Object.entries(run.headline);  // the task's own metric first, the loss only without one
        const [metric, scores] = scored.find(([name]) => !name.endsWith("loss")) || scored[0] || [];
        return el("tr", {"data-run": run.name},
          el("td", {}, el("input", {type: "checkbox", value: run.name, checked: picked.has(run.name)})),
          el("td", {}, el("a", {href: `#/run/${encodeURIComponent(run.name)}`}, run.name)),
          el("td", {class: "state-cell"}, badge(run.state)), el("td", {}, run.task), el("td", {}, run.model),
          el("td", {}, run.method), el("td", {}, run.precision), el("td", {}, when(run.started)),
          el("td", {}, duration(run.duration)),
          el("td", {}, run.max_steps ? `${run.step}/${run.max_steps}` : "-"),
          el("td", {}, metric ? `${metric} ${number(scores.before)} -> ${number(scores.after)}` : "-"));
      }) : el("tr", {}, el("td", {colspan: 11, class: "muted"}, "No runs yet. Start one from New run."))));
  };
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  cleanup.push(() => clearInterval(timer));
}

async function runView(name) {
  const data = await api(`/api/runs/${encodeURIComponent(name)}`);
  let logs = data.history.slice();
  const state = el("span", {id: "run-state"});
  const stopButton = el("button", {id: "stop", class: "danger", onclick: () => {
    if (!confirm(`Stop ${name}? llmtune saves a checkpoint first; Resume continues from it.`)) return;
    busy(stopButton, api(`/api/runs/${encodeURIComponent(name)}/stop`, {})).catch(e => message.replaceChildren(notice(e.message)));
  }}, "Stop");
  const resumeButton = el("button", {id: "resume", onclick: () =>
    busy(resumeButton, api(`/api/runs/${encodeURIComponent(name)}/resume`, {})).catch(e => message.replaceChildren(notice(e.message)))}, "Resume");
  const progressBar = el("progress", {id: "progress-bar", max: 1, value: 0});
  const progressText = el("span", {id: "progress-text", class: "muted"});
  const message = el("div", {id: "run-message"});
  const charts = el("div", {id: "charts", class: "charts"});
  const headline = el("div", {id: "headline"});
  const log = el("pre", {id: "log", class: "log"});
  const details = el("div", {id: "run-details"});
  view.replaceChildren(
    el("div", {class: "toolbar"}, el("h1", {}, name), state, stopButton, resumeButton),
    el("div", {class: "progress"}, progressBar, progressText), message,
    el("section", {}, el("h2", {}, "Curves"), charts),
    el("section", {}, el("h2", {}, "Before -> after"), headline),
    details,
    el("section", {}, el("h2", {}, "Log"), log));
  const progress = (step, maxSteps, event) => {  // the bar's numbers, and how the run ended once it has
    progressBar.value = maxSteps ? step / maxSteps : 0;
    const parts = maxSteps ? [`step ${step}/${maxSteps} (${Math.round(step / maxSteps * 100)}%)`] : [];
    if (event === "evaluating") parts.push("evaluating");
    if (data.summary.exit_code !== null) parts.push(`exit code ${data.summary.exit_code}`);
    progressText.textContent = parts.join(", ");
  };
  const show = summary => {
    state.replaceChildren(badge(summary.state));
    stopButton.hidden = !["running", "starting"].includes(summary.state);
    resumeButton.hidden = !summary.can_resume;
    progress(summary.step, summary.max_steps, "");
    message.replaceChildren(summary.message ? notice(summary.message, summary.state === "stopped" ? "info" : "error") : "");
    headline.replaceChildren(headlineTable(summary.headline));
  };
  show(data.summary);
  drawCharts(charts, {[name]: curveGroups(logs)});
  log.textContent = data.log || "(no log: this run was started outside the UI)";
  details.replaceChildren(...runTools(name, data));
  const events = new EventSource(`/api/runs/${encodeURIComponent(name)}/events?offset=${data.offset}`);
  cleanup.push(() => events.close());
  events.onmessage = event => {
    const update = JSON.parse(event.data);
    if (update.summary) {
      const finishedNow = update.summary.state !== data.summary.state && update.summary.state === "finished";
      data.summary = update.summary;
      show(update.summary);
      if (finishedNow) api(`/api/runs/${encodeURIComponent(name)}`).then(fresh => details.replaceChildren(...runTools(name, fresh)));
    }
    if (update.progress) {
      const before = logs.length;
      for (const entry of update.progress) {  // as runs.add_logs: a (re)start at step S drops the logs after S
        if (entry.event === "begin") logs = logs.filter(log => log.step <= entry.step);
        else if (entry.log) logs.push({step: entry.step, ...entry.log});
      }
      if (logs.length !== before || update.progress.some(e => e.event === "begin")) drawCharts(charts, {[name]: curveGroups(logs)});
      const last = update.progress[update.progress.length - 1];
      if (last && last.max_steps) progress(last.step, last.max_steps, last.event);
    }
    if (update.log !== undefined) { log.textContent = update.log; log.scrollTop = log.scrollHeight; }
  };
}

function runTools(name, data) {
  const task = data.summary.task;
  const finished = data.summary.state === "finished";
  const sections = [];
  if (!finished) return sections;
  if (["sft", "pretrain", "dpo", "ipo", "kto", "orpo", "simpo", "grpo"].includes(task) || (data.record.recipe || {}).task === "sft")
    sections.push(chatSection(name));
  if (["classification", "image_classification", "distill"].includes(task)) sections.push(classifySection(name));
  sections.push(shipSection(name, task));
  return sections;
}

function chatSection(name) {
  const input = el("textarea", {id: "chat-input", rows: 3, placeholder: "Ask the model something"});
  const temperature = el("input", {id: "temperature", type: "number", min: 0, max: 5, step: 0.1, value: 0});
  const maxTokens = el("input", {id: "max-new-tokens", type: "number", min: 1, max: 2048, value: 64});
  const withBase = el("input", {id: "compare-base", type: "checkbox", checked: true});
  const reply = el("div", {id: "chat-reply", class: "reply"});
  const baseReply = el("div", {id: "base-reply", class: "reply"});
  const status = el("div", {id: "chat-status", class: "muted"});
  const history = [];
  const send = el("button", {id: "chat-send", class: "primary", onclick: async () => {
    const text = input.value.trim();
    if (!text) return;
    const messages = [...history, {role: "user", content: text}];
    const settings = {messages, temperature: Number(temperature.value), max_new_tokens: Number(maxTokens.value)};
    send.disabled = true;
    status.textContent = "generating...";
    try {
      const answer = await streamChat(name, settings, reply);
      history.push({role: "user", content: text}, {role: "assistant", content: answer});
      if (withBase.checked) { status.textContent = "base model..."; await streamChat(name, {...settings, base: true}, baseReply); }
      status.textContent = "";
    } catch (e) { status.replaceChildren(notice(e.message)); }
    finally { send.disabled = false; }
  }}, "Send");
  return el("section", {id: "try"}, el("h2", {}, "Try it"),
    el("div", {class: "row"}, input),
    el("div", {class: "row"}, el("label", {}, "temperature ", temperature), el("label", {}, "max new tokens ", maxTokens),
       el("label", {}, withBase, " base model beside it"), send),
    status,
    el("div", {class: "replies"}, el("div", {}, el("h3", {}, "this run"), reply), el("div", {}, el("h3", {}, "base model"), baseReply)));
}

async function streamChat(name, body, target) {
  target.textContent = "";
  const response = await fetch(`/api/runs/${encodeURIComponent(name)}/chat`, {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.error || errorText(data) || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (line === "[DONE]") continue;
      const event = JSON.parse(line);
      if (event.error) throw new Error(event.error.message);
      if (event.text) { text += event.text; target.textContent = text; }
      if (event.finish) target.setAttribute("data-finish", event.finish);
    }
  }
  return text;
}

function classifySection(name) {
  const input = el("textarea", {id: "classify-input", rows: 3, placeholder: "One text per line"});
  const output = el("div", {id: "classify-output"});
  const button = el("button", {id: "classify-button", class: "primary", onclick: () => busy(button,
    api(`/api/runs/${encodeURIComponent(name)}/classify`, {texts: input.value.split("\n").filter(t => t.trim())})
      .then(data => output.replaceChildren(el("table", {class: "table"},
        el("thead", {}, el("tr", {}, el("th", {}, "text"), el("th", {}, "label"), el("th", {}, "probabilities"))),
        el("tbody", {}, data.predictions.map(p => el("tr", {}, el("td", {}, p.text), el("td", {class: "label"}, p.label),
          el("td", {}, Object.entries(p.probabilities || {}).map(([label, prob]) =>
            el("div", {class: "prob"}, el("span", {}, label), el("meter", {value: prob, min: 0, max: 1}), number(prob))))))))))
      .catch(e => output.replaceChildren(notice(e.message))))}, "Classify");
  return el("section", {id: "try"}, el("h2", {}, "Try it"), input, el("div", {class: "row"}, button), output);
}

function shipSection(name, task) {
  const formats = ["classification", "distill"].includes(task) ? ["onnx"] : task === "image_classification" ? [] : ["gguf", "ollama"];
  const output = el("div", {id: "ship-output"});
  const shown = data => output.replaceChildren(el("div", {class: "notice info"},
    data.command ? el("pre", {}, data.command) : "", data.files ? el("ul", {}, data.files.map(f => el("li", {}, f))) : "",
    data.out ? el("p", {}, `merged into ${data.out} (largest logit difference ${number(data.max_logit_difference)})`) : "",
    data.url ? el("p", {}, data.url) : ""));
  const failed = e => output.replaceChildren(notice(e.message));
  const format = el("select", {id: "export-format"}, formats.map(f => el("option", {value: f}, f)));
  const quant = el("select", {id: "export-quant"}, ["", "f16", "q8_0"].map(q => el("option", {value: q}, q || "(default)")));
  const exportButton = el("button", {id: "export-button", onclick: () => busy(exportButton,
    api(`/api/runs/${encodeURIComponent(name)}/export`, {format: format.value, quant: quant.value || null}).then(shown).catch(failed))}, "Export");
  const mergeButton = el("button", {id: "merge-button", onclick: () => busy(mergeButton,
    api(`/api/runs/${encodeURIComponent(name)}/merge`, {}).then(shown).catch(failed))}, "Merge adapter");
  const repo = el("input", {id: "push-repo", placeholder: "you/model-name"});
  const pushButton = el("button", {id: "push-button", onclick: () => busy(pushButton,
    api(`/api/runs/${encodeURIComponent(name)}/push`, {repo_id: repo.value, private: true}).then(shown).catch(failed))}, "Push (private)");
  return el("section", {id: "ship"}, el("h2", {}, "Ship"),
    formats.length ? el("div", {class: "row"}, "Export as ", format, formats[0] === "onnx" ? "" : quant, exportButton) : "",
    el("div", {class: "row"}, mergeButton, el("span", {class: "muted"}, "an adapter run folded into its base, in a new folder beside it")),
    el("div", {class: "row"}, repo, pushButton), output);
}

// --- new run -------------------------------------------------------------------------------------------------

async function newRunView(params) {
  const [recipes, schema] = await Promise.all([api("/api/recipes"), api("/api/schema")]);
  const runs = (await api("/api/runs")).runs.filter(r => r.task);
  const select = el("select", {id: "recipe-select"},
    el("optgroup", {label: `recipes (${recipes.folder})`}, recipes.recipes.map(r => el("option", {value: r}, r))),
    runs.length ? el("optgroup", {label: "a previous run's recipe"}, runs.map(r => el("option", {value: `run:${r.name}`}, r.name))) : "");
  if (params.get("recipe")) select.value = params.get("recipe");
  const runName = el("input", {id: "run-name", placeholder: "(recipe name + time)"});
  const accelerate = el("select", {id: "accelerate"}, ["", "cpu_ddp", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
    .map(a => el("option", {value: a}, a || "one process")));
  const general = el("div", {id: "general-errors"});
  const yaml = el("pre", {id: "yaml", class: "code"});
  const command = el("pre", {id: "command", class: "code"});
  const planOut = el("pre", {id: "plan-output", class: "code", hidden: true});
  const previewOut = el("div", {id: "preview-output", class: "preview", hidden: true});
  const form = el("div", {id: "recipe-form"});
  const values = {};
  let own = {};
  const inputs = {};
  const sections = {};
  for (const field of schema.fields) {
    const input = field.kind === "bool" ? el("input", {type: "checkbox"}) :
      field.kind === "choice" ? el("select", {}, ["", ...field.choices].map(c => el("option", {value: c}, c === "" ? "(empty)" : c))) :
      el("input", {type: "text", spellcheck: "false"});
    input.setAttribute("data-key", field.key);
    input.id = `field-${field.key.replace(/\./g, "-")}`;
    input.addEventListener("change", () => { values[field.key] = read(input); changed(); });
    if (input.type === "text") input.addEventListener("input", () => { values[field.key] = read(input); changedSoon(); });
    inputs[field.key] = input;
    const row = el("div", {class: "field", "data-field": field.key},
      el("label", {for: input.id}, el("code", {}, field.key.split(".").slice(1).join(".") || field.key)), input,
      el("div", {class: "help"}, field.help, " ", el("span", {class: "valid"}, `(${field.valid}; default ${field.default || "empty"})`)),
      el("div", {class: "field-error", "data-key": field.key}));
    (sections[field.section] ||= []).push(row);
  }
  for (const [section, rows] of Object.entries(sections)) {
    form.append(el("details", {open: ["model", "data", "method", "training"].includes(section), "data-section": section},
                   el("summary", {}, section), rows));
  }
  function read(input) { return input.type === "checkbox" ? (input.checked ? "true" : "false") : input.value; }
  function fill() {
    for (const [key, input] of Object.entries(inputs)) {
      const value = values[key] ?? own[key] ?? "";
      if (input.type === "checkbox") input.checked = value === "true"; else input.value = value;
      input.classList.toggle("changed", values[key] !== undefined && values[key] !== own[key]);
    }
  }
  let timer = null;
  function changedSoon() { clearTimeout(timer); timer = setTimeout(changed, 300); }
  async function changed() {
    clearTimeout(timer);
    for (const [key, input] of Object.entries(inputs)) input.classList.toggle("changed", values[key] !== undefined && values[key] !== own[key]);
    const result = await api("/api/check", {recipe: select.value, values: changes()});
    for (const box of form.querySelectorAll(".field-error")) {
      const error = result.errors[box.getAttribute("data-key")];
      box.textContent = error || "";
      box.closest(".field").classList.toggle("invalid", Boolean(error));
      if (error) box.closest("details").open = true;
    }
    general.replaceChildren(...result.general.map(g => notice(g)));
    yaml.textContent = result.yaml;
    command.textContent = result.command + (accelerate.value ? ` --accelerate ${accelerate.value}` : "");
    launch.disabled = Object.keys(result.errors).length + result.general.length > 0;
    return result;
  }
  function changes() {
    const out = {};
    for (const [key, value] of Object.entries(values)) if (value !== own[key]) out[key] = value;
    return out;
  }
  async function load() {
    own = (await api("/api/form", {recipe: select.value, values: {}})).values;
    for (const key of Object.keys(values)) delete values[key];
    fill();
    await changed();
  }
  select.addEventListener("change", load);
  accelerate.addEventListener("change", changed);
  const launch = el("button", {id: "launch", class: "primary", onclick: () => busy(launch,
    api("/api/launch", {recipe: select.value, values: changes(), name: runName.value.trim() || null, accelerate: accelerate.value || null})
      .then(job => { location.hash = `#/run/${encodeURIComponent(job.name)}`; })
      .catch(e => general.replaceChildren(notice(e.message))))}, "Launch");
  const planButton = el("button", {id: "plan-button", onclick: () => { planOut.hidden = false; planOut.textContent = "planning (loads the model)...";
    busy(planButton, api("/api/plan", {recipe: select.value, values: changes()}).then(p => { planOut.textContent = p.text; })
      .catch(e => { planOut.textContent = e.message; })); }}, "Plan memory and time");
  const previewButton = el("button", {id: "preview-button", onclick: () => { previewOut.hidden = false; previewOut.textContent = "tokenizing...";
    busy(previewButton, api("/api/preview", {recipe: select.value, values: changes()}).then(p => previewOut.replaceChildren(...previewTokens(p.text)))
      .catch(e => previewOut.replaceChildren(notice(e.message)))); }}, "Preview data (loss mask)");
  view.replaceChildren(
    el("div", {class: "toolbar"}, el("h1", {}, "New run")),
    el("div", {class: "new-run"},
      el("div", {class: "form-column"},
        el("div", {class: "row"}, el("label", {}, "Start from ", select)),
        el("div", {class: "row"}, el("label", {}, "Run name ", runName), el("label", {}, "Processes ", accelerate)),
        general, form),
      el("div", {class: "side-column"},
        el("h3", {}, "Command"), command,
        el("div", {class: "row"}, launch, planButton, previewButton),
        planOut, previewOut,
        el("h3", {}, "Recipe as it will run"), yaml)));
  await load();
}

function previewTokens(text) {
  // `llmtune data preview` marks trained tokens as [[...]]: shown green, masked tokens grey
  return text.split("\n").map(line => {
    const row = el("div", {class: "preview-line"});
    let rest = line;
    while (rest.length) {
      const open = rest.indexOf("[["), close = open >= 0 ? rest.indexOf("]]", open + 2) : -1;
      if (open < 0 || close < 0) { row.append(el("span", {class: "masked"}, rest)); break; }
      if (open > 0) row.append(el("span", {class: "masked"}, rest.slice(0, open)));
      row.append(el("span", {class: "trained"}, rest.slice(open + 2, close)));
      rest = rest.slice(close + 2);
    }
    return row;
  });
}

// --- compare -------------------------------------------------------------------------------------------------

async function compareView(params) {
  const names = (params.get("runs") || "").split(",").filter(Boolean).map(decodeURIComponent);
  if (!names.length) {
    view.replaceChildren(el("h1", {}, "Compare"), el("p", {class: "muted"}, "Tick runs in the Runs table and press Compare selected."));
    return;
  }
  const data = await api("/api/compare", {runs: names});
  const charts = el("div", {id: "charts", class: "charts"});
  const metrics = [...new Set(Object.values(data.runs).flatMap(r => Object.keys(r.headline)))];
  view.replaceChildren(el("h1", {}, "Compare"), el("section", {}, el("h2", {}, "Curves"), charts),
    el("section", {}, el("h2", {}, "Metrics after training (before)"), el("table", {id: "compare-table", class: "table"},
      el("thead", {}, el("tr", {}, el("th", {}, "metric"), names.map(n => el("th", {}, n)))),
      el("tbody", {}, metrics.map(m => el("tr", {}, el("td", {}, m), names.map(n => {
        const v = data.runs[n].headline[m];
        return el("td", {}, v ? `${number(v.after)} (${number(v.before)})` : "-");
      })))))));
  drawCharts(charts, Object.fromEntries(names.map(n => [n, curveGroups(data.runs[n].history)])));
}

// --- routing -------------------------------------------------------------------------------------------------

async function route() {
  cleanup.forEach(stop => stop());
  cleanup = [];
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = (path || "/").split("/").filter(Boolean);
  document.querySelectorAll("[data-nav]").forEach(a => a.classList.toggle("active",
    a.getAttribute("data-nav") === (parts[0] || "runs") || (parts[0] === "run" && a.getAttribute("data-nav") === "runs")));
  try {
    if (parts[0] === "run" && parts[1]) await runView(decodeURIComponent(parts[1]));
    else if (parts[0] === "new") await newRunView(params);
    else if (parts[0] === "compare") await compareView(params);
    else await runsView();
  } catch (e) {
    view.replaceChildren(notice(e.message));
  }
}

window.addEventListener("hashchange", route);
route();
