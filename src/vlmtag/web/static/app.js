// vlmtag web app: the grid (endless, keyset pages), filters in the URL, the viewer and its keys.
// Every text from the database goes in with textContent: a model that answers <script> shows text.
"use strict";

const MAX_TILES = 1200; // tiles kept in the page; the farthest pages go when there are more
const state = { tiles: [], after: null, loading: false, done: false, index: -1, focus: -1,
  selected: new Set(), allResults: false, excluded: new Set(), total: null, anchor: -1, generation: 0,
  busy: false, current: null };
const FILTER_KEYS = ["q", "semantic", "sort", "model", "language", "review", "folder", "show", "conf", "from", "to"];

function params() { return new URLSearchParams(location.search); }

function apiQuery(after) {
  const p = params();
  const q = new URLSearchParams();
  for (const key of FILTER_KEYS) {
    if (p.get(key)) q.set(key, p.get(key));
  }
  for (const tag of p.getAll("tag")) q.append("tag", tag);
  if (after) q.set("after", after);
  return q;
}

function setParamsNow(values) {
  const p = params();
  for (const [key, value] of Object.entries(values)) { if (value) p.set(key, value); else p.delete(key); }
  p.delete("lang");
  history.pushState(null, "", "?" + p.toString());
  reload();
}

function setParam(key, value, many) {
  const p = params();
  if (many) { p.append(key, value); } else if (value) { p.set(key, value); } else { p.delete(key); }
  p.delete("lang");
  history.pushState(null, "", "?" + p.toString());
  reload();
}

// ---- the grid ----------------------------------------------------------------------------

function tileNode(tile, i) {
  const node = el("div", { class: "tile", role: "listitem", "data-index": String(i), "data-id": tile.id });
  // A failed file is shown by its reason: most failures are pictures that cannot be read.
  if (tile.id && !tile.failure) {
    const img = el("img", { loading: "lazy", alt: tile.path, src: `/picture/${tile.id}/grid` });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "missing", title: tile.path }, "?")));
    node.append(img);
  } else {
    node.append(el("div", { class: "missing", title: tile.path }, "!"));
  }
  if (tile.failure) {
    node.classList.add("failed");
    node.append(el("div", { class: "kw mono", title: tile.path }, tile.path.split("/").pop()),
      el("div", { class: "kw reason", title: tile.failure }, tile.failure));
  } else {
    node.append(el("div", { class: "kw", title: tile.path }, keywordLine(tile)));
  }
  if (tile.id && !tile.failure && !config.readOnly) {
    // A tap target of its own: touch screens have no Ctrl or Shift.
    const pick = el("button", { type: "button", class: "pick", title: W.select, "aria-label": `${W.select} ${tile.path}` }, "✓");
    pick.addEventListener("click", (event) => { event.stopPropagation(); toggle(tile.id, i); });
    node.append(pick);
  }
  node.addEventListener("click", (event) => onTileClick(event, i));
  if (isSelected(tile.id)) node.classList.add("selected");
  return node;
}

function keywordLine(tile) { return tile.keywords.map((k) => k.text).join(", ") || "—"; }
function isSelected(id) { return state.allResults ? !state.excluded.has(id) : state.selected.has(id); }

async function loadMore() {
  if (state.loading || state.done) return;
  state.loading = true;
  const generation = state.generation;
  try {
    const response = await fetch("/api/images?" + apiQuery(state.after).toString());
    const page = await response.json();
    if (generation !== state.generation) return;
    if (!response.ok) { $("count").textContent = page.error || response.statusText; state.done = true; return; }
    const grid = $("grid");
    const start = state.tiles.length;
    page.tiles.forEach((tile, n) => { state.tiles.push(tile); grid.append(tileNode(tile, start + n)); });
    state.after = page.after;
    state.done = !page.after;
    $("note").textContent = page.note ? `${W.note}: ${page.note}` : "";
    if (page.total !== null && page.total !== undefined) showCount(page.total);
    else if (!state.counted) loadCount(generation);
    $("empty").hidden = state.tiles.length > 0;
    $("select-all").hidden = config.readOnly || state.allResults || !state.tiles.length || params().get("show") === "failed";
    $("sentinel").hidden = state.done;
    dropFar();
  } finally {
    state.loading = false;
  }
}

