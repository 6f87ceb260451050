// The diffray playground: generate with the API, compare two images of one prompt, record a preference.
// Plain browser JavaScript served by the Ingress (no build step, no CDN). Text from prompts, models and
// server messages is only ever placed with textContent, never parsed as HTML. The API key lives in
// sessionStorage: entered once, kept for this tab, gone when the tab closes.
"use strict";

const KEY_SLOT = "diffray.apiKey";
// Where the app is mounted (`/`, or a Serve route prefix such as `/diffray/`): this script is its
// `playground/app.js`. API paths are relative and resolved against it, never against the host's root.
// (document.currentScript is only set while the script's top level runs.)
const APP_ROOT = new URL("../", document.currentScript.src);
const GALLERY_SIZE = 12;
const $ = (id) => document.getElementById(id);
let pair = null; // the comparison on screen: {id, prompt, negative_prompt, images: [{b64_json, model, ...}, ...]}

function apiKey() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function apiError(status, message) {
  const err = new Error(message);
  err.status = status; // 0: no answer at all
  return err;
}

// One API call (`path` relative to the app's root, e.g. "v1/models"): JSON in and out; an error answer
// (or one that is not JSON, such as a proxy's HTML page) becomes an Error whose message a person can read.
async function api(method, path, body) {
  const headers = {"Content-Type": "application/json"};
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  let response;
  try {
    const init = {method, headers, body: body === undefined ? undefined : JSON.stringify(body)};
    response = await fetch(new URL(path, APP_ROOT), init);
  } catch (err) {
    throw apiError(0, "cannot reach the server (" + err.message + ")");
  }
  let payload = null;
  try { payload = await response.json(); } catch (err) { payload = null; }
  if (!response.ok) {
    const e = payload && payload.error ? payload.error : {};
    const field = e.param ? e.param + ": " : "";
    const wait = response.headers.get("Retry-After");
    const hint = response.status === 401 ? " (enter the API key at the top)"
      : /^\d+$/.test(wait || "") ? " (retry in " + wait + " s)" : "";
    // statusText is empty over HTTP/2 and for many proxies' pages
    const message = e.message || response.statusText || "no details from the server";
    throw apiError(response.status, response.status + " " + field + message + hint);
  }
  if (payload === null) throw apiError(response.status, response.status + " the server's answer is not JSON");
  return payload;
}

function option(value, label, disabled, title) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  o.disabled = !!disabled;
  if (title) o.title = title;
  return o;
}

async function loadModels() {
  const models = await api("GET", "v1/models");
  const pickers = [$("model"), $("left-model"), $("right-model")];
  pickers.forEach((s) => s.replaceChildren());
  $("control-model").replaceChildren(option("", "none"));
  for (const m of models.data) {
    if (m.kind === "controlnet") {
      $("control-model").append(option(m.id, m.id, m.available === false, m.reason));
      continue;
    }
    const label = m.kind === "base" ? "base model" : m.id + " (" + m.kind + ")" +
      (m.available === false ? " - unavailable: " + m.reason : "");
    pickers.forEach((s) => s.append(option(m.id, label, m.available === false, m.reason)));
  }
  const usable = [...$("right-model").options].filter((o) => !o.disabled);
  if (usable.length > 1) $("right-model").value = usable[1].value;
  preselect();
}

// `/?left=ID&right=ID` (what `diffray feedback train` suggests after publishing) opens Compare with those
// two models picked; an id the server does not list (or cannot serve) is ignored.
function preselect() {
  const query = new URLSearchParams(window.location.search);
  for (const side of ["left", "right"]) {
    const wanted = query.get(side);
    const picker = $(side + "-model");
    const found = [...picker.options].find((o) => o.value === wanted && !o.disabled);
    if (found) picker.value = found.value;
  }
}

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function readFileB64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1] || "");
    reader.onerror = () => reject(new Error("cannot read the control image file"));
    reader.readAsDataURL(file);
  });
}

// The /v1/generate body the form describes, for one model and seed.
async function requestBody(model, seed) {
  const body = {prompt: $("prompt").value, width: intOrNull("width"), height: intOrNull("height"),
                steps: intOrNull("steps"), guidance: Number($("guidance").value || 7.5), seed: seed};
  if ($("negative").value.trim()) body.negative_prompt = $("negative").value;
  if (model && model !== "base") { body.adapter = model; body.adapter_scale = Number($("scale").value || 1); }
  const cn = $("control-model").value;
  const file = $("control-file").files[0];
  if (cn && file) {
    const data = await readFileB64(file);
    body.control = {model: cn, scale: Number($("control-scale").value || 1)};
    body.control[$("control-preprocess").checked ? "raw_image" : "image"] = data;
  }
  Object.keys(body).forEach((k) => body[k] === null && delete body[k]);
  return body;
}

// One id per comparison, reused by every click on it: a retry after a lost answer is stored once, and a
// comparison is never stored twice (getRandomValues works on plain http too).
function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function randomSeed() {
  return Math.floor(Math.random() * 2 ** 31);
}

function caption(el, prompt, meta) {
  const p = document.createElement("span");
  p.className = "prompt";
  p.textContent = prompt; // text, never HTML: a prompt may contain markup
  const m = document.createElement("span");
  m.textContent = meta;
  el.replaceChildren(p, m);
}

