// The try-it page. It uses only the service's public HTTP API, as any client would:
//   GET /models/              the served models, their backends (and refused ones) and cards
//   POST /classify            one image, multipart field "image"        ?backend=&model=&top_k=
//   POST /classify_batch      several images, multipart field "images"  (one entry per image)
// No framework, no build step, nothing from another host.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const pct = (x, digits = 2) => (x === undefined || x === null ? "n/a" : `${(100 * x).toFixed(digits)}%`);
const count = (n) => (n === undefined || n === null ? "n/a" : Number(n).toLocaleString("en-US"));
const ms = (x) => (x === undefined || x === null ? "n/a" : `${x < 10 ? x.toFixed(2) : x.toFixed(1)} ms`);
function si(n, unit) {
  if (n === undefined || n === null) return "n/a";
  for (const [f, p] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (n >= f) return `${(n / f).toFixed(n / f < 10 ? 2 : 1)} ${p}${unit}`;
  }
  return `${n} ${unit}`;
}
const bytes = (n) => si(n, "B");

const state = { info: null, samples: [], last: null, busy: false };

// ------------------------------------------------------------------ the API

async function api(url, options) {
  const t0 = performance.now();
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    return { ok: false, status: 0, error: `the service did not answer (${e.message})`, ms: performance.now() - t0 };
  }
  const text = await response.text();
  const roundTrip = performance.now() - t0;
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (e) {
    body = null;
  }
  const error = response.ok ? null : (body && body.error) || text || response.statusText;
  return { ok: response.ok, status: response.status, body, error, ms: roundTrip };
}

function query(backend) {
  const q = new URLSearchParams({ backend, top_k: $("#top_k").value || "3" });
  if ($("#model").value) q.set("model", $("#model").value);
  return q.toString();
}

// One image: POST /classify per backend. Several: POST /classify_batch per backend.
// Backends are asked one after the other so that each round trip is its own.
async function classify(images, backends) {
  const answers = images.map(() => ({}));
  for (const backend of backends) {
    const form = new FormData();
    if (images.length === 1) {
      form.append("image", images[0].blob, images[0].name);
      const r = await api(`/classify?${query(backend)}`, { method: "POST", body: form });
      answers[0][backend] = r.ok ? { ...r.body, ok: true, status: r.status, round_trip_ms: r.ms }
                                 : { ok: false, status: r.status, error: r.error, round_trip_ms: r.ms };
    } else {
      for (const im of images) form.append("images", im.blob, im.name);
      const r = await api(`/classify_batch?${query(backend)}`, { method: "POST", body: form });
      const entries = (r.body && r.body.results) || [];
      images.forEach((im, i) => {
        const e = entries[i];
        if (e && e.predictions) {
          answers[i][backend] = { ok: true, status: 200, predictions: e.predictions, batch_size: e.batch_size,
                                  inference_ms: r.body.inference_ms, model: r.body.model, round_trip_ms: r.ms,
                                  request: "batch" };
        } else {
          answers[i][backend] = { ok: false, status: (e && e.status) || r.status, error: (e && e.error) || r.error,
                                  round_trip_ms: r.ms };
        }
      });
    }
  }
  return answers;
}

// ------------------------------------------------------------------ results

function agreement(answers) {
  const ok = Object.entries(answers).filter(([, a]) => a.ok && a.predictions && a.predictions.length);
  if (ok.length === 0) return null;
  const top = ok.map(([b, a]) => [b, a.predictions[0].label]);
  const labels = new Set(top.map(([, l]) => l));
  if (labels.size === 1) {
    const label = top[0][1];
    const probs = ok.map(([, a]) => a.predictions[0].probability);
    const spread = Math.max(...probs) - Math.min(...probs);
    return { agree: true, label, n: ok.length, spread };
  }
  return { agree: false, top };
}

