// The search page: an image in (drop, paste, pick, or click a result), its nearest images out.
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const auth = token ? { Authorization: `Bearer ${token}` } : {};
const $ = (id) => document.getElementById(id);

function imageUrl(row, size) {
  const params = new URLSearchParams();
  if (size) params.set("size", size);
  if (token) params.set("access_token", token);
  return `/images/${row}?${params}`;
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...auth, ...(options.headers || {}) } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

function card(match, extra) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.row = match.row;
  const img = document.createElement("img");
  img.src = imageUrl(match.row, 128);
  img.alt = match.filename;
  img.title = `search by ${match.filename}`;
  img.addEventListener("click", () => searchRow(match.row, match.filename));
  const item = document.createElement("div");
  item.className = "item";
  item.textContent = match.item;
  item.title = "all images of this item";
  item.addEventListener("click", () => browseItem(match.item));
  const labels = document.createElement("div");
  labels.className = "labels";
  labels.textContent = (match.labels || []).join(", ");
  div.append(img, item, labels);
  if (extra) {
    const similarity = document.createElement("span");
    similarity.className = "similarity";
    similarity.textContent = extra;
    div.prepend(similarity);
  }
  return div;
}

function show(title, matches, withSimilarity) {
  $("results-title").textContent = title;
  $("results").replaceChildren(...matches.map((m) => card(m, withSimilarity ? m.similarity.toFixed(3) : "")));
  $("status").textContent = "";
}

function query() {
  const params = new URLSearchParams({ k: $("k").value, by_item: $("by-item").checked });
  if ($("label").value) params.set("label", $("label").value);
  return params;
}

async function run(title, promise) {
  $("status").textContent = "searching…";
  try {
    const body = await promise;
    show(title, body.neighbours, true);
  } catch (e) {
    $("status").textContent = e.message;
  }
}

let lastQuery = null;

function searchFile(file) {
  lastQuery = () => searchFile(file);
  $("query-image").src = URL.createObjectURL(file);
  $("query-image").hidden = false;
  $("drop-text").hidden = true;
  const form = new FormData();
  form.append("image", file);
  run(`nearest to ${file.name || "the pasted image"}`, call(`/search?${query()}`, { method: "POST", body: form }));
}

function searchRow(row, filename) {
  lastQuery = () => searchRow(row, filename);
  $("query-image").src = imageUrl(row, 200);
  $("query-image").hidden = false;
  $("drop-text").hidden = true;
  const params = query();
  params.set("row", row);
  run(`nearest to ${filename}`, call(`/search?${params}`, { method: "POST" }));
}

async function browseItem(item) {
  try {
    const body = await call(`/items/${encodeURIComponent(item)}`);
    const matches = body.images.map((image) => ({ ...image, item: body.item, labels: body.labels }));
    show(`item ${body.item}: ${matches.length} images`, matches, false);
  } catch (e) {
    $("status").textContent = e.message;
  }
}

const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target.tagName !== "INPUT") $("file").click(); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => { if (e.target.files.length) searchFile(e.target.files[0]); });
document.addEventListener("paste", (e) => {
  const file = [...e.clipboardData.files][0];
  if (file) searchFile(file);
});
for (const id of ["k", "by-item", "label"]) $(id).addEventListener("change", () => lastQuery && lastQuery());

call("/info").then((info) => {
  $("info").textContent = `${info.rows.toLocaleString()} images of ${info.items.toLocaleString()} items, ` +
    `${info.engine}, ${info.dim}-d`;
  $("k").max = info.rows;
  for (const label of info.labels.slice(0, 500)) $("label").append(new Option(label, label));
}).catch((e) => { $("info").textContent = e.message; });