async function loadCount(generation) {
  state.counted = true;
  const response = await fetch("/api/count?" + apiQuery(null).toString());
  const answer = await response.json().catch(() => ({}));
  if (generation === state.generation && response.ok && answer.total !== null) showCount(answer.total);
}

function showCount(total) { state.total = total; $("count").textContent = imagesText(total); }
function imagesText(n) { return `${n} ${n === 1 ? W.image : W.images}`; }

function dropFar() {
  // Far pages leave the page (never one giant container of images); their place is kept.
  const grid = $("grid");
  const nodes = grid.querySelectorAll(".tile:not(.gone)");
  if (nodes.length <= MAX_TILES) return;
  for (const node of Array.from(nodes).slice(0, nodes.length - MAX_TILES)) {
    // Emptied but as tall as it was: what is on screen does not move.
    node.style.height = `${node.offsetHeight}px`;
    node.style.visibility = "hidden";
    node.classList.add("gone");
    node.replaceChildren();
  }
}

function toggleFilters() { document.querySelector(".side").classList.toggle("open"); }

function reload() {
  state.generation += 1;
  clearTimeout(chipsTimer);
  state.tiles = []; state.after = null; state.done = false; state.loading = false; state.counted = false;
  state.selected.clear(); state.allResults = false; state.excluded.clear(); state.total = null; state.anchor = -1;
  paintSelection();
  $("grid").replaceChildren();
  $("count").textContent = "";
  syncControls();
  loadMore();
  loadCloud();
}

function syncControls() {
  const p = params();
  $("q").value = p.get("q") || "";
  $("sort").value = p.get("sort") || "path";
  $("model").value = p.get("model") || "";
  $("language").value = p.get("language") || "";
  $("semantic").checked = p.get("semantic") === "1";
  $("show").value = p.get("show") || "tagged";
  $("review").checked = p.get("review") === "1";
  $("folder").value = p.get("folder") || "";
  $("conf").value = p.get("conf") || "";
  $("from").value = p.get("from") || "";
  $("to").value = p.get("to") || "";
  $("sort").disabled = $("semantic").checked && !!p.get("q");
  const active = $("active-tags");
  active.replaceChildren();
  for (const tag of p.getAll("tag")) {
    const chip = el("span", { class: "chip person" }, tag);
    const remove = el("button", { type: "button", title: W.clear_filters }, "×");
    remove.addEventListener("click", () => {
      const next = params();
      const kept = next.getAll("tag").filter((t) => t !== tag);
      next.delete("tag"); kept.forEach((t) => next.append("tag", t));
      history.pushState(null, "", "?" + next.toString()); reload();
    });
    chip.append(remove); active.append(chip);
  }
}

async function loadCloud(limit) {
  const response = await fetch(`/api/tags?limit=${limit || 40}`);
  const answer = await response.json();
  const cloud = $("cloud");
  cloud.replaceChildren();
  for (const tag of answer.tags) {
    const button = el("button", { type: "button" }, tag.text);
    button.append(el("small", {}, String(tag.count)));
    button.addEventListener("click", () => setParam("tag", tag.text, true));
    cloud.append(button);
  }
  $("more-tags").hidden = answer.total <= answer.tags.length;
  const suggest = $("suggest");
  suggest.replaceChildren(...answer.tags.map((t) => el("option", { value: t.text })));
}

function toggle(id, i) {
  // With every result selected, a toggle leaves one out (or takes it back in).
  const set = state.allResults ? state.excluded : state.selected;
  set.has(id) ? set.delete(id) : set.add(id);
  state.anchor = i;
  paintSelection();
}

