// The console's pages, built with the DOM only: every value from a task
// (names, arguments, errors, response excerpts) becomes a text node, never
// markup: no HTML is ever parsed from a string.

// h("td", {class: "num"}, "text", child...): an element; strings and
// numbers become text nodes, null/undefined/false are skipped.
export function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else if (child instanceof Node) element.appendChild(child);
    else element.appendChild(document.createTextNode(String(child)));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
}

const STATES = ["queued", "scheduled", "running", "succeeded", "failed", "canceled"];
export {STATES};

export function when(epoch) {
  if (typeof epoch !== "number") return "";
  return new Date(epoch * 1000).toLocaleString();
}

export function ago(seconds) {
  if (typeof seconds !== "number") return "";
  if (seconds < 1) return "just now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function count(value) {
  return value === null || value === undefined ? "–" : String(value);
}

function rate(value) {
  if (typeof value !== "number") return "–";
  return value >= 10 ? value.toFixed(0) : value.toFixed(1);
}

// A capped rendering of any JSON value, as text.
export function json(value, limit = 20000) {
  let text;
  try {
    text = JSON.stringify(value, null, 2);
  } catch (e) {
    text = String(value);
  }
  if (text === undefined) text = "null";
  if (text.length > limit) text = text.slice(0, limit) + "\n… (" + text.length + " characters)";
  return text;
}

function badge(state) {
  return h("span", {class: "badge state-" + (STATES.includes(state) ? state : "other")}, state);
}

// -- overview ---------------------------------------------------------------

// history: [{at, out}] of the last snapshots, for the throughput sparkline.
export function overview(snapshot, access, history, actions) {
  const counts = snapshot.counts || {};
  const cards = h("section", {class: "cards", id: "counts"},
    STATES.map((state) => h("a", {class: "card state-" + state, href: "#/tasks?state=" + state,
      "data-state": state},
      h("span", {class: "card-number"}, count(counts[state])),
      h("span", {class: "card-label"}, state))));
  const writable = access === "read-write";
  const queueRows = (snapshot.queues || []).map((q) => h("tr", {"data-queue": q.name},
    h("td", null, h("a", {href: "#/tasks?queue=" + encodeURIComponent(q.name)}, q.name)),
    h("td", {class: "num", "data-field": "ready"}, count(q.ready)),
    h("td", {class: "num", "data-field": "running"}, count(q.unacked)),
    h("td", {class: "num", "data-field": "delayed"}, count(q.delayed)),
    h("td", {class: "num", "data-field": "errored"}, count(q.errored)),
    h("td", {class: "num"}, count(q.consumers)),
    h("td", {class: "num", "data-field": "in"}, rate(q.rate_in)),
    h("td", {class: "num", "data-field": "out"}, rate(q.rate_out)),
    h("td", {class: "num"}, rate(q.failures_per_minute)),
    h("td", {"data-field": "paused"}, q.paused ? h("span", {class: "badge paused"}, "paused")
      : "consuming"),
    writable ? h("td", null, h("button", {type: "button", class: "small",
      "data-action": q.paused ? "resume" : "pause",
      onclick: () => actions.pauseQueue(q.name, !q.paused)},
    q.paused ? "Resume" : "Pause")) : null));
  const queues = h("section", null, h("h2", null, "Queues"),
    h("table", {id: "queues"},
      h("thead", null, h("tr", null, ["Queue", "Ready", "Running", "Delayed", "Errored",
        "Consumers", "In/s", "Out/s", "Failures/min", "Status"].map((t) => h("th", null, t)),
      writable ? h("th", null, "") : null)),
      h("tbody", null, queueRows.length ? queueRows
        : h("tr", null, h("td", {colspan: 11, class: "empty"}, "no queues")))));
  const workerRows = (snapshot.workers || []).map((w) => h("tr", {"data-worker": w.id},
    h("td", null, w.id),
    h("td", null, w.host || ""),
    h("td", {class: "num"}, w.pid === undefined ? "" : String(w.pid)),
    h("td", null, w.version || ""),
    h("td", null, (w.queues || []).join(", ")),
    h("td", {class: "num"}, (w.running === undefined ? "?" : w.running) + " / "
      + (w.capacity === undefined ? "?" : w.capacity)),
    h("td", null, ago(w.last_beat)),
    h("td", null, w.node || "")));
  const workers = h("section", null, h("h2", null, "Workers"),
    h("table", {id: "workers"},
      h("thead", null, h("tr", null, ["Worker", "Host", "PID", "Version", "Queues",
        "Running", "Last beat", "Broker node"].map((t) => h("th", null, t)))),
      h("tbody", null, workerRows.length ? workerRows
        : h("tr", null, h("td", {colspan: 8, class: "empty"}, "no live worker")))));
  return [cards, sparkline(history), queues, workers];
}

