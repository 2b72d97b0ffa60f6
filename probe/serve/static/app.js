// The search page: pick an image, POST it to /indexes/{name}/search and (optionally) a classifier, show the results;
// or, for an index of a CLIP store (/models: text_search), type a text and GET /indexes/{name}/search/text.
"use strict";
const $ = (id) => document.getElementById(id);
let catalog = null;

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${r.status}: ${body.detail || r.statusText}`);
  return body;
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

async function loadCatalog() {
  catalog = await api("/models");
  const b = catalog.backbone;
  $("backbone").textContent = `${b.name} · ${b.dim}-d · ${b.device}`;
  for (const i of catalog.indexes) $("index").append(option(i.name, `${i.name} (${i.count} images)`));
  for (const h of catalog.heads) $("classifier").append(option(`head:${h.name}`, `head ${h.name} (${h.kind})`));
  for (const s of catalog.fewshot_sets.filter((s) => s.usable))
    $("classifier").append(option(`set:${s.name}`, `few-shot ${s.name}`));
  if (catalog.heads.length) $("classifier").value = `head:${catalog.heads[0].name}`;
  if (!catalog.indexes.length) setStatus("no index is loaded: start the server with --store or --index", true);
  showTextForm();
}

function selectedIndex() {
  return catalog && catalog.indexes.find((i) => i.name === $("index").value);
}

function showTextForm() {  // text search only where the index's backbone has a text tower
  $("text-form").hidden = !(selectedIndex() || {}).text_search;
}

function hitsWanted() {
  const k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12));
  return Math.min(k, selectedIndex().count);
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "muted";
}

function busy(text) {  // a new query: the last one's panels go until its own answers come
  $("predictions").hidden = true;
  $("results").hidden = true;
  document.body.dataset.state = "busy";
  setStatus(text);
}

function form(file) {
  const f = new FormData();
  f.append("file", file, file.name);
  return f;
}

function showPredictions(result, source) {
  $("pred-list").replaceChildren(...result.top.map((t) => {
    const li = document.createElement("li");
    li.className = "prediction";
    li.dataset.class = t.class;
    li.textContent = `${t.class} — ${(100 * t.probability).toFixed(1)}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(2, 120 * t.probability)}px`;
    li.append(bar);
    return li;
  }));
  const unknown = result.rejected  // head classify: farther than the threshold from every class mean
    ? ` — unknown: distance ${result.distance.toFixed(3)} > ${result.reject.threshold.toFixed(3)}` : "";
  const labels = result.labels  // multi-label head: every class at or above its threshold
    ? ` — labels: ${result.labels.map((l) => l.class).join(", ") || "none"}` : "";
  $("pred-source").textContent = `(${source})${unknown}${labels}`;
  $("predictions").hidden = false;
}

function showHits(index, result) {
  const metric = result.metric === "cosine" ? "cosine" : "distance";
  $("grid").replaceChildren(...result.hits.map((h) => {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.id = h.id;
    card.dataset.path = h.path;
    card.dataset.score = h.score;
    const img = document.createElement("img");
    img.src = `/indexes/${encodeURIComponent(index)}/items/${h.id}/image?size=160`;
    img.alt = h.path;
    const cap = document.createElement("figcaption");
    cap.innerHTML = `<div><span class="rank">#${h.rank}</span> <span class="score"></span></div>
                     <div class="label"></div><div class="path"></div>`;
    cap.querySelector(".score").textContent = `${metric} ${h.score.toFixed(4)}`;
    cap.querySelector(".label").textContent = h.label ?? "";
    cap.querySelector(".path").textContent = h.path;
    card.append(img, cap);
    return card;
  }));
  $("results").hidden = false;
}

async function query(file) {
  if (!file) return;
  $("query").src = URL.createObjectURL(file);
  $("query").hidden = false;
  busy(`searching with ${file.name}…`);
  const index = $("index").value;
  const jobs = [];
  if (index) {
    jobs.push(api(`/indexes/${encodeURIComponent(index)}/search?k=${hitsWanted()}`,
                  { method: "POST", body: form(file) }).then((r) => showHits(index, r)));
  }
  const [kind, name] = $("classifier").value.split(/:(.*)/s);
  if (name) {
    const multi = kind === "head" && catalog.heads.find((h) => h.name === name).multilabel;
    const url = kind === "head" ? `/heads/${encodeURIComponent(name)}/classify?k=5&reject=${multi ? "none" : "auto"}`
                                : `/fewshot/${encodeURIComponent(name)}/classify?k=5`;
    jobs.push(api(url, { method: "POST", body: form(file) })
      .then((r) => showPredictions(r, `${kind === "head" ? "head" : "few-shot set"} ${name}`)));
  }
  const failed = (await Promise.allSettled(jobs)).filter((j) => j.status === "rejected");
  if (failed.length) setStatus(failed.map((f) => f.reason.message).join(" · "), true);
  else setStatus(`results for ${file.name}`);
  document.body.dataset.state = failed.length ? "error" : "done";
}

async function textQuery(text) {
  text = text.trim();
  if (!text) return;
  const index = $("index").value;
  $("query").hidden = true;
  busy(`searching for "${text}"…`);
  try {
    const q = new URLSearchParams({ text, k: hitsWanted() });
    showHits(index, await api(`/indexes/${encodeURIComponent(index)}/search/text?${q}`));
    setStatus(`results for "${text}"`);
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus(e.message, true);
    document.body.dataset.state = "error";
  }
}

$("file").addEventListener("change", (e) => query(e.target.files[0]));
$("index").addEventListener("change", showTextForm);
$("text-form").addEventListener("submit", (e) => { e.preventDefault(); textQuery($("text").value); });
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => query(e.dataTransfer.files[0]));
loadCatalog().catch((e) => setStatus(`cannot load /models: ${e.message}`, true));
