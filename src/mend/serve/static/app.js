// The page of `mend serve`: ask, edit (answers before and after side by side), roll back.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// Calls the API; throws an Error with the service's own words on a refusal.
async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token && method !== "GET") headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new Error(`the service cannot be reached (${e.message})`);
  }
  let data = {};
  try {
    data = await response.json();
  } catch (e) {
    data = { error: `the service answered ${response.status} without JSON` };
  }
  if (!response.ok) throw new Error(data.error || `refused with status ${response.status}`);
  return data;
}

async function busy(button, work) {
  button.disabled = true;
  showError("");
  try {
    await work();
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function showCompare(answers) {
  const body = $("compare").querySelector("tbody");
  body.replaceChildren();
  for (const a of answers) {
    const row = document.createElement("tr");
    cell(row, a.prompt);
    cell(row, a.before, "before");
    cell(row, a.after, "after");
    cell(row, a.reached ? "yes" : "no", a.reached ? "reached yes" : "reached no");
    body.appendChild(row);
  }
  $("compare").hidden = false;
}

const WRITES = {
  token: "; edits need the token",
  open: "; no token needed",
  off: "; this service takes no edits (started without a token)",
};
const PAGE = 100;

async function refresh() {
  const [{ edits, total }, health] = await Promise.all([
    api("GET", `/v1/edits?limit=${PAGE}`), api("GET", "/healthz"),
  ]);
  $("status").textContent = `${total} edit(s) applied` + (WRITES[health.writes] || "");
  $("more-edits").hidden = total <= edits.length;
  $("more-edits").textContent = `the first ${edits.length} of ${total} shown`;
  const list = $("edits");
  list.replaceChildren();
  $("no-edits").hidden = edits.length > 0;
  for (const e of edits) {
    const item = document.createElement("li");
    item.dataset.id = e.id;
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = e.requests.map((r) => `${r.prompt} → ${r.target}`).join("; ") + ` (#${e.id})`;
    const undo = document.createElement("button");
    undo.type = "button";
    undo.className = "undo";
    undo.textContent = "Roll back";
    undo.addEventListener("click", () => busy(undo, async () => {
      await api("DELETE", `/v1/edits/${e.id}`);
      await refresh();
    }));
    item.append(what, undo);
    list.appendChild(item);
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("ask-button"), async () => {
    const { answer } = await api("POST", "/v1/generate", { prompt: $("ask-prompt").value });
    $("ask-answer").textContent = answer;
  });
});

$("edit").addEventListener("submit", (event) => {
  event.preventDefault();
  const rephrases = $("edit-rephrases").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const request = { prompt: $("edit-prompt").value, target: $("edit-target").value, rephrases };
  busy($("edit-button"), async () => {
    const made = await api("POST", "/v1/edits", { requests: [request], compare: true });
    showCompare(made.answers);
    await refresh();
  });
});

refresh().catch((e) => showError(e.message));
