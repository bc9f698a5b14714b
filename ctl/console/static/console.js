// The district console's live updates (server-sent events). Plain JavaScript, no build step.
// Text from devices is set with textContent, never as HTML.
// Once the stream is open, the page reads the current state once (/api/fleet, or the batch's
// acks): what changed between the page's rendering and the stream's opening is not missed.
"use strict";
(function () {
  const STATUS_VI = {playing: "đang phát", online: "trực tuyến", offline: "mất kết nối",
                     unknown: "chưa rõ"};
  const fleet = document.getElementById("fleet");
  const devStatus = document.getElementById("dev-status");
  const batch = document.getElementById("batch");
  if (!fleet && !devStatus && !batch) return;
  const tzMeta = document.querySelector("meta[name=tz]");
  const tz = tzMeta ? tzMeta.content : undefined;  // the district's zone, as the server shows
  const statuses = {};
  const points = {};
  for (const pt of document.querySelectorAll("circle.pt")) points[pt.dataset.device] = pt;
  const seenAcks = new Set();
  for (const tr of document.querySelectorAll("tr[data-ack]")) seenAcks.add(tr.dataset.ack);

  function when(ms) {
    return new Date(ms).toLocaleString("vi-VN", {timeZone: tz, hour12: false});
  }

  function statusText(d) {
    let t = STATUS_VI[d.status] || d.status;
    if (d.status === "playing" && d.playing) t += ": " + d.playing;
    else if (d.status === "offline" && d.reason) t += " (" + d.reason + ")";
    return t;
  }

  function recount() {
    const c = {total: 0, playing: 0, online: 0, offline: 0};
    for (const s of Object.values(statuses)) {
      c.total += 1;
      if (s === "playing") { c.playing += 1; c.online += 1; }
      else if (s in c) c[s] += 1;
    }
    for (const el of document.querySelectorAll("[data-count]")) {
      el.textContent = String(c[el.dataset.count]);
    }
  }

  function onDevice(d, many) {
    statuses[d.device] = d.status;
    const row = document.getElementById("dev-" + d.device);
    if (row) {
      row.className = "st-" + d.status;
      const cell = row.querySelector(".status");
      cell.textContent = statusText(d);
      cell.dataset.status = d.status;
      row.querySelector(".alerts").textContent = d.alerts.join(", ");
      row.querySelector(".volume").textContent = d.volume === null ? "" : String(d.volume);
      if (d.last_seen_ms) row.querySelector(".seen").textContent = when(d.last_seen_ms);
    }
    if (points[d.device]) points[d.device].setAttribute("class", "pt st-" + d.status);
    if (devStatus && devStatus.dataset.device === d.device) {
      devStatus.className = "st-" + d.status;
      devStatus.textContent = statusText(d);
    }
    if (fleet && !many) recount();
  }

  function onAck(a) {
    const body = document.getElementById("acks-" + a.cmd_id);
    if (!body || seenAcks.has(String(a.id))) return;
    seenAcks.add(String(a.id));
    const tr = document.createElement("tr");
    tr.className = "stage-" + a.stage;
    tr.dataset.ack = String(a.id);
    const cells = [when(a.received_ms), a.device, a.stage, a.reason || ""];
    cells.forEach(function (text, i) {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 2) td.className = "stage";
      tr.appendChild(td);
    });
    let next = null;  // in the order the acks were stored (a catch-up may come after one)
    for (const other of body.querySelectorAll("tr[data-ack]")) {
      if (Number(other.dataset.ack) > a.id) { next = other; break; }
    }
    body.insertBefore(tr, next);
    if (a.final) document.getElementById("final-" + a.cmd_id).textContent = a.final;
  }

  function catchUp() {
    if (fleet || devStatus) {
      fetch("/api/fleet", {credentials: "same-origin"}).then(function (r) { return r.json(); })
        .then(function (body) {
          for (const d of body.devices) onDevice(d, true);
          if (fleet) recount();
        });
    }
    if (batch) {
      fetch("/sent/" + encodeURIComponent(batch.dataset.batch) + "/acks",
            {credentials: "same-origin"}).then(function (r) { return r.json(); })
        .then(function (cmds) {
          for (const c of cmds) {
            for (const a of c.acks) onAck(Object.assign({cmd_id: c.cmd_id}, a));
            if (c.final) document.getElementById("final-" + c.cmd_id).textContent = c.final;
          }
        });
    }
  }

  const es = new EventSource("/events");
  const live = document.getElementById("live");
  es.onopen = function () {
    if (live) live.classList.add("up");
    catchUp();  // also after a reconnect
  };
  es.onerror = function () { if (live) live.classList.remove("up"); };
  es.addEventListener("device", function (e) { onDevice(JSON.parse(e.data), false); });
  es.addEventListener("ack", function (e) { onAck(JSON.parse(e.data)); });
  es.addEventListener("reload", function () { window.location.reload(); });
})();
