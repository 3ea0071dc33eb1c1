// The scoring page of `firmad serve`: score dropped or chosen images one by one, show them in
// a table that sorts, filters and pages, a gallery, a histogram, and a CSV of the results.
// Every text from a file name goes through textContent, never through HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN = document.querySelector('meta[name="firmad-token"]').content;
const rows = []; // {name, file, score, p, decision, error, url}
const view = {key: null, dir: 1, page: 0, filter: "", show: "all", size: 100};
let histUrl = null;
let pending = false;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function post(url, body, headers) {
  return fetch(url, {method: "POST", body, headers: {...headers, "X-Firmad-Token": TOKEN}});
}

function num(x, digits) { return x === null || x === undefined ? "" : x.toPrecision(digits); }

function decisionText(r) {
  if (r.error) return r.error;
  if (r.score === null) return "…";
  return r.decision === null ? "no threshold" : r.decision ? "anomaly" : "normal";
}

function decisionClass(r) {
  if (r.error) return "err";
  if (r.score === null || r.decision === null) return "muted";
  return r.decision ? "anomaly" : "normal";
}

function thumb(r) {
  if (!r.url) r.url = URL.createObjectURL(r.file);
  return r.url;
}

async function loadInfo() {
  const info = await (await fetch("/api/detector")).json();
  const thr = info.threshold === null ? "none (no decisions)" : info.threshold.toPrecision(6);
  const held = info.heldout === null ? "" : `, ${info.heldout} held-out normal scores`;
  $("info").textContent = `Scorer ${info.scorer}; input ${info.input}; threshold ${thr}${held}.`;
  $("scale").textContent = info.scale;
  if (info.heldout !== null) {
    $("pwords").textContent = `p-value: the share of the ${info.heldout} held-out normal ` +
      "images that score at least as high (counting the image itself); small means unusual.";
  }
  for (const r of info.reports) {
    if (!r.url.startsWith("/reports/")) continue;
    const li = el("li"); const a = el("a", r.name); a.href = r.url; li.append(a);
    $("reports").append(li);
  }
  drawHistogram();
}

async function drawHistogram() {
  const scores = rows.filter((r) => r.score !== null).map((r) => r.score);
  const resp = await post("/api/histogram", JSON.stringify({scores}),
    {"Content-Type": "application/json"});
  if (!resp.ok) return;
  if (histUrl) URL.revokeObjectURL(histUrl);
  histUrl = URL.createObjectURL(await resp.blob());
  $("hist").src = histUrl;
}

function figure(r) {
  const f = el("figure"); const img = el("img"); img.src = thumb(r); img.alt = r.name;
  const p = r.p === null ? "" : `, p ${num(r.p, 3)}`;
  const path = el("div", r.name, "path"); path.title = r.name;
  f.append(img, el("div", `${num(r.score, 4)}${p}`, r.decision ? "anomaly" : ""), path);
  return f;
}

function drawGallery() {
  const sorted = rows.filter((r) => r.score !== null).sort((a, b) => b.score - a.score);
  const nTop = Math.min(8, Math.ceil(sorted.length / 2));
  const nLow = Math.min(8, sorted.length - nTop);
  $("top").replaceChildren(...sorted.slice(0, nTop).map(figure));
  $("low").replaceChildren(...sorted.slice(sorted.length - nLow).reverse().map(figure));
}

function compare(a, b) {
  const key = view.key;
  const va = key === "decision" ? decisionText(a) : a[key];
  const vb = key === "decision" ? decisionText(b) : b[key];
  const missA = va === null || va === undefined; const missB = vb === null || vb === undefined;
  if (missA || missB) return missA - missB; // unscored rows last, either way
  if (va < vb) return -view.dir;
  if (va > vb) return view.dir;
  return 0;
}

function shown() {
  const needle = view.filter.toLowerCase();
  let out = rows.filter((r) => {
    if (needle && !r.name.toLowerCase().includes(needle)) return false;
    if (view.show === "anomaly") return r.decision === 1;
    if (view.show === "normal") return r.decision === 0;
    if (view.show === "error") return Boolean(r.error);
    return true;
  });
  if (view.key) out = out.slice().sort(compare); // stable: ties keep the scoring order
  return out;
}

function rowOf(r) {
  const tr = el("tr"); const img = el("img", null, "thumb");
  img.src = thumb(r); img.alt = ""; img.loading = "lazy";
  const cells = [el("td"), el("td", r.name, "path"), el("td", num(r.score, 6), "num"),
    el("td", num(r.p, 3), "num"), el("td", decisionText(r), decisionClass(r))];
  cells[0].append(img); tr.append(...cells);
  return tr;
}

