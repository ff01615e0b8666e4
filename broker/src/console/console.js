// Ferry console: live updates of a group page from the broker's
// server-sent events. The broker renders everything (the chart as SVG,
// the figures, resources and decisions as HTML); this only swaps it in.
"use strict";
(function () {
  var chart = document.getElementById("live-chart");
  if (!chart || !window.EventSource) {
    return;
  }
  var source = new EventSource(chart.getAttribute("data-live"));
  var swap = function (id, html) {
    var el = document.getElementById(id);
    if (el && typeof html === "string") {
      el.innerHTML = html;
    }
  };
  source.addEventListener("update", function (e) {
    var data;
    try {
      data = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    if (data.gone) {
      chart.setAttribute("data-stream", "gone");
      source.close();
      return;
    }
    swap("live-chart", data.chart);
    swap("live-figures", data.figures);
    swap("live-table", data.resources);
    swap("live-decisions", data.decisions);
    chart.setAttribute("data-updates", String(Number(chart.getAttribute("data-updates") || "0") + 1));
  });
  source.onerror = function () {
    chart.setAttribute("data-stream", "reconnecting");
    // The browser gives up (a 401 once the session ended, a 503 when too
    // many live pages are open): say so instead of showing stale figures.
    if (source.readyState === EventSource.CLOSED && !document.getElementById("live-stopped")) {
      var note = document.createElement("p");
      note.id = "live-stopped";
      note.className = "notice error";
      note.textContent = "Live updates stopped (signed out, or too many live pages open): reload the page, or sign in again with a new link.";
      chart.parentNode.insertBefore(note, chart);
    }
  };
  source.onopen = function () {
    chart.setAttribute("data-stream", "open");
  };
})();
