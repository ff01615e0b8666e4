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
  };
  source.onopen = function () {
    chart.setAttribute("data-stream", "open");
  };
})();
