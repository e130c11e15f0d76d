// FIGAN viewer: pick a model and version, see every component's sequence with its numbers and figures, and
// compare two versions side by side. Plain JS, no external assets. Everything is fetched from the service's
// /v1 API (with the optional API key as X-API-Key), images included (as blob URLs), so the page also works
// when reads need a key. The selection lives in the URL hash (#model=m&a=1&b=2).
"use strict";

const API = "/v1";
const $ = (sel) => document.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = sessionStorage.getItem("figan-api-key") || "";
keyInput.addEventListener("change", () => { sessionStorage.setItem("figan-api-key", keyInput.value); start(); });

async function api(path, asBlob) {
  const headers = keyInput.value ? { "X-API-Key": keyInput.value } : {};
  const resp = await fetch(path.startsWith("/") ? path : `${API}/${path}`, { headers });
  if (!resp.ok) {
    let msg = `${resp.status}`;
    try { const body = await resp.json(); msg += `: ${body.error}`; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return asBlob ? URL.createObjectURL(await resp.blob()) : resp.json();
}

function setStatus(text) { $("#status").textContent = text || ""; }

function fmt(v, digits = 2) {
  return (typeof v === "number" && isFinite(v)) ? v.toFixed(digits) : "–";
}

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function loadImage(img, url) {
  img.dataset.state = "loading";
  api(url, true).then((src) => {
    img.onload = () => { img.dataset.state = "loaded"; };
    img.onerror = () => { img.dataset.state = "error"; };
    img.src = src;
  }, (err) => { img.dataset.state = "error"; img.alt = err.message; });
}

// A small line chart: x = sweep value, one polyline per series ({name, ys, colour}).
function chart(title, xs, series, yLabel) {
  const W = 220, H = 120, P = 24;
  const all = series.flatMap((s) => s.ys).filter((v) => isFinite(v));
  if (!xs.length || !all.length) return el("p", {}, `${title}: no data`);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const x = (v) => P + (W - 2 * P) * (v - xs[0]) / ((xs[xs.length - 1] - xs[0]) || 1);
  const y = (v) => H - P + (2 * P - H) * (v - lo) / (hi - lo);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text) e.textContent = text;
    svg.appendChild(e);
  };
  add("text", { x: P, y: 11 }, title);
  add("text", { x: P, y: H - 6 }, `${fmt(xs[0], 1)} SD`);
  add("text", { x: W - P - 24, y: H - 6 }, `${fmt(xs[xs.length - 1], 1)} SD`);
  add("text", { x: 2, y: P }, fmt(hi, 2));
  add("text", { x: 2, y: H - P }, fmt(lo, 2));
  series.forEach((s, i) => {
    const pts = s.ys.map((v, j) => `${x(xs[j])},${y(v)}`).join(" ");
    add("polyline", { points: pts, fill: "none", stroke: s.colour, "stroke-width": 1.5 });
    add("text", { x: W - P - 70, y: 22 + 10 * i, fill: s.colour }, s.name);
  });
  const fig = el("figure");
  fig.appendChild(svg);
  fig.appendChild(el("figcaption", {}, yLabel));
  return fig;
}

function linspace(lo, hi, n) {
  return Array.from({ length: n }, (_, i) => (n === 1 ? lo : lo + (hi - lo) * i / (n - 1)));
}

function componentCard(summary, comp, urls) {
  const card = $("#component-card").content.firstElementChild.cloneNode(true);
  card.dataset.component = comp.component;
  card.querySelector("h3").textContent = `Component ${comp.component}`;
  const f = comp.faithfulness || {}, c = comp.conditioning || {};
  card.querySelector(".numbers").textContent =
    `${fmt(comp.pct_target_variance, 1)} % of target variance · faithfulness ρ ${fmt(f.rho_mean)}` +
    ` · conditioning r ${fmt(c.r_pooled)} (random ${fmt(c.r_random)})`;
  loadImage(card.querySelector("img.gif"), urls.gif);
  loadImage(card.querySelector("img.eigen"), urls.eigen);
  loadImage(card.querySelector("img.deviation"), urls.deviation);
  for (const [kind, caption] of [["attribution", "attribution maps: where the CNN looks (gradient, Grad-CAM)"],
                                 ["real_cases", "real cases, each swept around itself (red: its own score)"]]) {
    if (!urls[kind]) continue;                     // published only by some explanations
    const img = el("img", { class: kind, alt: caption });
    loadImage(img, urls[kind]);
    const fig = el("figure");
    fig.append(img, el("figcaption", {}, caption));
    card.appendChild(fig);
  }
  const sw = summary.sweep || {};
  const n = (f.response_mean || c.recomputed_mean || []).length;
  const xs = linspace(sw.sweep_lo ?? -2, sw.sweep_hi ?? 2, n);
  const charts = card.querySelector(".charts");
  if (f.response_mean) {
    charts.appendChild(chart("faithfulness", xs, [{ name: "CNN output", ys: f.response_mean, colour: "#1565c0" }],
      "CNN output along the sweep (mean over seeds)"));
  }
  if (c.recomputed_mean) {
    charts.appendChild(chart("conditioning", xs, [
      { name: "requested", ys: xs, colour: "#9e9e9e" },
      { name: "recomputed", ys: c.recomputed_mean, colour: "#c62828" }],
      "score read back by CNN → PLS vs requested"));
  }
  return card;
}