function predictionList(predictions) {
  return el("ol", { class: "preds" }, predictions.map((p) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(0.5, 100 * p.probability).toFixed(1)}%`;
    return el("li", { "data-label": p.label, "data-probability": p.probability },
      el("span", { class: "label", text: p.label }),
      el("span", { class: "track" }, bar),
      el("span", { class: "prob", text: pct(p.probability, 1) }));
  }));
}

function answerRow(backend, a) {
  if (!a.ok) {
    return el("tr", { "data-backend": backend, "data-status": a.status, class: "failed" },
      el("th", { scope: "row", text: backend }),
      el("td", { colspan: 4, class: "error" },
        el("span", { class: "code", text: a.status ? `HTTP ${a.status}` : "no answer" }), " ",
        el("span", { class: "error-text", text: a.error })));
  }
  return el("tr", { "data-backend": backend, "data-status": a.status },
    el("th", { scope: "row", text: backend }),
    el("td", {}, predictionList(a.predictions)),
    el("td", { class: "num", title: "the backend call for the whole batch this image rode in" },
      ms(a.inference_ms)),
    el("td", { class: "num batch", title: "images in that backend call" }, String(a.batch_size ?? "n/a")),
    el("td", { class: "num", title: "measured by this page: request sent to answer read" }, ms(a.round_trip_ms)));
}

function renderResult(im, answers, truth) {
  const ag = agreement(answers);
  let verdict = null;
  if (ag && ag.agree) {
    verdict = el("p", { class: "agree yes" },
      ag.n > 1 ? `All ${ag.n} backends agree: ` : "One backend answered: ", el("strong", { text: ag.label }),
      ag.n > 1 ? ` (top-1 probabilities within ${ag.spread.toFixed(4)})` : "",
      truth ? (ag.label === truth ? ", the true label." : `; the true label is ${truth}.`) : "");
  } else if (ag) {
    verdict = el("p", { class: "agree no" }, "The backends disagree: ",
      ag.top.map(([b, l]) => `${b} says ${l}`).join(", "), truth ? `; the true label is ${truth}.` : ".");
  }
  const thumb = el("img", { class: "thumb", alt: im.name, src: im.url });
  thumb.addEventListener("error", () => thumb.replaceWith(el("div", { class: "thumb nothumb", text: "the browser cannot show this file" })));
  const backends = Object.keys(answers);
  return el("article", { class: "result", "data-filename": im.name },
    el("div", { class: "head" }, thumb,
      el("div", {}, el("h3", { text: im.name }),
        truth ? el("div", { class: "truth", text: `true label: ${truth}` }) : null,
        verdict)),
    el("table", { class: "answers" },
      el("thead", {}, el("tr", {},
        el("th", { text: "backend" }), el("th", { text: `top ${$("#top_k").value}` }),
        el("th", { text: "inference" }), el("th", { text: "batch" }), el("th", { text: "round trip" }))),
      el("tbody", {}, backends.map((b) => answerRow(b, answers[b])))));
}

// Several images: one line each, the top-1 answer of every backend side by side.
function renderOverview(images, answers, backends) {
  let right = 0, labelled = 0;
  const rows = images.map((im, i) => {
    const ag = agreement(answers[i]);
    return el("tr", { "data-filename": im.name },
      el("th", { scope: "row" }, el("img", { class: "mini", src: im.url, alt: "" }), " ", im.name),
      el("td", { text: im.label || "" }),
      backends.map((b) => {
        const a = answers[i][b];
        if (!a.ok) return el("td", { class: "error", text: `HTTP ${a.status}` });
        const top = a.predictions[0];
        if (im.label) {
          labelled += 1;
          right += top.label === im.label ? 1 : 0;
        }
        return el("td", { class: im.label ? (top.label === im.label ? "hit" : "miss") : "" },
          `${top.label} `, el("span", { class: "muted", text: pct(top.probability, 0) }));
      }),
      el("td", { class: ag && ag.agree ? "yes" : "no", text: ag ? (ag.agree ? "yes" : "no") : "" }));
  });
  return el("div", { class: "overview" },
    el("table", {},
      el("thead", {}, el("tr", {}, el("th", { text: "image" }), el("th", { text: "true label" }),
        backends.map((b) => el("th", { text: b })), el("th", { text: "agree" }))),
      el("tbody", {}, rows)),
    labelled ? el("p", { class: "muted", text: `${right} of ${labelled} top-1 answers are the true label ` +
      `(all backends together). Each image in detail below.` }) : null);
}

async function run(images) {
  if (state.busy) return;
  const backends = [...document.querySelectorAll("#backends input:checked")].map((i) => i.value);
  const results = $("#results");
  if (!images.length) return;
  if (!backends.length) {
    results.replaceChildren(el("p", { class: "error", text: "Pick at least one backend." }));
    return;
  }
  state.busy = true;
  state.last = images;
  document.body.classList.add("busy");
  results.replaceChildren(el("p", { class: "working", text: `Classifying ${images.length} image(s) on ${backends.join(", ")} ...` }));
  try {
    const answers = await classify(images, backends);
    results.replaceChildren(...[
      el("p", { class: "summary" },
        images.length === 1 ? "POST /classify" : `POST /classify_batch with ${images.length} images`,
        ` once per backend (${backends.join(", ")}), model ${$("#model").value}.`),
      images.length > 1 ? renderOverview(images, answers, backends) : null,
      ...images.map((im, i) => renderResult(im, answers[i], im.label))].filter(Boolean));
    showExample(images, backends[0]);
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
    results.setAttribute("data-done", String(Date.now()));
  }
}

const shellQuote = (s) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`);

function showExample(images, backend) {
  const base = `${location.origin}`;
  const q = query(backend);
  const cmd = images.length === 1
    ? `curl -F ${shellQuote(`image=@${images[0].name}`)} '${base}/classify?${q}'`
    : `curl ${images.slice(0, 3).map((im) => `-F ${shellQuote(`images=@${im.name}`)}`).join(" ")}` +
      `${images.length > 3 ? " ..." : ""} '${base}/classify_batch?${q}'`;
  $("#example").replaceChildren("The last request, as a command: ", el("code", { text: cmd }));
}

function fromFiles(fileList) {
  return [...fileList].map((f) => ({ name: f.name, blob: f, url: URL.createObjectURL(f), label: null }));
}

// ------------------------------------------------------------------ the model card

function dl(pairs) {
  return el("dl", { class: "facts" }, pairs.filter(Boolean).map(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
}

function table(head, rows, cls) {
  return el("table", { class: cls || "" },
    el("thead", {}, el("tr", {}, head.map((h, i) => el("th", { text: h, class: i ? "num" : null })))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) =>
      i === 0 ? el("th", { scope: "row" }, c) : el("td", { class: "num" }, c))))));
}