function sparkline(history, span = 120) {
  const width = 600;
  const height = 60;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const top = Math.max(1, ...history.map((p) => p.out));
  const slots = Math.max(history.length, span) - 1 || 1;
  const points = history.map((p, i) => {
    const x = width - ((history.length - 1 - i) * width) / slots;
    const y = height - 4 - ((height - 8) * p.out) / top;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.appendChild(line);
  const title = document.createElementNS(ns, "title");
  title.textContent = "tasks finished per second, last " + history.length + " s";
  svg.appendChild(title);
  const last = history.length ? history[history.length - 1].out : 0;
  return h("section", {class: "throughput"},
    h("h2", null, "Throughput ", h("span", {class: "muted", id: "throughput"},
      rate(last) + " tasks/s finished")), svg);
}

// -- tasks list --------------------------------------------------------------

export function taskList(filters, page, onFilter, onPage) {
  const state = h("select", {id: "filter-state", name: "state"},
    h("option", {value: ""}, "any state"),
    STATES.map((s) => h("option", {value: s, selected: filters.state === s}, s)));
  const queue = h("input", {id: "filter-queue", name: "queue", placeholder: "queue",
    value: filters.queue || ""});
  const task = h("input", {id: "filter-task", name: "task", placeholder: "task name",
    value: filters.task || ""});
  const form = h("form", {class: "filters", id: "filters", onsubmit: (e) => {
    e.preventDefault();
    onFilter({state: state.value, queue: queue.value.trim(), task: task.value.trim()});
  }}, state, queue, task, h("button", {type: "submit"}, "Filter"));
  const rows = (page.tasks || []).map((t) => h("tr", {"data-task": t.id},
    h("td", null, h("a", {href: "#/tasks/" + encodeURIComponent(t.id)}, t.id)),
    h("td", null, t.task || ""),
    h("td", null, t.queue || ""),
    h("td", null, badge(t.state)),
    h("td", {class: "num"}, String(t.attempts || 0)),
    h("td", null, when(t.updated_at))));
  const pager = h("div", {class: "pager"},
    h("button", {type: "button", id: "page-prev", disabled: !page.hasPrevious,
      onclick: () => onPage(-1)}, "Newer"),
    h("span", {class: "muted"}, page.note || ""),
    h("button", {type: "button", id: "page-next", disabled: page.next_offset === null,
      onclick: () => onPage(1)}, "Older"));
  return [h("h2", null, "Tasks"), form,
    h("table", {id: "tasks"},
      h("thead", null, h("tr", null, ["Task id", "Name", "Queue", "State", "Attempts",
        "Updated"].map((t) => h("th", null, t)))),
      h("tbody", null, rows.length ? rows
        : h("tr", null, h("td", {colspan: 6, class: "empty"}, page.loading ? "loading…"
          : "no task matches")))),
    pager];
}

// -- one task -----------------------------------------------------------------

export function taskPage(record, access, actions) {
  const finished = ["succeeded", "failed", "canceled"].includes(record.state);
  const writable = access === "read-write";
  const buttons = h("div", {class: "actions"},
    writable && !finished ? h("button", {type: "button", id: "cancel-task", class: "danger",
      onclick: () => actions.cancel(record.id)}, "Cancel task") : null,
    writable && record.state === "failed" ? h("button", {type: "button", id: "requeue-task",
      onclick: () => actions.requeue(record.id)}, "Requeue") : null);
  const facts = h("dl", {class: "facts"},
    fact("State", badge(record.state)),
    fact("Task", record.task),
    fact("Queue", record.queue),
    fact("Kind", record.kind),
    record.name ? fact("Unique name", record.name) : null,
    fact("Attempts", String(record.attempts || 0)),
    fact("Worker", record.worker || ""),
    fact("Created", when(record.created_at)),
    fact("Updated", when(record.updated_at)),
    record.eta ? fact("Not before", when(record.eta)) : null,
    record.finished_at ? fact("Finished", when(record.finished_at)) : null,
    record.reason ? fact("Reason", record.reason) : null,
    record.cancel_requested ? fact("Cancel asked", when(record.cancel_requested)) : null);
  const parts = [h("h2", null, "Task ", h("code", {id: "task-id"}, record.id)), buttons, facts];
  const args = record.arguments;
  parts.push(h("h3", null, "Arguments"));
  if (args === undefined) {
    parts.push(h("p", {class: "muted"}, "not recorded (the producer kept none)"));
  } else if (args && args.truncated) {
    parts.push(h("p", {class: "muted"}, `truncated: ${args.size} characters, the start:`),
      h("pre", {id: "task-arguments"}, args.preview));
  } else {
    parts.push(h("pre", {id: "task-arguments"}, json(args)));
  }
  if (record.state === "succeeded") {
    parts.push(h("h3", null, "Result"), h("pre", {id: "task-result"}, json(record.result)));
  }
  if (record.error) {
    parts.push(h("h3", null, "Error"), errorBlock(record.error, "task-error"));
  }
  parts.push(h("h3", null, "Attempts"), history(record.history || []));
  return parts;
}

function fact(label, value) {
  return [h("dt", null, label), h("dd", null, value)];
}

function errorBlock(error, id) {
  return h("div", {class: "error-block", id},
    h("p", null, h("strong", null, error.type || "error"), ": ", error.message || ""),
    error.status ? h("p", null, "HTTP status ", String(error.status)) : null,
    error.response_body ? h("pre", {class: "excerpt"}, String(error.response_body)) : null,
    error.traceback ? h("details", null, h("summary", null, "Traceback"),
      h("pre", null, String(error.traceback))) : null);
}

function history(entries) {
  const rows = entries.map((e) => h("tr", null,
    h("td", {class: "num"}, String(e.attempt)),
    h("td", null, badge(e.state)),
    h("td", null, e.worker || ""),
    h("td", null, when(e.started_at)),
    h("td", null, when(e.finished_at)),
    h("td", {class: "num"}, typeof e.started_at === "number"
      && typeof e.finished_at === "number" ? (e.finished_at - e.started_at).toFixed(3) + " s" : ""),
    h("td", null, e.error ? errorBlock(e.error) : ""),
    h("td", null, e.retry_at ? when(e.retry_at) : "")));
  return h("table", {id: "history"},
    h("thead", null, h("tr", null, ["#", "Outcome", "Worker", "Started", "Finished", "Took",
      "Error", "Retry at"].map((t) => h("th", null, t)))),
    h("tbody", null, rows.length ? rows
      : h("tr", null, h("td", {colspan: 8, class: "empty"}, "not started yet"))));
}