// The verdict banner at the top of a version's panel: green when every explanation check (gate) passed, red
// naming the failing gates otherwise.
function verdictText(s) {
  const failing = s.failing_gates || [];
  if (s.verdict === "pass") return "Explanation checks: PASS";
  if (s.verdict === "fail") {
    return "Explanation checks: FAIL" + (failing.length ? ` — failing gates: ${failing.join(", ")}` : "");
  }
  return "Explanation checks: not evaluated";
}

function verdictBanner(s) {
  const kind = s.verdict === "pass" || s.verdict === "fail" ? s.verdict : "unknown";
  return el("div", { class: `verdict ${kind}`, role: "status", "data-verdict": kind }, verdictText(s));
}

// The lineage line under a version's title: which data (name, DVC md5, version date) and which CNN (digest of its
// files) the explanation was made from, and the digest of its signed manifest (`figan verify` checks the run
// against it). The service only serves runs whose manifest verified, so these come from a verified manifest.
function lineageLine(s) {
  const l = s.lineage || {};
  const short = (h) => (h ? String(h).slice(0, 12) : "–");
  const date = l.dataset_created ? ` (${String(l.dataset_created).slice(0, 10)})` : "";
  const parts = [`data ${l.dataset || "–"} md5 ${short(l.dataset_md5)}${date}`, `CNN sha256 ${short(l.cnn_digest)}`,
                 `manifest sha256 ${short(l.manifest_sha256)}`];
  const full = `dataset md5 ${l.dataset_md5 || "–"}\nCNN sha256 ${l.cnn_digest || "–"}\n` +
               `manifest sha256 ${l.manifest_sha256 || "–"}`;
  const p = el("p", { class: "lineage", title: full }, `Signed · ${parts.join(" · ")}`);
  const data = { dataset: l.dataset, datasetMd5: l.dataset_md5, datasetCreated: l.dataset_created,
                 cnnDigest: l.cnn_digest, manifest: l.manifest_sha256 };
  for (const [k, v] of Object.entries(data)) {
    if (v) p.dataset[k] = v;
  }
  return p;
}

async function showVersion(panel, model, version) {
  const token = `${model}/${version}/${Date.now()}/${Math.random()}`;
  panel.dataset.showing = token;                  // a later selection wins over a slower earlier answer
  panel.replaceChildren(el("p", {}, `loading ${model} v${version} …`));
  let s;
  try {
    s = await api(`models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}`);
  } catch (err) {
    if (panel.dataset.showing !== token) return;
    panel.replaceChildren(el("h2", {}, `${model} v${version}`), el("p", { class: "error" }, err.message));
    return;
  }
  if (panel.dataset.showing !== token) return;
  const aliases = s.aliases && s.aliases.length ? ` (${s.aliases.join(", ")})` : "";
  const head = el("h2", {}, `${s.name} v${s.version}${aliases}`);
  const table = el("table", { class: "headline" });
  const fid = s.fid || {};
  const rows = [
    ["status", s.status],
    ["FID", fid.best_step != null ? `${fmt(fid.best, 1)} at step ${fid.best_step}` : fmt(fid.best, 1)],
    ["real-vs-real floor", fmt(fid.floor, 1)], ["FID extractor", fid.extractor || "–"],
    ["diversity (seeds / real)", fmt((s.diversity || {}).pixel_ratio ?? (s.diversity || {}).ratio)],
    ["sweep range", (s.sweep || {}).range || `${fmt((s.sweep || {}).sweep_lo)} to ${fmt((s.sweep || {}).sweep_hi)} SD`],
    ["gates", (s.gates || {}).all_pass ? "all pass" : "not all pass"],
    ["dataset", `${(s.dataset || {}).name || "–"} (${(s.dataset || {}).n_images ?? "–"} images)`],
  ];
  for (const [k, v] of rows) {
    const tr = el("tr");
    tr.append(el("td", {}, k), el("td", {}, String(v)));
    table.appendChild(tr);
  }
  const fidImg = el("img", { class: "fid", alt: "FID trace" });
  if (s.urls.fid_trace) loadImage(fidImg, s.urls.fid_trace);     // a cGAN's training trace; none for the patient generator
  const comps = el("div", { class: "components" });
  s.components.forEach((comp, i) => comps.appendChild(componentCard(s, comp, s.urls.components[i])));
  const overview = el("div", { class: "overview" });
  overview.append(table);
  if (s.urls.fid_trace) overview.append(fidImg);
  // a newer explanation queued, running or failed: the last published one is shown, and the panel says so
  const notice = s.notice ? [el("p", { class: "notice", role: "status" }, s.notice)] : [];
  panel.replaceChildren(verdictBanner(s), ...notice, head, lineageLine(s), overview, comps, uploadForm(model, version));
}

