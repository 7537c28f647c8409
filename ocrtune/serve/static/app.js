// ocrtune serve web page: drop / paste / pick an image -> streamed LaTeX -> KaTeX rendering.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), fileInput = $("file"), preview = $("preview"), latex = $("latex"), render = $("render");
  const copyBtn = $("copy"), status = $("status"), errorBox = $("error"), keyInput = $("api-key");
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"];
  let server = { model: null, limits: { max_request_bytes: 20 * 1024 * 1024, max_new_tokens: 512 }, auth_required: false };
  let current = null; // AbortController of the request in flight
  let renderQueued = false;

  function setStatus(text, busy) {
    status.textContent = text;
    status.classList.toggle("busy", !!busy);
  }
  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  // ---- server info -------------------------------------------------------------------------------
  async function loadHealth() {
    try {
      const r = await fetch("/health", { cache: "no-store" });
      const h = await r.json();
      server = h;
      $("model-name").textContent = h.model;
      $("health-dot").className = "dot ok";
      $("auth").hidden = !h.auth_required;
      if (h.auth_required) keyInput.value = localStorage.getItem("ocrtune-api-key") || "";
    } catch (e) {
      $("model-name").textContent = "server unreachable";
      $("health-dot").className = "dot bad";
    }
  }
  keyInput.addEventListener("change", () => localStorage.setItem("ocrtune-api-key", keyInput.value.trim()));

  // ---- rendering ---------------------------------------------------------------------------------
  function renderNow() {
    renderQueued = false;
    const tex = latex.value.trim();
    copyBtn.disabled = !latex.value;
    if (!tex) {
      render.innerHTML = '<span class="muted">Nothing to render yet.</span>';
      return;
    }
    if (!window.katex) {
      render.textContent = "KaTeX did not load.";
      return;
    }
    try {
      katex.render(tex, render, { displayMode: true, throwOnError: true, strict: "ignore", trust: false,
                                  maxSize: 50, maxExpand: 1000 });
    } catch (e) {
      render.innerHTML = "";
      const box = document.createElement("div");
      box.className = "render-error";
      box.textContent = e && e.name === "ParseError" ? e.message : "Can't render: " + e;
      render.appendChild(box);
    }
  }
  function scheduleRender() {
    if (!renderQueued) { renderQueued = true; requestAnimationFrame(renderNow); }
  }
  // Once the user edits the box, it is theirs: a recognition still streaming into it is cancelled
  // (the server stops generating), so no token lands in the middle of their edit.
  latex.addEventListener("input", () => {
    if (current) {
      current.abort();
      current = null;
      setStatus("Stopped: you edited the LaTeX.", false);
      document.body.dataset.state = "edited";
    }
    scheduleRender();
  });

  // ---- copy --------------------------------------------------------------------------------------
  copyBtn.addEventListener("click", async () => {
    const text = latex.value;
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(text); ok = true; }
    } catch (e) { /* fall back below */ }
    if (!ok) {
      latex.focus(); latex.select();
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    }
    copyBtn.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { copyBtn.textContent = "Copy"; }, 1200);
  });

  // ---- image input -------------------------------------------------------------------------------
  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const fr = new FileReader();
      fr.onload = () => resolve(fr.result);
      fr.onerror = () => reject(fr.error || new Error("could not read the file"));
      fr.readAsDataURL(file);
    });
  }

  async function handleFile(file) {
    if (!file) return;
    showError("");
    if (!IMAGE_TYPES.includes(file.type)) {
      showError(`"${file.name || "pasted data"}" is not a supported image (PNG, JPEG, WebP, GIF, BMP or TIFF).`);
      return;
    }
    const limit = Math.floor((server.limits.max_request_bytes - 4096) * 3 / 4);
    if (file.size > limit) {
      showError(`The image is ${(file.size / 1048576).toFixed(1)} MB; this server accepts up to ${(limit / 1048576).toFixed(1)} MB.`);
      return;
    }
    let url;
    try { url = await readAsDataURL(file); } catch (e) { showError(String(e.message || e)); return; }
    preview.src = url;
    preview.hidden = false;
    drop.classList.add("has-image");
    await recognize(url);
  }

  async function recognize(dataUrl) {
    if (current) current.abort();
    const ctrl = new AbortController();
    current = ctrl;
    latex.value = "";
    scheduleRender();
    setStatus("Reading the formula…", true);
    const t0 = performance.now();
    const headers = { "Content-Type": "application/json" };
    if (server.auth_required && keyInput.value.trim()) headers["Authorization"] = "Bearer " + keyInput.value.trim();
    const body = {
      model: server.model || undefined, stream: true, temperature: 0,
      max_tokens: server.limits.max_new_tokens,
      messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: dataUrl } }] }],
    };
    let finish = null;
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: ctrl.signal });
      if (!r.ok) {
        let message = `HTTP ${r.status}`;
        try { const j = await r.json(); message = (j.error && j.error.message) || message; } catch (e) { /* keep */ }
        if (r.status === 401) { message += " (enter the server's API key below)"; $("auth").hidden = false; }
        throw new Error(message);
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const msg = JSON.parse(data);
            if (msg.error) throw new Error(msg.error.message);
            const choice = msg.choices && msg.choices[0];
            if (!choice) continue;
            if (current !== ctrl) return; // cancelled (edited or replaced): never write into the box again
            if (choice.delta && choice.delta.content) { latex.value += choice.delta.content; scheduleRender(); }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      if (current !== ctrl) return;
      const secs = (performance.now() - t0) / 1000;
      setStatus(`Recognized in ${secs.toFixed(2)} s` + (finish === "length" ? " (stopped at the token limit)" : ""), false);
      document.body.dataset.state = "done";
    } catch (e) {
      if (e.name === "AbortError") return;
      setStatus("Failed.", false);
      showError(String(e.message || e));
      document.body.dataset.state = "error";
    } finally {
      if (current === ctrl) current = null;
      renderNow();
    }
  }

  // drop
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "dragend"].forEach((ev) => drop.addEventListener(ev, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) handleFile(f); else showError("Drop an image file (not a link or text).");
  });
  // paste (anywhere except while editing the LaTeX)
  document.addEventListener("paste", (e) => {
    if (document.activeElement === latex || document.activeElement === keyInput) return;
    const items = (e.clipboardData && e.clipboardData.items) || [];
    for (const it of items) {
      if (it.kind === "file" && it.type.startsWith("image/")) { e.preventDefault(); handleFile(it.getAsFile()); return; }
    }
  });
  // pick
  drop.addEventListener("click", (e) => { if (e.target !== fileInput) fileInput.click(); });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fileInput.click(); }
  });
  fileInput.addEventListener("change", () => { handleFile(fileInput.files[0]); fileInput.value = ""; });

  loadHealth();
  window.addEventListener("load", renderNow);
})();