function render() {
  pending = false;
  const list = shown();
  const pages = Math.max(1, Math.ceil(list.length / view.size));
  view.page = Math.min(view.page, pages - 1);
  const start = view.page * view.size;
  const part = list.slice(start, start + view.size);
  $("results").tBodies[0].replaceChildren(...part.map(rowOf));
  $("pageinfo").textContent = list.length
    ? `rows ${start + 1}-${start + part.length} of ${list.length}` +
      (list.length < rows.length ? ` (${rows.length} in all)` : "")
    : `no rows${rows.length ? ` (${rows.length} in all)` : ""}`;
  $("prev").disabled = view.page === 0;
  $("next").disabled = view.page >= pages - 1;
  for (const b of document.querySelectorAll("button.sort")) {
    b.classList.toggle("asc", b.dataset.key === view.key && view.dir === 1);
    b.classList.toggle("desc", b.dataset.key === view.key && view.dir === -1);
  }
}

function scheduleRender() {
  if (!pending) { pending = true; requestAnimationFrame(render); }
}

async function scoreOne(r) {
  try {
    const resp = await post("/api/score", r.file, {"X-Filename": encodeURIComponent(r.name)});
    const j = await resp.json();
    if (!resp.ok) throw new Error(j.error || resp.statusText);
    r.score = j.score; r.p = j.p_value; r.decision = j.decision;
  } catch (err) {
    r.error = err.message;
  }
}

function byName(a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; }

async function scoreAll(items) {
  items.sort(byName); // folders in the order `firmad score` reads them
  const added = items.map(({file, name}) =>
    ({name, file, score: null, p: null, decision: null, error: null, url: null}));
  rows.push(...added);
  render();
  for (const [i, r] of added.entries()) {
    $("status").textContent = `scoring ${i + 1} of ${added.length}…`;
    await scoreOne(r);
    scheduleRender();
  }
  const scored = rows.filter((r) => r.score !== null);
  const flagged = scored.filter((r) => r.decision === 1).length;
  const failed = rows.filter((r) => r.error).length;
  $("status").textContent = `${scored.length} scored, ${flagged} flagged as anomalies, ` +
    `${failed} could not be read.`;
  render(); drawGallery(); drawHistogram();
}

function csvField(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function downloadCsv() {
  const lines = [["path", "score", "p_value", "anomaly", "error"].join(",")];
  for (const r of shown()) {
    const anomaly = r.decision === null ? "" : r.decision;
    lines.push([r.name, r.score, r.p, anomaly, r.error].map(csvField).join(","));
  }
  const blob = new Blob([lines.join("\r\n") + "\r\n"], {type: "text/csv"});
  const a = el("a"); a.href = URL.createObjectURL(blob); a.download = "scores.csv";
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

async function walk(entry, out) {
  if (entry.isFile) {
    out.push({file: await new Promise((ok, bad) => entry.file(ok, bad)),
              name: entry.fullPath.replace(/^\//, "")});
    return;
  }
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
    if (!batch.length) break;
    for (const e of batch) await walk(e, out);
  }
}

function setUp() {
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    const entries = [...ev.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry());
    const plain = [...ev.dataTransfer.files];
    const items = [];
    if (entries.length && entries.every(Boolean)) { for (const e of entries) await walk(e, items); }
    else for (const f of plain) items.push({file: f, name: f.name});
    scoreAll(items);
  });
  for (const id of ["files", "folder"]) {
    $(id).addEventListener("change", (ev) => {
      const items = [...ev.target.files].map((f) => ({file: f, name: f.webkitRelativePath || f.name}));
      ev.target.value = "";
      scoreAll(items);
    });
  }
  $("clear").addEventListener("click", () => {
    for (const r of rows) if (r.url) URL.revokeObjectURL(r.url);
    rows.length = 0; $("status").textContent = ""; render(); drawGallery(); drawHistogram();
  });
  $("filter").addEventListener("input", (ev) => { view.filter = ev.target.value; view.page = 0; render(); });
  $("show").addEventListener("change", (ev) => { view.show = ev.target.value; view.page = 0; render(); });
  $("pagesize").addEventListener("change", (ev) => { view.size = Number(ev.target.value); view.page = 0; render(); });
  $("prev").addEventListener("click", () => { view.page -= 1; render(); });
  $("next").addEventListener("click", () => { view.page += 1; render(); });
  $("csv").addEventListener("click", downloadCsv);
  for (const b of document.querySelectorAll("button.sort")) {
    b.addEventListener("click", () => {
      const key = b.dataset.key;
      // a new column starts with its most useful order: scores high first, names A-Z
      view.dir = view.key === key ? -view.dir : (key === "score" ? -1 : 1);
      view.key = key; render();
    });
  }
  render();
  loadInfo();
}

setUp();