function onTileClick(event, i) {
  const tile = state.tiles[i];
  if (!tile.id || tile.failure) return; // a failed file: its reason is all there is to show
  if ((event.ctrlKey || event.metaKey) && !event.shiftKey) { toggle(tile.id, i); return; }
  if (event.shiftKey && state.allResults) { state.allResults = false; state.excluded.clear(); state.selected.clear(); }
  if (event.shiftKey && state.anchor >= 0) {
    const [a, b] = [Math.min(state.anchor, i), Math.max(state.anchor, i)];
    for (let n = a; n <= b; n++) if (state.tiles[n].id) state.selected.add(state.tiles[n].id);
    paintSelection();
    return;
  }
  state.anchor = i;
  openViewer(i);
}

function paintSelection() {
  for (const node of $("grid").querySelectorAll(".tile")) {
    node.classList.toggle("selected", isSelected(node.dataset.id));
  }
  const any = state.allResults || state.selected.size > 0;
  $("bulk").hidden = !any || config.readOnly;
  // Counted as pictures (copies of one picture are one), as the server counts them.
  $("bulk-count").textContent = state.allResults ? `${W.all_results}…` : `${state.selected.size} ${W.selected}`;
  $("select-all").hidden = config.readOnly || state.allResults || !state.tiles.length || params().get("show") === "failed";
  if (any && !config.readOnly) selectionChips(); else $("bulk-chips").replaceChildren();
}

// What the selection is, for the server: its ids, or every result of the grid's filters.
function selectionBody() {
  return state.allResults ? { all: true, except: Array.from(state.excluded) } : { ids: Array.from(state.selected) };
}
function selectionPath(path) { return state.allResults ? `${path}?${apiQuery(null).toString()}` : path; }

let chipsTimer = null;
function selectionChips() {
  // The selection's keywords: solid where every selected image has one, dashed with a
  // count where only some do. Click a partial one to give it to all; × takes it from all.
  clearTimeout(chipsTimer);
  chipsTimer = setTimeout(async () => {
    const generation = state.generation;
    if (!state.allResults && !state.selected.size) return; // cleared meanwhile
    let answer;
    try { answer = await post(selectionPath("/api/selection"), selectionBody()); }
    catch (error) { $("bulk-status").textContent = `${W.error}: ${error.message}`; return; }
    if (generation !== state.generation) return;
    $("bulk-count").textContent = state.allResults
      ? `${W.all_results}: ${answer.images} ${W.selected}` : `${answer.images} ${W.selected}`;
    const chips = $("bulk-chips");
    chips.replaceChildren();
    for (const k of answer.keywords.slice(0, 40)) {
      const whole = k.count === answer.images;
      const chip = el("span", { class: `chip ${whole ? "person" : "partial"}`, title: whole ? W.all_have : W.some_have,
        "data-keyword": k.text }, k.text);
      if (!whole) {
        chip.append(el("small", {}, `${k.count}/${answer.images}`));
        chip.addEventListener("click", (event) => { if (event.target === chip) bulk("add", k.text); });
      }
      const reject = el("button", { type: "button", title: W.reject, "aria-label": `${W.reject} ${k.text}` }, "×");
      reject.addEventListener("click", () => bulk("reject", k.text));
      chip.append(reject);
      chips.append(chip);
    }
  }, 150);
}

async function bulk(action, given) {
  const word = (given || $("bulk-input").value).trim();
  if (!word || !(state.allResults || state.selected.size)) return;
  try {
    const answer = await post(selectionPath("/api/decide"), { ...selectionBody(), action, keywords: [word] });
    $("bulk-status").textContent = `${W.saved} (${imagesText(answer.images)})`;
    if (!given) $("bulk-input").value = "";
    await refreshTiles(state.allResults ? state.tiles.map((t) => t.id).filter(Boolean) : Array.from(state.selected));
    selectionChips();
  } catch (error) { $("bulk-status").textContent = `${W.error}: ${error.message}`; }
}

// ---- the viewer --------------------------------------------------------------------------

async function openViewer(i) {
  if (i < 0 || i >= state.tiles.length) return;
  state.index = i; state.focus = -1; state.current = null;
  const tile = state.tiles[i];
  $("viewer").hidden = false;
  $("view-img").src = `/picture/${tile.id}/view`;
  $("view-img").alt = tile.path;
  await showDetails(tile.id);
  if (i >= state.tiles.length - 5) loadMore();
}

