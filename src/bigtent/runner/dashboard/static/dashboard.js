// bigtent dashboard: follows a running step's log through server-sent events.
// Everything here is an enhancement: without JavaScript the pages show the same data.
(function () {
  "use strict";

  var ANSI = /\x1b\[[0-9;?]*[ -\/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)/g;

  function followLog(pre) {
    var box = pre.parentElement;
    var status = document.getElementById("log-status");
    var url = pre.dataset.events + "?from=" + encodeURIComponent(pre.dataset.offset || "0");
    var source = new EventSource(url);

    function say(text, cls) {
      if (status) {
        status.textContent = text;
        status.className = "badge " + cls;
      }
    }

    function atBottom() {
      return box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    }

    source.addEventListener("open", function () {
      say("live", "running");
    });
    source.addEventListener("log", function (event) {
      var stick = atBottom();
      pre.appendChild(document.createTextNode(JSON.parse(event.data).replace(ANSI, "")));
      pre.dataset.offset = event.lastEventId;
      if (stick) {
        box.scrollTop = box.scrollHeight;
      }
    });
    source.addEventListener("reset", function () {
      pre.textContent = "";
    });
    source.addEventListener("end", function (event) {
      source.close();
      var state = JSON.parse(event.data).state;
      say("finished: " + state, state);
      // Refresh the step's details (state, outcome, timings) once.
      if (window.htmx) {
        window.htmx.ajax("GET", window.location.pathname, {
          target: "#step-info",
          select: "#step-info",
          swap: "outerHTML",
        });
      }
    });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        say("not live: reload the page", "failed");
      } else {
        say("reconnecting…", "waiting");
      }
    });
    box.scrollTop = box.scrollHeight;
  }

  document.addEventListener("DOMContentLoaded", function () {
    var pre = document.getElementById("log");
    if (pre && pre.dataset.events && window.EventSource) {
      followLog(pre);
    }
  });
})();
