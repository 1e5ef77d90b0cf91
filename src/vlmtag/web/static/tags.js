// vlmtag keyword manager: counts, rename, merge, drop (the operations of `vlmtag tags`).
// Keywords come from models: every one goes in with textContent.
"use strict";

const chosen = new Set();

function say(text, bad) { const s = $("tag-status"); s.textContent = text; s.style.color = bad ? "#b3261e" : ""; }

async function change(body) {
  try {
    const answer = await post("/api/vocab", body);
    say(W.saved);
    chosen.clear();
    await load();
  } catch (error) { say(`${W.error}: ${error.message}`, true); }
}

function row(tag) {
  const tr = el("tr", { "data-tag": tag.text });
  if (!config.readOnly) {
    const box = el("input", { type: "checkbox", "aria-label": tag.text });
    box.checked = chosen.has(tag.text);
    box.addEventListener("change", () => { box.checked ? chosen.add(tag.text) : chosen.delete(tag.text); });
    const td = el("td"); td.append(box); tr.append(td);
  }
  const name = el("td");
  const link = el("a", { href: "/?tag=" + encodeURIComponent(tag.text) }, tag.text);
  name.append(link);
  tr.append(name, el("td", { class: "num" }, String(tag.count)));
  if (!config.readOnly) {
    const form = el("form", { class: "rename" });
    const input = el("input", { value: tag.text, "aria-label": `${W.rename} ${tag.text}`, autocomplete: "off" });
    const button = el("button", { type: "submit" }, W.rename);
    form.append(input, button);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const into = input.value.trim();
      if (into && into !== tag.text) change({ action: "rename", keywords: [tag.text], into });
    });
    const cell = el("td"); cell.append(form); tr.append(cell);
    const drop = el("button", { type: "button", class: "danger" }, W.drop);
    drop.addEventListener("click", () => { if (confirm(`${W.drop_confirm}\n\n${tag.text}`)) change({ action: "drop", keywords: [tag.text] }); });
    const dropCell = el("td"); dropCell.append(drop); tr.append(dropCell);
  }
  return tr;
}

let timer = null;
async function load() {
  const prefix = $("tag-filter").value.trim();
  const response = await fetch(`/api/tags?limit=500&prefix=${encodeURIComponent(prefix)}`);
  const answer = await response.json().catch(() => ({ tags: [], total: 0 }));
  $("tag-rows").replaceChildren(...answer.tags.map(row));
  $("tag-total").textContent = W.shown_of.replace("{shown}", answer.tags.length).replace("{total}", answer.total);
}

$("tag-filter").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(load, 150); });
if (!config.readOnly) {
  $("merge-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const into = $("merge-into").value.trim();
    if (into && chosen.size) change({ action: "merge", keywords: Array.from(chosen), into });
  });
}
load();