async function showDetails(id) {
  state.busy = true;
  let response, image;
  try {
    response = await fetch(`/api/image/${id}`);
    image = await response.json().catch(() => ({}));
  } finally { state.busy = false; }
  if (state.index >= 0 && state.tiles[state.index] && state.tiles[state.index].id !== id) return; // moved on
  if (!response.ok) { status(image.error || response.statusText, true); return; }
  $("view-path").textContent = image.path;
  const chips = $("view-chips");
  chips.replaceChildren();
  image.keywords.forEach((k, n) => {
    const chip = el("span", { class: `chip ${k.source}`, "data-n": String(n), tabindex: "0",
      title: k.source === "person" ? W.person_kw : W.model_kw }, k.text);
    if (k.confidence !== null && k.confidence !== undefined) {
      chip.append(el("small", {}, `${Math.round(k.confidence * 100)}%`));
    }
    if (!config.readOnly) {
      const reject = el("button", { type: "button", title: W.reject, "aria-label": `${W.reject} ${k.text}` }, "×");
      reject.addEventListener("click", () => decide("reject", [k.text]));
      chip.append(reject);
    }
    chips.append(chip);
  });
  $("view-desc").textContent = image.description || "";
  $("desc-input").value = image.description || "";
  const facts = $("view-facts");
  facts.replaceChildren();
  const rows = [[W.model, image.model], [W.language_filter, image.language],
    [W.size, image.width ? `${image.width} × ${image.height}` : ""]];
  for (const other of image.other_paths) rows.push([W.other_paths, other]);
  for (const [k, v] of rows) { if (v) facts.append(el("dt", {}, k), el("dd", {}, v)); }
  state.current = image;
  paintFocus();
}

function closeViewer() { $("viewer").hidden = true; state.index = -1; if (document.fullscreenElement) document.exitFullscreen(); }

function move(step) { if (state.index >= 0) openViewer(state.index + step); }

function status(text, bad) { const s = $("status"); s.textContent = text; s.style.color = bad ? "#b3261e" : ""; }

function targets() {
  if (state.index >= 0 && !$("viewer").hidden) return [state.tiles[state.index].id];
  return Array.from(state.selected);
}

async function decide(action, keywords) {
  const ids = targets();
  if (!ids.length || !keywords.length) return;
  try {
    await post("/api/decide", { ids, action, keywords });
    status(W.saved);
    if (!$("viewer").hidden) await showDetails(ids[0]);
    refreshTiles(ids);
  } catch (error) { status(`${W.error}: ${error.message}`, true); }
}

async function refreshTiles(ids) {
  // The tiles' keywords read again, a few hundred pictures a request.
  const wanted = new Set(ids);
  const list = Array.from(wanted);
  for (let n = 0; n < list.length; n += 500) {
    let answer;
    try { answer = await post("/api/keywords", { ids: list.slice(n, n + 500) }); } catch (error) { return; }
    state.tiles.forEach((tile, i) => {
      if (!(tile.id in answer.keywords)) return;
      tile.keywords = answer.keywords[tile.id];
      const node = $("grid").querySelector(`.tile[data-index="${i}"] .kw`);
      if (node) node.textContent = keywordLine(tile);
    });
  }
}

function paintFocus() {
  for (const chip of $("view-chips").querySelectorAll(".chip")) {
    chip.classList.toggle("focused", Number(chip.dataset.n) === state.focus);
  }
}

// ---- keys --------------------------------------------------------------------------------

function typing(event) {
  const t = event.target;
  return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
}