function addToGallery(b64, prompt, meta) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = "generated image";
  const cap = document.createElement("figcaption");
  caption(cap, prompt, meta);
  fig.append(img, cap);
  $("gallery").prepend(fig);
  while ($("gallery").children.length > GALLERY_SIZE) $("gallery").lastElementChild.remove();
}

async function generate() {
  showError("");
  $("generate").disabled = true;
  $("generate-status").textContent = "generating...";
  try {
    const seed = intOrNull("seed") ?? randomSeed();
    const model = $("model").value || "base";
    const body = await requestBody(model, seed);
    const result = await api("POST", "v1/generate", body);
    // the prompt that was sent: the box may have been edited while the images were drawn
    for (const img of result.images) addToGallery(img.b64_json, body.prompt, model + " · seed " + img.seed);
    $("generate-status").textContent = "done";
  } catch (err) {
    showError(err.message);
    $("generate-status").textContent = "";
  } finally {
    $("generate").disabled = false;
  }
}

function sides() {
  const seed = intOrNull("seed") ?? randomSeed();
  if ($("compare-mode").value === "seeds") {
    const model = $("model").value;
    return [{model, seed: intOrNull("left-seed") ?? 1}, {model, seed: intOrNull("right-seed") ?? 2}];
  }
  return [{model: $("left-model").value, seed}, {model: $("right-model").value, seed}];
}

function setChoicesEnabled(on) {
  document.querySelectorAll(".choices button").forEach((b) => { b.disabled = !on; });
}

// What else made an image, recorded with a preference: its adapter's strength, its ControlNet and scale.
function madeWith(body) {
  const made = {};
  if (body.adapter) made.adapter_scale = body.adapter_scale;
  if (body.control) { made.control_model = body.control.model; made.control_scale = body.control.scale; }
  return made;
}

async function compare() {
  showError("");
  setChoicesEnabled(false);
  $("compare").disabled = true; // one comparison at a time: a second click must not draw (and show) another
  pair = null;
  $("feedback-status").textContent = "generating both...";
  try {
    const wanted = sides();
    const bodies = await Promise.all(wanted.map((s) => requestBody(s.model, s.seed)));
    const results = await Promise.all(bodies.map((b) => api("POST", "v1/generate", b)));
    const images = results.map((r, i) => ({b64_json: r.images[0].b64_json, model: wanted[i].model || "base",
                                           seed: r.seed, steps: bodies[i].steps, guidance: bodies[i].guidance,
                                           ...madeWith(bodies[i])}));
    ["left", "right"].forEach((side, i) => {
      $(side + "-img").src = "data:image/png;base64," + images[i].b64_json;
      caption($(side + "-caption"), bodies[i].prompt, images[i].model + " · seed " + images[i].seed);
    });
    pair = {id: newId(), prompt: bodies[0].prompt, negative_prompt: bodies[0].negative_prompt, images};
    $("feedback-status").textContent = "Which is better?";
    setChoicesEnabled(true);
  } catch (err) {
    showError(err.message);
    $("feedback-status").textContent = "";
  } finally {
    $("compare").disabled = false;
  }
}

// Records a choice for the comparison on screen. Its answer may come after a newer comparison was started:
// then that one (its buttons, its status line) is left as it is.
async function prefer(choice) {
  const shown = pair;
  if (!shown) return;
  showError("");
  setChoicesEnabled(false);
  const body = {id: shown.id, prompt: shown.prompt, images: shown.images, choice};
  if (shown.negative_prompt) body.negative_prompt = shown.negative_prompt;
  try {
    const saved = await api("POST", "v1/feedback", body);
    if (pair !== shown) return;
    $("feedback-status").textContent = "Recorded: " + choice.replace("_", " ") + " (" + saved.id + ")";
    pair = null;
  } catch (err) {
    if (pair !== shown) {
      showError("the preference for the previous comparison was not recorded: " + err.message);
    } else if (err.status === 409) { // an earlier click on this comparison reached the server after all
      $("feedback-status").textContent = "Already recorded: an earlier click on this comparison reached the server";
      pair = null;
    } else {
      showError(err.message);
      setChoicesEnabled(true);
    }
  }
}

function init() {
  $("api-key").value = apiKey();
  $("key-status").textContent = apiKey() ? "key set for this tab" : "";
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    // A header carries no other character: kept, such a key would fail every call as "cannot reach the server"
    if (/[^\x20-\x7e]/.test(key)) {
      showError("not used: the API key holds a character other than printable ASCII (a hidden or typographic "
                + "character pasted with it?)");
      return;
    }
    sessionStorage.setItem(KEY_SLOT, key);
    $("key-status").textContent = apiKey() ? "key set for this tab" : "no key";
    loadModels().then(() => showError(""), (err) => showError(err.message));
  });
  $("generate").addEventListener("click", generate);
  $("compare").addEventListener("click", compare);
  $("compare-mode").addEventListener("change", () => {
    const bySeeds = $("compare-mode").value === "seeds";
    document.querySelectorAll(".by-seeds").forEach((el) => { el.hidden = !bySeeds; });
    document.querySelectorAll(".by-adapters").forEach((el) => { el.hidden = bySeeds; });
  });
  document.querySelectorAll(".choices button").forEach((b) => {
    b.addEventListener("click", () => prefer(b.dataset.choice));
  });
  loadModels().catch((err) => showError(err.message));
}

document.addEventListener("DOMContentLoaded", init);
