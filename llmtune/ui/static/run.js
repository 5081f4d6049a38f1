// llmtune UI: one run - live progress, curves and log; stop / resume; try it (chat, classify); ship it.
"use strict";

async function runView(name) {
  const data = await api(`/api/runs/${encodeURIComponent(name)}`);
  const page = runPage(name, data);
  view.replaceChildren(page.root);
  page.show(data.summary);
  page.draw();
  const events = new EventSource(`/api/runs/${encodeURIComponent(name)}/events?offset=${data.offset}`);
  cleanup.push(() => events.close());
  const connection = document.getElementById("connection");
  events.onopen = () => { connection.textContent = ""; };
  events.onerror = () => {  // the browser reconnects by itself; a UI restarted with a key wants a new login
    connection.textContent = "connection lost - reconnecting...";
    api("/api/runs").catch(() => {});
  };
  events.onmessage = event => page.update(JSON.parse(event.data));
}

// The run's page: header (state, Stop / Kill / Resume), progress, curves, before -> after, tools, log.
function runPage(name, data) {
  let logs = data.history.slice();
  const url = `/api/runs/${encodeURIComponent(name)}`;
  const state = el("span", {id: "run-state"}), message = el("div", {id: "run-message"});
  const act = (button, action, question) => () => {
    if (question && !confirm(question)) return;
    busy(button, api(`${url}/${action}`, {})).catch(e => message.replaceChildren(notice(e.message)));
  };
  const stopButton = el("button", {id: "stop", class: "danger"}, "Stop");
  stopButton.onclick = act(stopButton, "stop", `Stop ${name}? llmtune saves a checkpoint first; Resume continues from it.`);
  const killButton = el("button", {id: "kill"}, "Kill");
  killButton.onclick = act(killButton, "kill", `Kill ${name} now (SIGKILL)? Use it when Stop gets no answer: the newest complete checkpoint stays, the steps since it are lost.`);
  const resumeButton = el("button", {id: "resume"}, "Resume");
  resumeButton.onclick = act(resumeButton, "resume");
  const progressBar = el("progress", {id: "progress-bar", max: 1, value: 0});
  const progressText = el("span", {id: "progress-text", class: "muted"});
  const charts = el("div", {id: "charts", class: "charts"}), headline = el("div", {id: "headline"});
  const log = el("pre", {id: "log", class: "log"}, data.log || "(no log: this run was started outside the UI)");
  const details = el("div", {id: "run-details"}, ...runTools(name, data));
  const sampled = el("section", {id: "samples", hidden: !data.samples.length}, el("h2", {}, "Samples (newest)"), samplesTable(data.samples));
  const root = el("div", {},
    el("div", {class: "toolbar"}, el("h1", {}, name), state, stopButton, killButton, resumeButton),
    el("div", {class: "progress"}, progressBar, progressText), message,
    el("section", {}, el("h2", {}, "Curves"), charts),
    el("section", {}, el("h2", {}, "Before -> after"), headline),
    sampled, details, el("section", {}, el("h2", {}, "Log"), log));
  const progress = (step, maxSteps, event) => {  // the bar's numbers, and how the run ended once it has
    progressBar.value = maxSteps ? step / maxSteps : 0;
    const parts = maxSteps ? [`step ${step}/${maxSteps} (${Math.round(step / maxSteps * 100)}%)`] : [];
    if (event === "evaluating") parts.push("evaluating");
    if (data.summary.exit_code !== null) parts.push(`exit code ${data.summary.exit_code}`);
    if (data.summary.state === "starting" && !maxSteps) parts.push("starting: loading the model and the data...");
    progressText.textContent = parts.join(", ");
  };
  const show = summary => {
    const live = ["running", "starting"].includes(summary.state) && !summary.host;
    state.replaceChildren(badge(summary.state));
    stopButton.hidden = killButton.hidden = !live;
    resumeButton.hidden = !summary.can_resume;
    progress(summary.step, summary.max_steps, "");
    message.replaceChildren(summary.message ? notice(summary.message, ["stopped", "running"].includes(summary.state) ? "info" : "error") : "");
    headline.replaceChildren(headlineTable(summary.headline));
  };
  const draw = () => drawCharts(charts, {[name]: curveGroups(logs)}, data.summary.max_steps);
  const update = change => {
    if (change.summary) {
      const finishedNow = change.summary.state !== data.summary.state && change.summary.state === "finished";
      data.summary = change.summary;
      show(change.summary);
      if (finishedNow) api(url).then(fresh => details.replaceChildren(...runTools(name, fresh)));
    }
    if (change.progress) {
      for (const entry of change.progress) {  // as runs.add_logs: a (re)start at step S drops the logs after S
        if (entry.event === "begin") logs = logs.filter(log => log.step <= entry.step);
        else if (entry.log) logs.push({step: entry.step, ...entry.log});
      }
      if (change.progress.some(e => e.log || e.event === "begin")) draw();
      const last = change.progress[change.progress.length - 1];
      if (last && last.max_steps) progress(last.step, last.max_steps, last.event);
    }
    if (change.log !== undefined) { log.textContent = change.log; log.scrollTop = log.scrollHeight; }
    if (change.samples) { sampled.hidden = !change.samples.length; sampled.replaceChildren(el("h2", {}, "Samples (newest)"), samplesTable(change.samples)); }
  };
  return {root, show, draw, update};
}

