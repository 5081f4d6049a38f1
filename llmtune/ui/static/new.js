// llmtune UI: a new run - the form from the recipe schema, checked as you type; plan, preview, launch.
"use strict";

async function newRunView(params) {
  const [recipes, schema, listed] = await Promise.all([api("/api/recipes"), api("/api/schema"), api("/api/runs")]);
  const page = newRunPage(recipes, listed.runs.filter(r => r.task), schema.fields);
  const asked = params.get("recipe");
  page.select.value = asked || "quickstart.yaml";
  if (!page.select.value) page.select.selectedIndex = 0;  // a recipe folder without the quickstart
  view.replaceChildren(page.root);
  if (asked && page.select.value !== asked) page.notice(`There is no recipe '${asked}' here; showing ${page.select.value} instead.`);
  await page.load();
}

function newRunPage(recipes, runs, fields) {
  const select = el("select", {id: "recipe-select"},
    el("optgroup", {label: `recipes (${recipes.folder})`}, recipes.recipes.map(r => el("option", {value: r}, r))),
    runs.length ? el("optgroup", {label: "a previous run's recipe"}, runs.map(r => el("option", {value: `run:${r.name}`}, r.name))) : "",
    el("optgroup", {label: "a blank recipe of a task"}, recipes.tasks.map(t => el("option", {value: `task:${t}`}, t))));
  const runName = el("input", {id: "run-name", placeholder: "(recipe name + time)", spellcheck: "false"});
  const accelerate = el("select", {id: "accelerate"}, ["", ...recipes.accelerate].map(a => el("option", {value: a}, a || "one process")));
  const out = {general: el("div", {id: "general-errors"}), problems: el("div", {id: "launch-problems"}),
               yaml: el("pre", {id: "yaml", class: "code"}),
               command: el("pre", {id: "command", class: "code"}),
               plan: el("pre", {id: "plan-output", class: "code", hidden: true}),
               preview: el("div", {id: "preview-output", class: "preview", hidden: true})};
  const form = recipeForm(fields, () => checkSoon(), () => check());
  const request = () => ({recipe: select.value, values: form.changes(), name: runName.value.trim() || null,
                          accelerate: accelerate.value || null});
  let asked = 0, timer = null;
  function checkSoon() { clearTimeout(timer); timer = setTimeout(check, 300); }
  async function check() {  // the server's answer to the newest request wins; an older one arriving late is dropped
    clearTimeout(timer);
    const mine = ++asked;
    let result;
    try { result = await api("/api/check", request()); } catch (e) { out.general.replaceChildren(notice(e.message)); launch.disabled = true; return; }
    if (mine !== asked) return;
    form.showErrors(result.errors);
    out.general.replaceChildren(...result.general.map(g => notice(g)));
    const fieldErrors = Object.entries(result.errors);  // why Launch is off, beside it: each links to its field
    out.problems.replaceChildren(...fieldErrors.map(([key, message]) => el("div", {class: "notice error"},
      el("a", {href: "#", onclick: event => { event.preventDefault(); form.focus(key); }}, key), `: ${message}`)));
    previewButton.hidden = !["sft", "pretrain"].includes(form.value("task"));
    out.yaml.textContent = result.yaml;
    out.command.textContent = result.command;
    launch.disabled = Object.keys(result.errors).length + result.general.length > 0;
  }
  async function load() {
    try { form.reset((await api("/api/form", {recipe: select.value, values: {}})).values); await check(); }
    catch (e) { out.general.replaceChildren(notice(e.message)); launch.disabled = true; }
  }
  select.addEventListener("change", load);
  accelerate.addEventListener("change", check);
  runName.addEventListener("input", checkSoon);
  const launch = el("button", {id: "launch", class: "primary", onclick: () => busy(launch, api("/api/launch", request())
    .then(job => { location.hash = `#/run/${encodeURIComponent(job.name)}`; })
    .catch(e => out.general.replaceChildren(notice(e.message))))}, "Launch");
  const validateButton = el("button", {id: "validate-button", onclick: () => { out.plan.hidden = false; out.plan.textContent = "validating (resolves the model, reads the data)...";
    busy(validateButton, api("/api/validate", request()).then(v => { out.plan.textContent = JSON.stringify(v.summary, null, 2); })
      .catch(e => { out.plan.textContent = e.message; })); }}, "Validate model and data");
  const planButton = el("button", {id: "plan-button", onclick: () => { out.plan.hidden = false; out.plan.textContent = "planning (loads the model)...";
    busy(planButton, api("/api/plan", request()).then(p => { out.plan.textContent = p.text; }).catch(e => { out.plan.textContent = e.message; })); }},
    "Plan memory and time");
  const previewButton = el("button", {id: "preview-button", onclick: () => { out.preview.hidden = false; out.preview.textContent = "tokenizing...";
    busy(previewButton, api("/api/preview", request()).then(p => out.preview.replaceChildren(...previewTokens(p.text)))
      .catch(e => out.preview.replaceChildren(notice(e.message)))); }}, "Preview data (loss mask)");
  const root = el("div", {},
    el("div", {class: "toolbar"}, el("h1", {}, "New run")),
    el("div", {class: "new-run"},
      el("div", {class: "form-column"},
        el("div", {class: "row"}, el("label", {}, "Start from ", select)),
        el("div", {class: "row"}, el("label", {}, "Run name ", runName), el("label", {}, "Processes ", accelerate)),
        out.general, form.root),
      el("div", {class: "side-column"},
        el("h3", {}, "Command"), out.command,
        el("div", {class: "row"}, launch, validateButton, planButton, previewButton),
        out.problems, out.plan, out.preview,
        el("h3", {}, "Recipe as it will run"), out.yaml)));
  return {root, select, load, notice: text => out.general.replaceChildren(notice(text, "info"))};
}