function barCell(x) {
  const bar = el("span", { class: "bar" });
  bar.style.width = `${Math.max(0.5, 100 * (x || 0)).toFixed(1)}%`;
  return el("span", { class: "barcell" }, el("span", { class: "track" }, bar), el("span", { text: pct(x, 1) }));
}

function renderCard(name) {
  const aside = $("#card");
  const m = state.info.models[name];
  if (!m) {
    aside.replaceChildren();
    return;
  }
  const c = m.card;
  const metrics = c.metrics || {};
  const i8 = c.int8;
  const files = c.files || {};
  const parts = [el("h2", { text: "Model card" }), el("p", { class: "tag" }, el("code", { text: m.tag }))];
  parts.push(dl([
    ["Test accuracy (as served)", el("span", {}, el("strong", { class: "big", text: pct(metrics.test_accuracy) }),
      metrics.test_images ? ` on ${count(metrics.test_images)} ${c.dataset && c.dataset.name || ""} test images` : "")],
    ["Architecture", el("span", {}, el("code", { text: c.architecture.name }), " ",
      el("span", { class: "muted", text: Object.entries(c.architecture.kwargs)
        .map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ") }))],
    ["Parameters", count(c.parameters)],
    ["FLOPs per image", `${si(c.flops_per_image, "FLOPs")}` +
      (c.flops_per_image_with_tta ? `; ${si(c.flops_per_image_with_tta, "FLOPs")} with test-time augmentation (level ${c.tta_level})` : "")],
    c.training && c.training.preset && ["Training", `preset ${c.training.preset}, ${c.training.epochs} epochs, ` +
      `${Math.round(c.training.train_seconds || 0)} s on ${c.training.device || "?"} (${c.training.precision || "?"})`],
    c.dataset && c.dataset.name && ["Data", `${c.dataset.name}: ${count(c.dataset.train_images)} training images`],
  ]));

  const per = metrics.per_class_accuracy || {};
  if (Object.keys(per).length) {
    const i8per = (i8 && i8.per_class_accuracy) || null;
    parts.push(el("h3", { text: "Per-class accuracy" }),
      table(["class", "FP32 (served)", ...(i8per ? ["INT8"] : [])],
        Object.entries(per).map(([k, v]) => [k, barCell(v), ...(i8per ? [pct(i8per[k], 1)] : [])]), "perclass"));
  }

  const parity = Object.entries(c.parity || {});
  if (parity.length) {
    parts.push(el("h3", { text: "Export parity (torch vs ONNX)" }),
      table(["file", "max |Δ logit|", "top-1 same", "images"],
        parity.map(([k, p]) => [k, el("span", { title: p.atol ? `tolerance ${p.atol}` : null,
          text: `${Number(p.max_abs_diff).toExponential(1)}${p.ok === false ? " (over tolerance)" : ""}` }),
          pct(p.top1_agreement, 1), count(p.images)]), "parity"),
      el("p", { class: "muted", text: `Held-out test images through torch and each ONNX file; ` +
        `tolerance ${parity[0][1].atol ?? "n/a"} on the logits.` }));
  }

  if (i8) {
    const fp32 = files["model.sim.onnx"];
    const size = i8.bytes && fp32 ? `; file ${bytes(i8.bytes)} vs ${bytes(fp32.bytes)} FP32 (${(fp32.bytes / i8.bytes).toFixed(1)}x smaller)` : "";
    parts.push(el("h3", { text: "INT8 cost" }), el("p", { class: "int8" },
      `Accuracy ${pct(i8.accuracy)} vs ${pct(i8.fp32_accuracy)} FP32: INT8 `,
      el("strong", { text: `${i8.drop > 0 ? "loses" : "gains"} ${Math.abs(100 * i8.drop).toFixed(2)} points` }),
      `; ${count(i8.top1_disagreements_vs_fp32)} of ${count(i8.test_images)} test images change their top-1${size}. ` +
      `Calibrated on ${count(i8.calibration_images)} ${i8.calibration || "images"}. ` +
      (i8.accepted ? "Published as the onnx_int8 backend." : "Not published (it lost too much).")));
  }

  const refused = Object.entries(m.refused || {});
  parts.push(el("h3", { text: "Backends" }), el("p", {}, "Served: ", m.backends.map((b) => el("code", { text: b })).flatMap((x, i) => (i ? [", ", x] : [x])), "."));
  if (refused.length) {
    parts.push(el("ul", { class: "refused" }, refused.map(([b, why]) => el("li", {}, el("code", { text: b }), ` refused: ${why}`))));
  }
  const refusedModels = Object.entries(state.info.refused || {});
  if (refusedModels.length) {
    parts.push(el("details", {}, el("summary", { text: `${refusedModels.length} stored model(s) not served` }),
      el("ul", { class: "refused" }, refusedModels.map(([t, why]) => el("li", {}, el("code", { text: t }), `: ${why}`)))));
  }
  aside.replaceChildren(...parts);
}

function renderBackends(name) {
  const box = $("#backends");
  const m = state.info.models[name];
  const legend = el("legend", { text: "Backends" });
  if (!m) {
    box.replaceChildren(legend);
    return;
  }
  box.replaceChildren(legend,
    ...m.backends.map((b) => el("label", {}, el("input", { type: "checkbox", name: "backend", value: b, checked: true }), b)),
    ...Object.entries(m.refused || {}).map(([b, why]) => el("label", { class: "refused", title: why },
      el("input", { type: "checkbox", value: b, disabled: true }), el("s", { text: b }))));
}

function selectModel(name) {
  renderBackends(name);
  renderCard(name);
  const m = state.info.models[name];
  if (m) $("#top_k").max = String(m.card.classes.length);
}

// ------------------------------------------------------------------ start

async function loadSamples() {
  const r = await api("/tryit/samples/samples.json");
  if (!r.ok || !Array.isArray(r.body)) return;
  state.samples = r.body;
  const box = $("#samples");
  box.replaceChildren(...r.body.map((s) => el("button", {
    type: "button", class: "sample", title: `${s.label} (${s.source})`, "data-label": s.label,
    onclick: () => runSamples([s]),
  }, el("img", { src: `/tryit/samples/${s.file}`, alt: s.label }), el("span", { text: s.label }))),
  el("button", { type: "button", class: "sample all", id: "all-samples", onclick: () => runSamples(state.samples) },
    `all ${r.body.length}`, el("br"), "(one batch)"));
}

async function runSamples(list) {
  const images = [];
  for (const s of list) {
    const r = await fetch(`/tryit/samples/${s.file}`);
    const blob = await r.blob();
    images.push({ name: s.file, blob, url: `/tryit/samples/${s.file}`, label: s.label });
  }
  await run(images);
}

async function start() {
  $("#controls").addEventListener("submit", (e) => e.preventDefault());
  $("#file").addEventListener("change", (e) => {
    run(fromFiles(e.target.files));
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) run(fromFiles(e.dataTransfer.files));
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("#file").click();
  });
  $("#model").addEventListener("change", (e) => {
    selectModel(e.target.value);
    if (state.last) run(state.last);
  });
  $("#top_k").addEventListener("change", () => {
    if (state.last) run(state.last);
  });
  loadSamples();

  const r = await api("/models/");
  const status = $("#status");
  if (!r.ok) {
    status.className = "status error";
    status.replaceChildren(`GET /models/ answered HTTP ${r.status}: `, el("span", { class: "error-text", text: r.error }));
    return;
  }
  state.info = r.body;
  const names = Object.keys(r.body.models);
  if (!names.length) {
    status.className = "status error";
    status.textContent = "The service serves no model: the model store has none. Run `make run` first.";
    return;
  }
  const select = $("#model");
  select.replaceChildren(...names.map((n) => el("option", { value: n, selected: n === r.body.default }, n)));
  selectModel(select.value);
  status.className = "status ready";
  status.textContent = `${names.length} model(s) served; default ${r.body.default}. Pick an image.`;
  document.body.setAttribute("data-ready", "true");
}

document.addEventListener("DOMContentLoaded", start);
