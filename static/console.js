// Punica console: progressive enhancement only. Every page works without this file (plain
// forms); with it, uploads show real progress and inline errors, folders can be dropped, keys
// copied, and the playground streams tokens over the WebSocket.
"use strict";

(function () {
  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    var units = ["KiB", "MiB", "GiB"];
    var v = n;
    var i = -1;
    do { v /= 1024; i++; } while (v >= 1024 && i < units.length - 1);
    return v.toFixed(1) + " " + units[i];
  }

  // ---- Copy buttons (the API key shown once) ----
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      var target = document.getElementById(button.getAttribute("data-copy"));
      if (!target || !navigator.clipboard) return;
      navigator.clipboard.writeText(target.textContent.trim()).then(function () {
        button.textContent = "Copied";
      });
    });
  });

  // ---- Adapter upload: XHR with progress, inline errors, folder drop ----
  var form = document.getElementById("upload-form");
  if (form) setUpUpload(form);

  function setUpUpload(form) {
    var configInput = form.querySelector('input[name="adapter_config.json"]');
    var weightsInput = form.querySelector('input[name="adapter_model.safetensors"]');
    var nameInput = form.querySelector('input[name="name"]');
    var errorBox = document.getElementById("upload-error");
    var okBox = document.getElementById("upload-ok");
    var progress = document.getElementById("upload-progress");
    var progressText = document.getElementById("upload-progress-text");
    var progressLine = document.getElementById("upload-progress-line");
    var submit = form.querySelector('button[type="submit"]');
    var drop = document.getElementById("dropzone");

    function setFile(input, file) {
      var dt = new DataTransfer();
      dt.items.add(file);
      input.files = dt.files;
    }

    function showError(message) {
      okBox.hidden = true;
      errorBox.textContent = message;
      errorBox.hidden = false;
      errorBox.focus();
    }

    function readEntries(reader) {
      return new Promise(function (resolve, reject) { reader.readEntries(resolve, reject); });
    }

    function entryFile(entry) {
      return new Promise(function (resolve, reject) { entry.file(resolve, reject); });
    }

    // Walks a dropped folder (depth-first, bounded) and returns its files.
    async function collect(entry, out, depth) {
      if (entry.isFile) {
        out.push(await entryFile(entry));
      } else if (entry.isDirectory && depth < 4) {
        var reader = entry.createReader();
        var batch;
        do {
          batch = await readEntries(reader);
          for (var i = 0; i < batch.length; i++) await collect(batch[i], out, depth + 1);
        } while (batch.length > 0);
      }
    }

    if (drop) {
      drop.hidden = false;
      ["dragenter", "dragover"].forEach(function (t) {
        drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("over"); });
      });
      ["dragleave", "drop"].forEach(function (t) {
        drop.addEventListener(t, function () { drop.classList.remove("over"); });
      });
      drop.addEventListener("drop", async function (e) {
        e.preventDefault();
        var files = [];
        var folderName = null;
        var items = e.dataTransfer.items ? Array.prototype.slice.call(e.dataTransfer.items) : [];
        var entries = items.map(function (it) { return it.webkitGetAsEntry ? it.webkitGetAsEntry() : null; });
        for (var i = 0; i < entries.length; i++) {
          if (!entries[i]) continue;
          if (entries[i].isDirectory && folderName === null) folderName = entries[i].name;
          await collect(entries[i], files, 0);
        }
        if (files.length === 0) files = Array.prototype.slice.call(e.dataTransfer.files || []);
        var found = 0;
        files.forEach(function (f) {
          if (f.name === "adapter_config.json") { setFile(configInput, f); found++; }
          if (f.name === "adapter_model.safetensors") { setFile(weightsInput, f); found++; }
        });
        if (found < 2) {
          showError("The dropped files must include adapter_config.json and adapter_model.safetensors.");
          return;
        }
        if (folderName && !nameInput.value) {
          nameInput.value = folderName.toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^[^a-z0-9]+/, "").slice(0, 63);
        }
        drop.querySelector("span").textContent = "Ready: " + files.length + " files from " + (folderName || "the drop");
      });
    }

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      errorBox.hidden = true;
      okBox.hidden = true;
      var data = new FormData();
      // The name goes first so the server can reject a bad name before reading the weights.
      data.append("name", nameInput.value.trim());
      if (configInput.files[0]) data.append("adapter_config.json", configInput.files[0], "adapter_config.json");
      if (weightsInput.files[0]) data.append("adapter_model.safetensors", weightsInput.files[0], "adapter_model.safetensors");
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRF-Token", csrfToken());
      xhr.setRequestHeader("Accept", "application/json");
      progressLine.hidden = false;
      progress.value = 0;
      progressText.textContent = "0%";
      submit.disabled = true;
      xhr.upload.addEventListener("progress", function (ev) {
        if (!ev.lengthComputable) return;
        var pct = Math.round((ev.loaded / ev.total) * 100);
        progress.max = 100;
        progress.value = pct;
        progressText.textContent = pct + "% of " + formatBytes(ev.total);
      });
      xhr.upload.addEventListener("load", function () {
        progressText.textContent = "Validating…";
      });
      xhr.addEventListener("load", function () {
        submit.disabled = false;
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (_) { body = null; }
        if (xhr.status === 201 && body) {
          progressText.textContent = "Done";
          okBox.textContent = "Uploaded " + body.name + " version " + body.version + ".";
          okBox.hidden = false;
          refreshAdapterList();
          form.reset();
          return;
        }
        progressLine.hidden = true;
        var message = body && body.error ? body.error.message : "The upload failed (HTTP " + xhr.status + ").";
        showError(message);
      });
      xhr.addEventListener("error", function () {
        submit.disabled = false;
        progressLine.hidden = true;
        showError("The connection failed during the upload.");
      });
      xhr.send(data);
    });
  }

  // Replaces the adapter table with a fresh copy from the server (the new adapter appears).
  function refreshAdapterList() {
    var current = document.getElementById("adapter-list");
    if (!current) return;
    fetch(window.location.pathname, { headers: { "Accept": "text/html" }, credentials: "same-origin" })
      .then(function (r) { return r.text(); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("adapter-list");
        if (fresh) current.replaceWith(fresh);
      });
  }

  // ---- Playground: stream tokens over /v1/stream with the session cookie ----
  var pg = document.getElementById("playground");
  if (pg) setUpPlayground(pg);

  function setUpPlayground(pg) {
    var output = document.getElementById("pg-output");
    var status = document.getElementById("pg-status");
    var rate = document.getElementById("pg-rate");
    var count = document.getElementById("pg-count");
    var send = document.getElementById("pg-send");
    var stop = document.getElementById("pg-stop");
    var clear = document.getElementById("pg-clear");
    var input = document.getElementById("pg-input");
    var adapter = document.getElementById("pg-adapter");
    var maxTokens = document.getElementById("pg-max-tokens");
    var temperature = document.getElementById("pg-temperature");
    var modeInputs = pg.querySelectorAll('input[name="mode"]');
    var socket = null;
    var running = null;
    var seq = 0;
    var transcript = [];
    var started = 0;
    var firstToken = 0;
    var tokens = 0;
    var reply = "";

    function mode() {
      for (var i = 0; i < modeInputs.length; i++) if (modeInputs[i].checked) return modeInputs[i].value;
      return "prompt";
    }

    function setStatus(text) { status.textContent = text; }

    function connect() {
      return new Promise(function (resolve, reject) {
        if (socket && socket.readyState === WebSocket.OPEN) { resolve(socket); return; }
        var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
        var ws = new WebSocket(scheme + "//" + window.location.host + "/v1/stream");
        ws.addEventListener("open", function () { socket = ws; resolve(ws); });
        ws.addEventListener("error", function () { reject(new Error("cannot connect")); });
        ws.addEventListener("close", function () {
          if (socket === ws) socket = null;
          if (running) finish("connection closed");
        });
        ws.addEventListener("message", onMessage);
      });
    }

    function updateRate() {
      count.textContent = tokens + " tokens";
      if (tokens > 1 && firstToken) {
        var secs = (performance.now() - firstToken) / 1000;
        if (secs > 0) rate.textContent = ((tokens - 1) / secs).toFixed(1) + " tokens/s";
      }
    }

    function onMessage(ev) {
      var msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      if (msg.id && msg.id !== running) return;
      if (msg.type === "token") {
        if (!firstToken) {
          firstToken = performance.now();
          setStatus("Streaming… first token after " + Math.round(firstToken - started) + " ms");
        }
        tokens++;
        reply += msg.text;
        output.lastChild.lastChild.textContent += msg.text;
        updateRate();
      } else if (msg.type === "done") {
        updateRate();
        finish("Finished: " + msg.finish_reason + " (" + msg.usage.prompt_tokens + " prompt + " +
          msg.usage.completion_tokens + " completion tokens)");
      } else if (msg.type === "error") {
        finish("Error: " + msg.message);
      }
    }

    function finish(text) {
      if (mode() === "chat" && reply) transcript.push({ role: "assistant", content: reply });
      running = null;
      send.disabled = false;
      stop.disabled = true;
      setStatus(text);
    }

    function appendBlock(prefix) {
      var block = document.createElement("div");
      if (prefix) {
        var who = document.createElement("strong");
        who.textContent = prefix;
        block.appendChild(who);
      }
      var text = document.createElement("span");
      block.appendChild(text);
      output.appendChild(block);
    }

    pg.addEventListener("submit", function (e) {
      e.preventDefault();
      if (running) return;
      var text = input.value;
      if (!text.trim()) { setStatus("Type a prompt first."); input.focus(); return; }
      var msg = {
        type: "generate",
        id: "pg" + (++seq),
        adapter: adapter.value || null,
        max_tokens: parseInt(maxTokens.value, 10) || 64,
        temperature: parseFloat(temperature.value) || 0
      };
      if (mode() === "chat") {
        transcript.push({ role: "user", content: text });
        msg.messages = transcript.slice();
        var you = document.createElement("div");
        var label = document.createElement("strong");
        label.textContent = "You: ";
        you.appendChild(label);
        you.appendChild(document.createTextNode(text));
        output.appendChild(you);
        appendBlock("Model: ");
        input.value = "";
      } else {
        msg.prompt = text;
        output.textContent = "";
        appendBlock(null);
        output.lastChild.lastChild.textContent = text;
        appendBlock(null);
      }
      tokens = 0;
      reply = "";
      firstToken = 0;
      rate.textContent = "";
      count.textContent = "0 tokens";
      started = performance.now();
      send.disabled = true;
      stop.disabled = false;
      running = msg.id;
      setStatus("Connecting…");
      connect().then(function (ws) {
        setStatus("Waiting for the first token…");
        ws.send(JSON.stringify(msg));
      }).catch(function () {
        finish("Could not connect to the streaming endpoint.");
      });
    });

    stop.addEventListener("click", function () {
      if (running && socket) socket.send(JSON.stringify({ type: "cancel", id: running }));
    });

    clear.addEventListener("click", function () {
      transcript = [];
      output.textContent = "";
      setStatus("Ready.");
    });

    setStatus("Ready.");
  }
})();