// Every recipe key as an input, grouped by section; `changes()` is what differs from the recipe's own values.
function recipeForm(fields, onInput, onChange) {
  const root = el("div", {id: "recipe-form"});
  const inputs = {}, sections = {}, values = {};
  let own = {};
  const read = input => input.type === "checkbox" ? (input.checked ? "true" : "false") : input.value;
  const mark = () => { for (const [key, input] of Object.entries(inputs)) input.classList.toggle("changed", key in values && values[key] !== own[key]); };
  for (const field of fields) {
    const input = field.kind === "bool" ? el("input", {type: "checkbox"}) :
      field.kind === "choice" ? el("select", {}, ["", ...field.choices].map(c => el("option", {value: c}, c === "" ? "(empty)" : c))) :
      el("input", {type: "text", spellcheck: "false"});
    input.setAttribute("data-key", field.key);
    input.id = `field-${field.key.replace(/\./g, "-")}`;
    input.addEventListener("change", () => { values[field.key] = read(input); mark(); onChange(); });
    if (input.type === "text") input.addEventListener("input", () => { values[field.key] = read(input); mark(); onInput(); });
    inputs[field.key] = input;
    (sections[field.section] ||= []).push(el("div", {class: "field", "data-field": field.key},
      el("label", {for: input.id}, el("code", {}, field.key.split(".").slice(1).join(".") || field.key)), input,
      el("div", {class: "help"}, field.help, " ", el("span", {class: "valid"}, `(${field.valid}; default ${field.default || "empty"})`)),
      el("div", {class: "field-error", "data-key": field.key})));
  }
  for (const [section, rows] of Object.entries(sections)) {
    root.append(el("details", {open: ["model", "data", "method", "training"].includes(section), "data-section": section},
                   el("summary", {}, section), rows));
  }
  return {
    root,
    reset(recipeValues) {
      own = recipeValues;
      for (const key of Object.keys(values)) delete values[key];
      for (const [key, input] of Object.entries(inputs)) {
        if (input.type === "checkbox") input.checked = own[key] === "true"; else input.value = own[key] ?? "";
      }
      mark();
    },
    changes() { return Object.fromEntries(Object.entries(values).filter(([key, value]) => value !== own[key])); },
    value(key) { return key in values ? values[key] : own[key]; },
    focus(key) {
      const input = inputs[key];
      if (!input) return;
      input.closest("details").open = true;
      input.scrollIntoView({block: "center"});
      input.focus();
    },
    showErrors(errors) {
      for (const box of root.querySelectorAll(".field-error")) {
        const error = errors[box.getAttribute("data-key")];
        box.textContent = error || "";
        box.closest(".field").classList.toggle("invalid", Boolean(error));
        if (error) box.closest("details").open = true;
      }
    },
  };
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
