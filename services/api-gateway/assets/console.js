// Hodei console: makes server-rendered pages live. A region with data-fragment and
// data-feed reloads its fragment whenever its server-sent events feed says "change"; a log
// (data-log) appends its job's lines as they arrive. Without this script every page still
// works, it only stops updating by itself.
"use strict";

(function () {
  const statusEls = () => document.querySelectorAll("[data-live-status]");
  function setStatus(text, state) {
    statusEls().forEach((el) => {
      el.textContent = text;
      el.dataset.liveState = state;
    });
  }

  // A region keeps the element that had focus (by id) and the open/closed state of its
  // <details> across a reload, so a keyboard user is not thrown back to the top.
  function swap(region, html) {
    const focused = document.activeElement && region.contains(document.activeElement)
      ? document.activeElement.id : null;
    const open = Array.from(region.querySelectorAll("details")).map((d) => d.open);
    region.innerHTML = html;
    region.querySelectorAll("details").forEach((d, i) => {
      if (i < open.length) d.open = open[i];
    });
    if (focused) {
      const again = document.getElementById(focused);
      if (again) again.focus();
    }
    region.dispatchEvent(new CustomEvent("hodei:updated", { bubbles: true }));
  }

  function liveRegion(region) {
    let pending = false;
    let running = false;
    async function reload() {
      if (running) { pending = true; return; }
      running = true;
      try {
        const response = await fetch(region.dataset.fragment, {
          headers: { "x-hodei-fragment": "1" },
          credentials: "same-origin",
          redirect: "manual",
        });
        if (response.type === "opaqueredirect" || response.status === 401) {
          window.location.reload();
          return;
        }
        if (response.ok) {
          swap(region, await response.text());
          region.dataset.updated = String(Date.now());
        }
      } catch (e) {
        setStatus("offline", "error");
      } finally {
        running = false;
        if (pending) { pending = false; reload(); }
      }
    }
    const feed = new EventSource(region.dataset.feed);
    feed.onopen = () => setStatus("live", "live");
    feed.onerror = () => {
      setStatus("reconnecting…", "error");
      // Closed for good: the answer was no event stream (signed out, gone, over the stream
      // quota). Reloading shows the page, the sign-in form or the reason.
      if (feed.readyState === EventSource.CLOSED) setTimeout(() => window.location.reload(), 5000);
    };
    feed.addEventListener("change", reload);
    feed.addEventListener("end", () => {
      feed.close();
      reload();
      setStatus("ended", "ended");
    });
  }

  function liveLog(pre) {
    const follow = document.querySelector("[data-follow]");
    const status = document.querySelector("[data-log-status]");
    const MAX_LINES = 20000;
    let count = 0;
    let queue = [];
    let scheduled = false;
    function flush() {
      scheduled = false;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      const fragment = document.createDocumentFragment();
      for (const line of queue) {
        const span = document.createElement("span");
        span.className = line.stderr ? "line stderr" : "line";
        span.dataset.seq = String(line.seq);
        span.textContent = line.text + "\n";
        fragment.appendChild(span);
      }
      queue = [];
      pre.appendChild(fragment);
      while (pre.childElementCount > MAX_LINES) pre.removeChild(pre.firstElementChild);
      if (follow && follow.checked && (atBottom || pre.dataset.following !== "no")) {
        pre.scrollTop = pre.scrollHeight;
      }
    }
    const feed = new EventSource(pre.dataset.log);
    feed.addEventListener("line", (e) => {
      queue.push(JSON.parse(e.data));
      count += 1;
      if (status) status.textContent = count + (count === 1 ? " line" : " lines") + ", following";
      if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
    });
    feed.addEventListener("end", () => {
      feed.close();
      if (status) status.textContent = count + (count === 1 ? " line" : " lines") + " · the job has ended";
      pre.dataset.ended = "true";
    });
    feed.onerror = () => { if (status && pre.dataset.ended !== "true") status.textContent = "reconnecting…"; };
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("[data-fragment][data-feed]").forEach(liveRegion);
    document.querySelectorAll("pre[data-log]").forEach(liveLog);
  });
})();