// The generations a run logs as it trains: SFT / preference prompts at each evaluation, GRPO's scored completions.
function samplesTable(rows) {
  const reward = rows.some(r => r.reward !== undefined);
  return el("table", {class: "table samples"},
    el("thead", {}, el("tr", {}, el("th", {}, "step"), el("th", {}, "prompt"), el("th", {}, "completion"), reward ? el("th", {}, "reward") : "")),
    el("tbody", {}, rows.map(r => el("tr", {}, el("td", {}, r.step ?? ""), el("td", {class: "text"}, r.prompt ?? ""),
      el("td", {class: "text"}, r.completion ?? ""), reward ? el("td", {}, number(r.reward)) : ""))));
}

function runTools(name, data) {
  const task = data.summary.task;
  const finished = data.summary.state === "finished";
  const sections = [];
  if (!finished) return sections;
  if (["sft", "pretrain", "dpo", "ipo", "kto", "orpo", "simpo", "grpo"].includes(task) || (data.record.recipe || {}).task === "sft")
    sections.push(chatSection(name));
  if (["classification", "image_classification", "distill"].includes(task)) sections.push(classifySection(name));
  sections.push(shipSection(name, task, ((data.record.recipe || {}).method || {}).type !== "full"));
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
  const history = [], baseHistory = [];  // each model sees its own replies in the conversation
  const send = el("button", {id: "chat-send", class: "primary", onclick: async () => {
    const text = input.value.trim();
    if (!text) return;
    const turn = {role: "user", content: text};
    const settings = {temperature: Number(temperature.value), max_new_tokens: Number(maxTokens.value)};
    send.disabled = true;
    status.textContent = "generating...";
    try {
      const answer = await streamChat(name, {...settings, messages: [...history, turn]}, reply);
      history.push(turn, {role: "assistant", content: answer});
      if (withBase.checked) {
        status.textContent = "base model...";
        const baseAnswer = await streamChat(name, {...settings, messages: [...baseHistory, turn], base: true}, baseReply);
        baseHistory.push(turn, {role: "assistant", content: baseAnswer});
      }
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
    headers: ACTION_HEADERS, body: JSON.stringify(body)});
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

function shipSection(name, task, adapter) {
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
    adapter ? el("div", {class: "row"}, mergeButton, el("span", {class: "muted"}, "the adapter folded into its base, in a new folder beside the run")) : "",
    el("div", {class: "row"}, repo, pushButton), output);
}