// "Explain your own image": the upload goes to explain-image (needs the API key); the answer's sweeps are the
// image itself edited along each component (patient generator), or a generated patient with its scores.
function uploadForm(model, version) {
  const box = el("section", { class: "upload" });
  const file = el("input", { type: "file", accept: "image/png,image/jpeg,image/tiff", class: "upload-file" });
  const button = el("button", { type: "button", class: "upload-go" }, "Explain this image");
  const result = el("div", { class: "upload-result" });
  button.addEventListener("click", async () => {
    if (!file.files.length) { result.replaceChildren(el("p", { class: "error" }, "choose an image first")); return; }
    const form = new FormData();
    form.append("image", file.files[0]);
    result.replaceChildren(el("p", {}, "placing and sweeping the image …"));
    const headers = keyInput.value ? { "X-API-Key": keyInput.value } : {};
    const url = `${API}/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}/explain-image`;
    try {
      const resp = await fetch(url, { method: "POST", headers, body: form });
      const body = await resp.json();
      if (!resp.ok) throw new Error(`${resp.status}: ${body.error}`);
      result.replaceChildren(...uploadResult(body));
    } catch (err) {
      result.replaceChildren(el("p", { class: "error" }, err.message));
    }
  });
  box.append(el("h3", {}, "Explain your own image"), file, button, result);
  return box;
}

function uploadResult(r) {
  const out = [];
  if (r.warning) out.push(el("p", { class: "warning", role: "alert" }, `Warning: ${r.warning}`));
  out.push(el("p", { class: "numbers" },
    (r.patient_centred ? "Sweeps of this image itself, edited along each component. "
                       : "Sweeps of a generated patient with this image's scores (this generator cannot edit an image). ") +
    `CNN output ${r.cnn_output.map((v) => fmt(v, 3)).join(", ")}`));
  const row = el("div", { class: "row" });
  for (const c of r.components) {
    const fig = el("figure");
    const img = el("img", { class: "gif", alt: `component ${c.component} sweep of the upload` });
    img.onload = () => { img.dataset.state = "loaded"; };
    img.src = c.gif;
    fig.append(img, el("figcaption", {},
      `component ${c.component}: score ${fmt(c.score)} (${c.position} the published range); ` +
      `${fmt(c.values[0])} → ${fmt(c.values[c.values.length - 1])} SD, ` +
      `frame ${c.own_score_frame + 1} of ${c.values.length} is the image's own score`));
    row.append(fig);
  }
  out.push(row);
  return out;
}

let listing = [];

function fillVersions(modelName, a, b) {
  const m = listing.find((x) => x.name === modelName) || { versions: [] };
  const label = (v) => `v${v.version}${v.aliases.length ? " (" + v.aliases.join(", ") + ")" : ""} — ${v.status}` +
    (v.status === "done" && v.verdict ? ` · checks ${v.verdict}` : "");
  const options = (sel, withNone) => {
    sel.replaceChildren(...(withNone ? [el("option", { value: "" }, "—")] : []),
      ...m.versions.map((v) => el("option", { value: v.version }, label(v))));
  };
  options($("#version-a"), false);
  options($("#version-b"), true);
  const done = m.versions.filter((v) => v.status === "done");
  $("#version-a").value = a || (done.length ? done[done.length - 1].version : (m.versions[0] || {}).version || "");
  $("#version-b").value = b || "";
}

function render() {
  const model = $("#model").value, a = $("#version-a").value, b = $("#version-b").value;
  location.hash = new URLSearchParams({ model, a, b }).toString();
  if (model && a) showVersion($("#panel-a"), model, a);
  $("#panel-b").hidden = !b;
  if (model && b) showVersion($("#panel-b"), model, b);
}

async function start() {
  setStatus("");
  try {
    listing = (await api("models")).models;
  } catch (err) {
    setStatus(`cannot list models: ${err.message}`);
    return;
  }
  if (!listing.length) { setStatus("no explanations published yet"); return; }
  const want = new URLSearchParams(location.hash.slice(1));
  $("#model").replaceChildren(...listing.map((m) => el("option", { value: m.name }, m.name)));
  if (listing.some((m) => m.name === want.get("model"))) $("#model").value = want.get("model");
  fillVersions($("#model").value, want.get("a"), want.get("b"));
  render();
}

$("#model").addEventListener("change", () => { fillVersions($("#model").value); render(); });
$("#version-a").addEventListener("change", render);
$("#version-b").addEventListener("change", render);
start();