document.addEventListener("keydown", (event) => {
  if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) {
    if (event.key === "Escape" && typing(event)) {
      if (event.target.id === "desc-input") cancelDescription();
      event.target.blur();
    }
    return;
  }
  const open = !$("viewer").hidden;
  const key = event.key;
  if (key === "?") { $("help").hidden = !$("help").hidden; return; }
  if (key === "Escape") {
    if (!$("help").hidden) { $("help").hidden = true; return; } // one Esc, one thing closed
    if (open) closeViewer();
    return;
  }
  if (!open && key === "u" && !config.readOnly) { undo(); return; }
  if (!open) {
    if ((key === "Enter" || key === "j" || key === "ArrowRight") && state.tiles.length) openViewer(Math.max(0, state.anchor));
    return;
  }
  // Keys that change something wait for the picture on screen: never the one before's.
  const shown = state.current && state.tiles[state.index] && state.current.id === state.tiles[state.index].id;
  const keywords = shown ? state.current.keywords : [];
  if (key === "j" || key === "ArrowRight") { move(1); event.preventDefault(); }
  else if (key === "k" || key === "ArrowLeft") { move(-1); event.preventDefault(); }
  else if (key === "ArrowDown" || key === "l") { state.focus = Math.min(keywords.length - 1, state.focus + 1); paintFocus(); event.preventDefault(); }
  else if (key === "ArrowUp" || key === "h") { state.focus = Math.max(0, state.focus - 1); paintFocus(); event.preventDefault(); }
  else if (key === "x" && !config.readOnly) {
    // Only the keyword the ring shows: with none focused, x says how to focus one.
    const chosen = state.focus >= 0 ? keywords[state.focus] : null;
    if (chosen) decide("reject", [chosen.text]); else if (shown) status(W.focus_first);
  }
  else if (key === "a" && !config.readOnly && shown) {
    const suggested = keywords.filter((k) => k.source === "model").map((k) => k.text);
    if (suggested.length) decide("add", suggested);
  }
  else if (key === "t" && !config.readOnly) { event.preventDefault(); $("add-input").focus(); }
  else if (key === "e" && !config.readOnly) { event.preventDefault(); editDescription(); }
  else if (key === "u" && !config.readOnly) undo();
  else if (key === "f") { const stage = document.querySelector(".stage"); if (stage.requestFullscreen) stage.requestFullscreen(); }
});

function editDescription() { $("desc-form").hidden = false; $("view-desc").hidden = true; $("desc-input").focus(); }

async function undo() {
  // In the viewer: the last action on this picture. On the grid: the last action, on
  // whatever pictures it touched (a bulk edit is one action). Again: the one before.
  const inViewer = state.index >= 0 && !$("viewer").hidden;
  const id = inViewer ? state.tiles[state.index].id : null;
  const say = inViewer ? status : (text) => { $("bulk-status").textContent = text; $("count-status").textContent = text; };
  try {
    const answer = await post("/api/undo", { id });
    say(answer.undone ? `${W.undone} (${answer.undone})` : W.nothing_to_undo);
    if (inViewer) await showDetails(id);
    await refreshTiles(answer.ids && answer.ids.length ? answer.ids : state.tiles.map((t) => t.id).filter(Boolean));
    if (state.allResults || state.selected.size) selectionChips();
  } catch (error) { say(`${W.error}: ${error.message}`, true); }
}

// ---- keyword autocomplete: the library's keywords that start so, most used first -------

let suggestTimer = null;
function suggestFor(input) {
  clearTimeout(suggestTimer);
  suggestTimer = setTimeout(async () => {
    const prefix = input.value.trim();
    if (!prefix) return;
    const response = await fetch(`/api/tags?limit=20&prefix=${encodeURIComponent(prefix)}`);
    if (!response.ok) return;
    const answer = await response.json();
    $("suggest").replaceChildren(...answer.tags.map((t) => el("option", { value: t.text })));
  }, 120);
}
for (const id of ["add-input", "bulk-input"]) $(id).addEventListener("input", (e) => suggestFor(e.target));

// ---- export ------------------------------------------------------------------------------

async function exportNow() {
  const format = $("export-format").value;
  const ids = state.allResults ? [] : Array.from(state.selected);
  const response = await fetch("/api/export?" + apiQuery(null).toString(), {
    method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json", "x-vlmtag-token": config.token },
    body: JSON.stringify({ format, ids }),
  });
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    $("export-status").textContent = `${W.error}: ${answer.error || response.statusText}`;
    return;
  }
  if (["xmp", "txt"].includes(format)) {
    const answer = await response.json();
    const written = Object.entries(answer.written).map(([k, v]) => `${k} ${v}`).join(", ");
    $("export-status").textContent = `${W.exported}: ${written || 0}`;
    return;
  }
  const blob = await response.blob();
  const link = el("a", { href: URL.createObjectURL(blob), download: `vlmtag-export.${format}` });
  document.body.append(link); link.click(); link.remove();
  $("export-status").textContent = W.exported;
}

