// crgate study page: the four panes of an image (original, compressed, difference, saliency)
// share one zoom and pan, applied as the same CSS transform by one handler; images are asked of
// the server at the size they are shown (times the zoom), so a 13.6 MP image never goes whole.
"use strict";

const MAX_SIDE = 8192;
const views = new Map();  // article -> {scale, x, y}
let windowParam = "";

function sized(img, scale) {
  const box = img.parentElement;
  const dpr = window.devicePixelRatio || 1;
  const w = Math.min(MAX_SIDE, Math.max(16, Math.round(box.clientWidth * dpr * scale)));
  const h = Math.min(MAX_SIDE, Math.max(16, Math.round(box.clientHeight * dpr * scale)));
  const url = new URL(img.dataset.src, location.href);
  url.searchParams.set("viewport", `${w},${h}`);
  if (windowParam && (img.dataset.kind === "original" || img.dataset.kind === "compressed")) {
    url.searchParams.set("window", windowParam);
  }
  return url.pathname + url.search;
}

function load(article) {
  const view = views.get(article);
  article.querySelectorAll("img[data-src]").forEach(img => {
    const next = sized(img, Math.max(1, view.scale));
    if (img.getAttribute("src") !== next) img.src = next;
  });
}

function apply(article) {  // the one handler: every pane of the image gets the same transform
  const v = views.get(article);
  const transform = `translate(${v.x}px, ${v.y}px) scale(${v.scale})`;
  article.querySelectorAll("img.layer").forEach(img => { img.style.transform = transform; });
  clearTimeout(v.timer);
  v.timer = setTimeout(() => load(article), 350);  // sharper pixels once the zoom settles
}

function zoom(article, factor, cx, cy) {
  const v = views.get(article);
  const scale = Math.min(32, Math.max(1, v.scale * factor));
  const k = scale / v.scale;
  v.x = cx - (cx - v.x) * k;
  v.y = cy - (cy - v.y) * k;
  v.scale = scale;
  if (scale === 1) { v.x = 0; v.y = 0; }
  apply(article);
}

function pan(article, dx, dy) {
  const v = views.get(article);
  v.x += dx; v.y += dy;
  apply(article);
}

function wire(article) {
  views.set(article, { scale: 1, x: 0, y: 0, timer: 0 });
  article.querySelectorAll(".viewport").forEach(box => {
    box.addEventListener("wheel", event => {
      event.preventDefault();
      const r = box.getBoundingClientRect();
      zoom(article, event.deltaY < 0 ? 1.25 : 0.8, event.clientX - r.left, event.clientY - r.top);
    }, { passive: false });
    let last = null;
    box.addEventListener("pointerdown", event => {
      last = [event.clientX, event.clientY];
      box.setPointerCapture(event.pointerId);
      box.classList.add("dragging");
    });
    box.addEventListener("pointermove", event => {
      if (!last) return;
      pan(article, event.clientX - last[0], event.clientY - last[1]);
      last = [event.clientX, event.clientY];
    });
    const stop = () => { last = null; box.classList.remove("dragging"); };
    box.addEventListener("pointerup", stop);
    box.addEventListener("pointercancel", stop);
    box.addEventListener("keydown", event => {
      const step = 40, c = [box.clientWidth / 2, box.clientHeight / 2];
      const moves = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
      if (moves[event.key]) { pan(article, ...moves[event.key]); event.preventDefault(); }
      else if (event.key === "+" || event.key === "=") { zoom(article, 1.25, ...c); event.preventDefault(); }
      else if (event.key === "-") { zoom(article, 0.8, ...c); event.preventDefault(); }
      else if (event.key === "0") { zoom(article, 0, ...c); event.preventDefault(); }
    });
  });
  load(article);
}

function tools() {
  const articles = () => [...document.querySelectorAll("article.image")];
  document.querySelectorAll("button[data-zoom]").forEach(button => {
    button.addEventListener("click", () => articles().forEach(article => {
      const box = article.querySelector(".viewport");
      const c = [box.clientWidth / 2, box.clientHeight / 2];
      const factor = { in: 1.25, out: 0.8, reset: 0 }[button.dataset.zoom];
      zoom(article, factor, ...c);
    }));
  });
  const applyWindow = () => {
    const c = document.getElementById("wc").value, w = document.getElementById("ww").value;
    if (c === "" || w === "") { crgate.problem(new Error("give both the window centre and width")); return; }
    crgate.problem(null);
    windowParam = `${c},${w}`;
    articles().forEach(load);
  };
  const applyButton = document.getElementById("apply-window");
  if (applyButton) applyButton.addEventListener("click", applyWindow);
  const reset = document.getElementById("reset-window");
  if (reset) reset.addEventListener("click", () => { windowParam = ""; articles().forEach(load); });
  document.querySelectorAll("img.layer").forEach(img => img.addEventListener("error", () => {
    crgate.call("GET", img.src).catch(crgate.problem);  // show the problem JSON's detail
  }));
}

function compare() {
  const slider = document.getElementById("cr-slider");
  if (!slider) return;
  const ids = slider.dataset.results.split(",");
  slider.addEventListener("change", () => {
    location.href = `/ui/studies/${slider.dataset.study}?result=${ids[Number(slider.value)]}`;
  });
}

function classify() {
  const form = document.getElementById("classify");
  if (!form) return;
  const out = document.getElementById("classify-out");
  form.addEventListener("submit", async event => {
    event.preventDefault();
    crgate.problem(null);
    const cr = document.getElementById("classify-cr").value;
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const started = await crgate.call("POST", `/studies/${form.dataset.study}/classify?cr=${encodeURIComponent(cr)}`);
      const job = await crgate.follow(started.status_url, view => {
        out.textContent = `job ${view.status}, ${view.progress.done}/${view.progress.total} images`;
      });
      if (job.status === "failed") throw new Error(`the job failed: ${job.reason}`);
      out.textContent = "done";
      location.href = `/ui/studies/${form.dataset.study}?result=${job.result_id}`;
    } catch (error) {
      out.textContent = "";
      crgate.problem(error);
    } finally {
      button.disabled = false;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("article.image").forEach(wire);
  tools();
  compare();
  classify();
});
