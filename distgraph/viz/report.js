// distgraph report: step-through replay of a recorded run. No network, no dependencies.
// State s: 0 = nothing ran yet; s = i + 1 = replay group i is active (earlier groups done);
// s = groups.length + 1 = everything done.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var groups = data.groups;
  var last = groups.length + 1;
  var state = 0;
  var timer = null;

  var nodeEls = {};
  document.querySelectorAll("#graph g.node[data-node]").forEach(function (el) {
    nodeEls[el.getAttribute("data-node")] = el;
    var info = el.querySelector("text.info");
    if (info) info.setAttribute("data-shape", info.textContent);
  });
  var edgeEls = Array.prototype.slice.call(document.querySelectorAll("#graph g.edge"));
  var tasks = {};
  groups.forEach(function (g, i) {
    g.nodes.forEach(function (n) {
      (tasks[n] = tasks[n] || []).push(i);
    });
  });

  function taskState(i, s) {
    var active = s - 1;
    return i < active ? "done" : i === active ? "active" : "waiting";
  }
  function nodeState(name, s) {
    var idx = tasks[name] || [];
    var states = idx.map(function (i) { return taskState(i, s); });
    if (states.indexOf("active") >= 0) return "active";
    if (states.length && states.every(function (x) { return x === "done"; })) return "done";
    if (states.indexOf("done") >= 0) return "partial";
    return "waiting";
  }
  function revealed(step, s) { return s - 1 > step; }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Tables: one row per value / gradient, filled in as the replay reaches them.
  function buildTable(tableId, rows, prefix) {
    var body = document.querySelector("#" + tableId + " tbody");
    rows.forEach(function (r) {
      var tr = el("tr", { id: prefix + "-row-" + r.name });
      tr.appendChild(el("th", {}, r.name));
      tr.appendChild(el("td", { id: prefix + "-" + r.name, class: "pending" }, "—"));
      body.appendChild(tr);
    });
  }
  buildTable("values-table", data.values, "value");
  buildTable("grads-table", data.grads, "grad");
  if (!data.grads.length) {
    document.querySelector("#grads-table tbody").appendChild(
      el("tr", {}, "no gradients in this run"));
  }

  function fillRows(rows, prefix, s) {
    rows.forEach(function (r) {
      var td = document.getElementById(prefix + "-" + r.name);
      var show = revealed(r.step, s);
      td.textContent = show ? r.display : "—";
      td.className = show ? "shown" : "pending";
      if (show && r.number !== null) td.setAttribute("data-value", String(r.number));
      else td.removeAttribute("data-value");
    });
  }

  var gradByNode = {};
  data.grads.forEach(function (g) { gradByNode[g.name] = g; });

  function describe(g) {
    var who = g.nodes.map(function (n, k) {
      var w = g.workers[k];
      return n + (w === null || w === undefined ? "" : " (W" + w + ")");
    }).join(", ");
    var ms = g.ms === null || g.ms === undefined ? "" : " · " + g.ms.toFixed(2) + " ms";
    return g.phase + " · level " + g.level + ": " + who + ms;
  }

  function render() {
    var counts = { active: 0, done: 0, waiting: 0 };
    var active = {};
    data.nodes.forEach(function (n) {
      var st = nodeState(n.name, state);
      counts[st === "partial" ? "waiting" : st] += 1;
      if (st === "active") active[n.name] = true;
      var node = nodeEls[n.name];
      if (!node) return;
      node.classList.remove("state-waiting", "state-active", "state-done", "state-partial");
      node.classList.add("state-" + st);
      var info = node.querySelector("text.info");
      if (!info) return;
      var parts = [];
      if (n.value !== null && revealed(n.valueStep, state)) parts.push(n.value);
      var g = gradByNode[n.name];
      if (g && revealed(g.step, state)) parts.push("∂ " + g.display);
      var text = parts.length ? parts.join("  ·  ") : info.getAttribute("data-shape");
      // The box fits about 24 characters; the tables below show values in full.
      info.textContent = text.length > 24 ? text.slice(0, 23) + "…" : text;
    });
    edgeEls.forEach(function (e) {
      e.classList.toggle("edge-active", !!active[e.getAttribute("data-dst")]);
    });
    document.getElementById("count-active").textContent = counts.active;
    document.getElementById("count-completed").textContent = counts.done;
    document.getElementById("count-waiting").textContent = counts.waiting;
    document.getElementById("count-total").textContent = data.nodes.length;
    document.getElementById("step-label").textContent = "Step " + state + " of " + last;
    var phase = document.getElementById("phase-label");
    var current = state >= 1 && state <= groups.length ? groups[state - 1] : null;
    phase.textContent = state === 0 ? "ready" : current
      ? current.phase + " wave · level " + current.level : "done";
    phase.className = "phase-badge " + (current ? current.phase : state === 0 ? "ready" : "done");
    document.getElementById("graph").className =
      "graph-scroll wave-" + (current ? current.phase : state === 0 ? "ready" : "done");
    fillRows(data.values, "value", state);
    fillRows(data.grads, "grad", state);
    var log = document.getElementById("log");
    log.textContent = "";
    for (var i = 0; i < Math.min(state, groups.length); i++) {
      log.appendChild(el("li", { class: i === state - 1 ? "now " + groups[i].phase : groups[i].phase },
        describe(groups[i])));
    }
    if (state === last) log.appendChild(el("li", { class: "end" }, "run complete"));
    if (!log.children.length) log.appendChild(el("li", { class: "muted" }, "Press Step or Run."));
    document.getElementById("step").disabled = state >= last;
  }

  function stop() {
    if (timer !== null) clearInterval(timer);
    timer = null;
    document.getElementById("run").textContent = "Run";
  }
  function step() {
    if (state < last) state += 1;
    if (state >= last) stop();
    render();
  }
  document.getElementById("step").addEventListener("click", function () { stop(); step(); });
  document.getElementById("reset").addEventListener("click", function () {
    stop(); state = 0; render();
  });
  document.getElementById("run").addEventListener("click", function () {
    if (timer !== null) { stop(); return; }
    if (state >= last) state = 0;
    this.textContent = "Pause";
    timer = setInterval(step, 650);
    step();
  });

  // Training: an epoch slider moving a marker over both charts and showing that epoch's numbers.
  var hist = data.history;
  var slider = document.getElementById("epoch-slider");
  if (hist && slider) {
    var fmt = function (v) {
      return v === null || v === undefined || typeof v === "string" ? String(v) : Number(v).toPrecision(5);
    };
    var showEpoch = function () {
      var e = Number(slider.value);
      document.getElementById("epoch-value").textContent = e;
      document.getElementById("epoch-loss").textContent = fmt(hist.loss[e - 1]);
      var ps = document.getElementById("epoch-params");
      ps.textContent = "";
      Object.keys(hist.params).forEach(function (name) {
        var span = el("span", { class: "stat-inline", id: "param-" + name }, name + " ");
        span.appendChild(el("b", {}, fmt(hist.params[name][e - 1])));
        ps.appendChild(span);
      });
      document.querySelectorAll("svg.chart").forEach(function (svg) {
        var n = Number(svg.getAttribute("data-epochs"));
        var x0 = Number(svg.getAttribute("data-x0"));
        var x1 = Number(svg.getAttribute("data-x1"));
        var x = n > 1 ? x0 + (x1 - x0) * (e - 1) / (n - 1) : x0;
        var m = svg.querySelector(".epoch-marker");
        if (m) { m.setAttribute("x1", x); m.setAttribute("x2", x); }
      });
    };
    slider.addEventListener("input", showEpoch);
    showEpoch();
  }

  render();
})();
