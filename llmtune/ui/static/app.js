// llmtune UI: one page over the JSON API in llmtune/ui/. No framework, no build step, nothing from the network.
"use strict";

const view = document.getElementById("view");
let cleanup = [];
// Actions carry X-Llmtune: a form or script on another site cannot send it (see llmtune/ui/app.py).
const ACTION_HEADERS = {"Content-Type": "application/json", "X-Llmtune": "1"};  // what the current view must stop (event streams, timers) when the user leaves it

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
  const options = body === undefined ? {} : {method: "POST", headers: ACTION_HEADERS, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  if (response.status === 401) { location.href = `/login${location.hash}`; throw new Error("Log in first."); }
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

// --- views ---------------------------------------------------------------------------------------------------

async function runsView() {
  const table = el("table", {id: "runs-table", class: "table"});
  const compare = el("button", {id: "compare-selected", onclick: () => {
    const picked = [...table.querySelectorAll("input[type=checkbox]:checked")].map(box => box.value);
    location.hash = `#/compare?runs=${encodeURIComponent(picked.join(","))}`;
  }}, "Compare selected");
  const folder = el("span", {class: "muted"});
  view.replaceChildren(el("div", {class: "toolbar"}, el("h1", {}, "Runs"), folder,
                          el("a", {class: "button primary", href: "#/new"}, "New run"), compare), table);
  let picked = new Set();
  const refresh = async () => {
    const data = await api("/api/runs");
    if (table.querySelector("tbody")) picked = new Set([...table.querySelectorAll("input:checked")].map(box => box.value));
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

// --- compare -------------------------------------------------------------------------------------------------

async function compareView(params) {
  const names = (params.get("runs") || "").split(",").filter(Boolean);  // URLSearchParams has decoded them
  if (!names.length) {
    view.replaceChildren(el("h1", {}, "Compare"), el("p", {class: "muted"}, "Tick runs in the Runs table and press Compare selected."));
    return;
  }
  const data = await api("/api/compare", {runs: names});
  const found = names.filter(n => n in data.runs);
  const charts = el("div", {id: "charts", class: "charts"});
  const metrics = [...new Set(Object.values(data.runs).flatMap(r => Object.keys(r.headline)))];
  view.replaceChildren(el("h1", {}, "Compare"),
    data.missing.length ? notice(`Not found in the runs folder (left out): ${data.missing.join(", ")}`, "info") : "",
    el("section", {}, el("h2", {}, "Curves"), charts),
    el("section", {}, el("h2", {}, "Scores: before -> after training"), el("table", {id: "compare-table", class: "table"},
      el("thead", {}, el("tr", {}, el("th", {}, "metric"), found.map(n => el("th", {}, n)))),
      el("tbody", {}, metrics.map(m => el("tr", {}, el("td", {}, m), found.map(n => {
        const v = data.runs[n].headline[m];
        return el("td", {}, v ? `${number(v.before)} -> ${number(v.after)}` : "-");
      })))))));
  drawCharts(charts, Object.fromEntries(found.map(n => [n, curveGroups(data.runs[n].history)])));
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
