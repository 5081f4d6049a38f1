// llmtune UI: curves as SVG line charts, and the before -> after table.
"use strict";

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

  });
  return svg;
}

// The curves of a log history, as llmtune/observe/report.py's `curves` picks them (every numeric key but steps,
// timings and the end-of-run summary), grouped: loss (training and evaluation), the evaluation metrics together,
// and one chart for each other key (learning rate, gradient norm, GRPO's reward, kl, ...).
const GROUP_NAMES = {loss: "loss", learning_rate: "learning rate", grad_norm: "gradient norm",
                     throughput_tokens_per_second: "tokens / s", throughput_samples_per_second: "samples / s"};
const FINAL = /^(before|after|test)_/;

function curveGroups(logs) {
  const groups = {};
  const put = (group, name, step, value) => { ((groups[group] ||= {})[name] ||= []).push([step, value]); };
  for (const log of logs) {
    if ("train_loss" in log || Object.keys(log).some(key => FINAL.test(key))) continue;  // the run's summary
    for (const [key, value] of Object.entries(log)) {
      if (typeof value !== "number" || !Number.isFinite(value) || ["step", "epoch", "total_flos"].includes(key) ||
          (/(runtime|per_second|preparation_time)$/.test(key) && !key.startsWith("throughput_"))) continue;
      const evaluation = key.match(/^eval_(.+)$/);
      if (key === "loss") put("loss", "train", log.step, value);
      else if (evaluation) evaluation[1] === "loss" ? put("loss", "eval", log.step, value) : put("evaluation", evaluation[1], log.step, value);
      else put(GROUP_NAMES[key] || key, key, log.step, value);
    }
  }
  return groups;
}

function drawCharts(container, groupsByRun, maxSteps = 0) {
  // groupsByRun: {runName: curveGroups}; one chart per group, one line per run (and per series within a run)
  container.replaceChildren();
  const names = [...new Set(Object.values(groupsByRun).flatMap(g => Object.keys(g)))];
  const order = ["loss", "reward", "evaluation", "learning rate", "gradient norm"];  // then the rest, by name
  names.sort((a, b) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99) || a.localeCompare(b));
  const single = Object.keys(groupsByRun).length === 1;
  const steps = Object.values(groupsByRun).flatMap(g => Object.values(g).flatMap(s => Object.values(s).flat().map(p => p[0])));
  const domain = [0, Math.max(1, maxSteps, ...steps)];  // every chart on the same steps: the whole run's, from 0
  for (const group of names) {
    const series = [];
    for (const [run, groups] of Object.entries(groupsByRun)) {
      for (const [name, points] of Object.entries(groups[group] || {})) {
        series.push({name: single ? name : `${run} ${name}`, points});
      }
    }
    const legend = series.length > 1 ? el("div", {class: "legend"}, series.map((s, i) =>
      el("span", {}, el("i", {style: `background:${COLOURS[i % COLOURS.length]}`}), s.name))) : "";
    container.append(el("div", {class: "chart-box", id: `chart-${group.replace(/\W+/g, "-")}`}, lineChart(group, series, domain), legend));
  }
  if (!names.length) container.append(el("p", {class: "muted"}, "No curves yet: the first log comes after training.log_every steps."));
}

// Whether a change is an improvement: lower is better for losses and perplexity, higher for the rest.
function better(name, before, after) {
  return /(loss|perplexity)$/.test(name) ? after < before : after > before;
}

function headlineTable(headline) {
  const rows = Object.entries(headline || {});
  if (!rows.length) return el("p", {class: "muted"}, "No before -> after scores yet.");
  return el("table", {id: "headline-table", class: "table"},
    el("thead", {}, el("tr", {}, el("th", {}, "metric"), el("th", {}, "before"), el("th", {}, "after"), el("th", {}, "change"))),
    el("tbody", {}, rows.map(([name, v]) => el("tr", {"data-metric": name}, el("td", {}, name), el("td", {}, number(v.before)),
      el("td", {}, number(v.after)),
      el("td", {class: typeof v.before === "number" && v.after !== v.before ? (better(name, v.before, v.after) ? "up" : "down") : ""},
         typeof v.before === "number" ? (v.after - v.before >= 0 ? "+" : "") + number(v.after - v.before) : "")))));
}

