// The console: sign-in, the live stream, and the three pages (overview,
// tasks, one task) behind hash routes (#/, #/tasks?state=..., #/tasks/ID).

import * as api from "./api.js";
import * as views from "./views.js";

const main = document.getElementById("main");
const live = document.getElementById("live");
const accessLabel = document.getElementById("access");
const forget = document.getElementById("forget");
const tokenDialog = document.getElementById("token-dialog");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
const tokenError = document.getElementById("token-error");
const confirmDialog = document.getElementById("confirm-dialog");
const toast = document.getElementById("toast");

const HISTORY = 120; // seconds of throughput in the sparkline

const state = {
  access: null, // "read-only" | "read-write" once the stream said so
  snapshot: null,
  history: [],
  stream: null,
  listOffsets: [0], // offsets of the pages seen, to go back
  listPage: null,
  listKey: "",
  taskId: null,
  refreshing: false,
};

// -- sign-in ------------------------------------------------------------------

function askToken(message) {
  if (state.stream) state.stream.close();
  state.stream = null;
  tokenError.hidden = !message;
  tokenError.textContent = message || "";
  tokenInput.value = "";
  if (!tokenDialog.open) tokenDialog.showModal();
  tokenInput.focus();
}

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const value = tokenInput.value.trim();
  if (!value) return;
  api.setToken(value);
  tokenDialog.close();
  start();
});

tokenDialog.addEventListener("cancel", (event) => event.preventDefault());

forget.addEventListener("click", () => {
  api.forgetToken();
  state.access = null;
  accessLabel.textContent = "";
  forget.hidden = true;
  askToken("");
});

// -- confirmation and notices -------------------------------------------------

function confirmAction(text) {
  return new Promise((resolve) => {
    document.getElementById("confirm-text").textContent = text;
    confirmDialog.returnValue = "";
    confirmDialog.addEventListener("close", () => resolve(confirmDialog.returnValue === "yes"),
      {once: true});
    confirmDialog.showModal();
  });
}

let toastTimer = null;
function notify(text, kind) {
  toast.textContent = text;
  toast.className = "toast " + (kind || "");
  toast.hidden = false;
  window.clearTimeout(toastTimer);
  toastTimer = window.setTimeout(() => { toast.hidden = true; }, 5000);
}

async function act(description, operation) {
  if (!(await confirmAction(description))) return;
  try {
    await operation();
    notify("done: " + description, "ok");
  } catch (e) {
    if (e instanceof api.Unauthorized) askToken(e.message);
    else notify(e.message, "bad");
  }
  await render();
}

const actions = {
  cancel: (id) => act(`Cancel task ${id}?`,
    () => api.call("DELETE", "tasks/" + encodeURIComponent(id))),
  requeue: (id) => act(`Requeue failed task ${id}?`,
    () => api.call("POST", "tasks/" + encodeURIComponent(id) + "/requeue")),
  pauseQueue: (queue, pause) => act(`${pause ? "Pause" : "Resume"} queue ${queue}?`,
    () => api.call("POST", "queues/" + encodeURIComponent(queue) + (pause ? "/pause" : "/resume"))),
};

// -- the stream -----------------------------------------------------------------

function start() {
  if (!api.token()) {
    askToken("");
    return;
  }
  forget.hidden = false;
  if (state.stream) state.stream.close();
  state.stream = api.stream({
    hello(data) {
      state.access = data.access;
      accessLabel.textContent = data.access;
      document.body.dataset.access = data.access;
      render();
    },
    overview(snapshot) {
      state.snapshot = snapshot;
      const out = (snapshot.queues || []).reduce((sum, q) => sum + (q.rate_out || 0), 0);
      state.history.push({at: snapshot.at, out});
      if (state.history.length > HISTORY) state.history.shift();
      document.body.dataset.updated = String(snapshot.at);
      refresh();
    },
    problem(data) {
      notify(data.message, "bad");
    },
    state(isLive, why) {
      live.textContent = why;
      live.className = "live " + (isLive ? "on" : "off");
    },
    unauthorized() {
      askToken("That token was refused.");
    },
  });
}

// -- pages ----------------------------------------------------------------------

function route() {
  const hash = window.location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  if (path.startsWith("/tasks/")) {
    return {page: "task", id: decodeURIComponent(path.slice("/tasks/".length))};
  }
  if (path === "/tasks") {
    return {page: "tasks", filters: {state: params.get("state") || "",
      queue: params.get("queue") || "", task: params.get("task") || ""}};
  }
  return {page: "overview"};
}

function markNav(page) {
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("current", link.dataset.nav === (page === "task" ? "tasks" : page));
  }
}

// Called on every snapshot: the overview is redrawn; an open list or task
// is read again (one small request per second while it is on screen).
function refresh() {
  const where = route();
  if (where.page === "overview") {
    render();
  } else if (!state.refreshing) {
    state.refreshing = true;
    render().finally(() => { state.refreshing = false; });
  }
}

async function render() {
  const where = route();
  markNav(where.page);
  try {
    if (where.page === "overview") {
      if (!state.snapshot) {
        views.replace(main, views.h("p", {class: "muted"}, "waiting for the first update…"));
        return;
      }
      views.replace(main, views.overview(state.snapshot, state.access, state.history, actions));
    } else if (where.page === "tasks") {
      await renderList(where.filters);
    } else {
      const record = await api.call("GET", "tasks/" + encodeURIComponent(where.id));
      if (route().page !== "task") return;
      views.replace(main, views.taskPage(record, state.access, actions));
    }
  } catch (e) {
    if (e instanceof api.Unauthorized) {
      askToken(e.message);
    } else {
      views.replace(main, views.h("p", {class: "error", id: "page-error"}, e.message));
    }
  }
}

async function renderList(filters) {
  const key = JSON.stringify(filters);
  if (key !== state.listKey) {
    state.listKey = key;
    state.listOffsets = [0];
  }
  const offset = state.listOffsets[state.listOffsets.length - 1];
  const params = new URLSearchParams({limit: "50", offset: String(offset)});
  for (const name of ["state", "queue", "task"]) {
    if (filters[name]) params.set(name, filters[name]);
  }
  const page = await api.call("GET", "tasks?" + params.toString());
  if (route().page !== "tasks" || JSON.stringify(route().filters) !== key) return;
  page.hasPrevious = state.listOffsets.length > 1;
  if (filters.task && page.tasks.length < 50 && page.next_offset !== null) {
    page.note = "searched part of the records: go on with Older";
  }
  views.replace(main, views.taskList(filters, page, (wanted) => {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(wanted)) if (value) params.set(name, value);
    const query = params.toString();
    window.location.hash = "#/tasks" + (query ? "?" + query : "");
  }, (direction) => {
    if (direction > 0 && page.next_offset !== null) state.listOffsets.push(page.next_offset);
    else if (direction < 0 && state.listOffsets.length > 1) state.listOffsets.pop();
    render();
  }));
}

window.addEventListener("hashchange", () => render());
start();
render();
