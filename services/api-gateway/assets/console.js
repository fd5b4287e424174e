// Hodei console: makes server-rendered pages live. A region with data-fragment and
// data-feed reloads its fragment whenever its server-sent events feed says "change"; a log
// (data-log) appends its job's lines as they arrive. Without this script every page still
// works, it only stops updating by itself.
"use strict";

(function () {
  function setStatus(text, state) {
    document.querySelectorAll("[data-live-status]").forEach((el) => {
      el.textContent = text;
      el.dataset.liveState = state;
    });
  }

  // A feed that the server closed for good (the answer was no event stream: signed out, the
  // object is gone, the tenant is over its stream quota) is opened again after a pause that
  // doubles up to a minute; a sign-in answer reloads the page, which shows the form.
  function follow(url, listen, onClosed) {
    let pause = 2000;
    function open() {
      const feed = new EventSource(url());
      feed.onopen = () => { pause = 2000; };
      listen(feed);
      feed.addEventListener("error", async () => {
        if (feed.readyState !== EventSource.CLOSED) return;
        onClosed();
        try {
          const probe = await fetch(url(), { method: "HEAD", credentials: "same-origin", redirect: "manual" });
          if (probe.type === "opaqueredirect" || probe.status === 401) {
            window.location.reload();
            return;
          }
        } catch (e) { /* offline: try again below */ }
        setTimeout(open, pause);
        pause = Math.min(pause * 2, 60000);
      });
    }
    open();
  }

  // A region is not swapped while a button is being pressed in it (the click must not land on
  // a replaced button) or while the keyboard is on one of its links or buttons (focus must not
  // be lost): the swap waits until then.
  function liveRegion(region) {
    let pending = false;
    let running = false;
    let busy = false;
    const engaged = () => region.contains(document.activeElement) && document.activeElement !== region;
    region.addEventListener("pointerdown", () => { busy = true; });
    document.addEventListener("pointerup", () => {
      if (!busy) return;
      setTimeout(() => { busy = false; if (pending) { pending = false; reload(); } }, 300);
    });
    region.addEventListener("focusout", () => { setTimeout(() => { if (pending && !engaged()) { pending = false; reload(); } }, 0); });
    async function reload() {
      if (running || busy || engaged()) { pending = true; return; }
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
          const html = await response.text();
          if (busy || engaged()) { pending = true; return; }
          const open = Array.from(region.querySelectorAll("details")).map((d) => d.open);
          region.innerHTML = html;
          region.querySelectorAll("details").forEach((d, i) => { if (i < open.length) d.open = open[i]; });
          region.dataset.updated = String(Date.now());
        }
      } catch (e) {
        setStatus("offline", "error");
      } finally {
        running = false;
        if (pending && !busy && !engaged()) { pending = false; reload(); }
      }
    }
    follow(() => region.dataset.feed, (feed) => {
      feed.addEventListener("open", () => setStatus("live", "live"));
      feed.addEventListener("error", () => setStatus("reconnecting…", "error"));
      feed.addEventListener("change", reload);
      feed.addEventListener("end", () => {
        feed.close();
        reload();
        setStatus("ended", "ended");
      });
    }, () => setStatus("disconnected", "error"));
  }

  function liveLog(pre) {
    const followBox = document.querySelector("[data-follow]");
    const status = document.querySelector("[data-log-status]");
    const MAX_LINES = 20000;
    let count = 0;
    let queue = [];
    let scheduled = false;
    let ended = false;
    let lastSeq = 0;
    const say = (text) => { if (status) status.textContent = text; };
    const lines = () => count + (count === 1 ? " line" : " lines");
    // Scrolling up stops following; scrolling back to the end follows again.
    pre.addEventListener("scroll", () => {
      if (!followBox) return;
      followBox.checked = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    });
    function flush() {
      scheduled = false;
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
      if (followBox && followBox.checked) pre.scrollTop = pre.scrollHeight;
    }
    // Opened again after a failure, the feed resumes after the last line shown.
    follow(() => pre.dataset.log + "?from=" + (lastSeq + 1), (feed) => {
      feed.addEventListener("line", (e) => {
        const line = JSON.parse(e.data);
        lastSeq = line.seq;
        queue.push(line);
        // A hidden tab flushes seldom: keep no more than the page would show.
        if (queue.length > MAX_LINES) queue.splice(0, queue.length - MAX_LINES);
        count += 1;
        say(lines() + ", following");
        if (!scheduled) { scheduled = true; setTimeout(flush, 50); }
      });
      feed.addEventListener("end", () => {
        feed.close();
        ended = true;
        say(lines() + " · the job has ended");
        pre.dataset.ended = "true";
      });
      feed.addEventListener("error", () => { if (!ended) say(lines() + ", reconnecting…"); });
    }, () => say(lines() + " · the output stopped arriving; trying again"));
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("[data-fragment][data-feed]").forEach(liveRegion);
    document.querySelectorAll("pre[data-log]").forEach(liveLog);
  });
})();
