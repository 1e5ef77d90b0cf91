// What every page of the vlmtag web app shares: its settings, its words, and how it posts.
// Every text from the database goes in with textContent: a model that answers <script> shows text.
"use strict";

const config = JSON.parse(document.getElementById("config").textContent);
const W = config.words;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// A change: JSON, with the page's token (the server refuses a POST without it).
async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json", "x-vlmtag-token": config.token },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}