// ---- wiring ------------------------------------------------------------------------------
$("export").addEventListener("submit", (event) => { event.preventDefault(); exportNow(); });

$("search").addEventListener("submit", (event) => { event.preventDefault(); setParam("q", $("q").value.trim()); });
$("sort").addEventListener("change", () => setParam("sort", $("sort").value));
$("model").addEventListener("change", () => setParam("model", $("model").value));
$("language").addEventListener("change", () => setParam("language", $("language").value));
$("semantic").addEventListener("change", () => { $("q").value.trim() ? setParamsNow({ semantic: $("semantic").checked ? "1" : "", q: $("q").value.trim() }) : setParam("semantic", $("semantic").checked ? "1" : ""); });
$("show").addEventListener("change", () => setParam("show", $("show").value === "tagged" ? "" : $("show").value));
$("review").addEventListener("change", () => setParam("review", $("review").checked ? "1" : ""));
$("folder-form").addEventListener("submit", (event) => { event.preventDefault(); setParam("folder", $("folder").value.trim()); });
$("folder").addEventListener("change", () => setParam("folder", $("folder").value.trim()));
$("conf").addEventListener("change", () => setParam("conf", $("conf").value));
$("from").addEventListener("change", () => setParam("from", $("from").value));
$("to").addEventListener("change", () => setParam("to", $("to").value));
$("select-all").addEventListener("click", () => { state.allResults = true; state.excluded.clear(); state.selected.clear(); paintSelection(); });
$("grid-undo").addEventListener("click", undo);
$("filters-toggle").addEventListener("click", toggleFilters);
$("clear").addEventListener("click", () => { history.pushState(null, "", "/"); reload(); });
$("more-tags").addEventListener("click", () => loadCloud(500));
$("close").addEventListener("click", closeViewer);
$("prev").addEventListener("click", () => move(-1));
$("next").addEventListener("click", () => move(1));
$("accept-all").addEventListener("click", () => {
  const suggested = (state.current ? state.current.keywords : []).filter((k) => k.source === "model").map((k) => k.text);
  if (suggested.length) decide("add", suggested);
});
$("undo").addEventListener("click", undo);
$("bulk").addEventListener("submit", (event) => { event.preventDefault(); bulk("add"); });
$("bulk-reject").addEventListener("click", () => bulk("reject"));
$("bulk-none").addEventListener("click", () => { state.selected.clear(); state.allResults = false; state.excluded.clear(); paintSelection(); });
$("add-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const word = $("add-input").value.trim();
  if (word) { decide("add", [word]); $("add-input").value = ""; $("add-input").blur(); }
});
$("desc-edit").addEventListener("click", editDescription);
function cancelDescription() { $("desc-form").hidden = true; $("view-desc").hidden = false; }
$("desc-cancel").addEventListener("click", cancelDescription);
$("desc-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await post("/api/describe", { ids: targets(), text: $("desc-input").value });
    $("desc-form").hidden = true; $("view-desc").hidden = false;
    status(W.saved); await showDetails(targets()[0]);
  } catch (error) { status(`${W.error}: ${error.message}`, true); }
});
if (config.readOnly) {
  for (const id of ["accept-all", "undo", "add-form", "desc-edit", "grid-undo", "select-all"]) $(id).hidden = true;
  // A download changes nothing; sidecars and captions would write beside the pictures.
  for (const option of $("export-format").querySelectorAll("option")) {
    if (["xmp", "txt"].includes(option.value)) option.remove();
  }
}
window.addEventListener("popstate", reload);
new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) loadMore(); },
  { rootMargin: "800px" }).observe($("sentinel"));
reload();
