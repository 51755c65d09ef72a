// The page behind GET /: a photo or webcam frames go to POST /predict; each face is drawn as a
// box with its emotion, the selected face's seven scores as bars, and, when asked, the heatmap of
// where the model looked (explain=true). No dependencies, no inline script (the page's CSP).
"use strict";

(() => {
  const CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"];
  // Webcam frames are scaled so their longer side is at most this: detection time grows with the
  // pixels, and a face is found down to the model's 48 px, 15% of the frame's width (a person at
  // a laptop's webcam fills more). See bench/results/page.json for the frame rate it gives.
  const FRAME_MAX_SIDE = 320;
  const FRAME_QUALITY = 0.8; // JPEG
  const FPS_WINDOW_MS = 2000; // frames per second over this sliding window

  const $ = (id) => document.getElementById(id);
  const el = {
    file: $("file"), drop: $("drop"), webcam: $("webcam"), explain: $("explain"), stats: $("stats"),
    status: $("status"), stage: $("stage"), photo: $("photo"), video: $("video"), boxes: $("boxes"),
    faces: $("faces"), scores: $("scores"), scoresFace: $("scores-face"), explainNote: $("explain-note"),
  };

  const state = {
    selected: 0, // index of the face whose scores are shown
    result: null, // the last response, and the size of the image it describes
    size: null,
    file: null, // the last uploaded photo, sent again when explanations are asked for
    photoUrl: null,
    cam: null, // {stream, canvas, running, done: [timestamps], frames}
  };

  // --- talking to the service -------------------------------------------------------------------

  async function predict(blob, name) {
    const body = new FormData();
    body.append("file", blob, name);
    const url = el.explain.checked ? "predict?explain=true" : "predict";
    const response = await fetch(url, { method: "POST", body });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new Error(typeof data.detail === "string" ? data.detail : `the service answered ${response.status}`);
    }
    return data;
  }

  // --- drawing results --------------------------------------------------------------------------

  const percent = (value, total) => `${(100 * value) / total}%`;
  const pct = (p) => `${Math.round(p * 100)}%`;

  function place(node, [x, y, w, h], [width, height]) {
    // CSSOM properties, not a style attribute: allowed by the page's style-src 'self'.
    node.style.left = percent(x, width);
    node.style.top = percent(y, height);
    node.style.width = percent(w, width);
    node.style.height = percent(h, height);
  }

  function setStatus(text, kind) {
    el.status.textContent = text;
    el.status.dataset.state = kind;
  }

  function render(result, size) {
    state.result = result;
    state.size = size;
    const faces = result.faces;
    if (state.selected >= faces.length) state.selected = 0;
    el.stage.hidden = false;
    el.boxes.replaceChildren(...faces.flatMap((face, i) => faceNodes(face, i, size)));
    el.faces.replaceChildren(...faces.map(faceItem));
    el.explainNote.hidden = !el.explain.checked;
    if (faces.length === 0) {
      setStatus(state.cam ? "No face found in this frame." : "No face found in this photo.", "no-face");
    } else {
      const names = faces.map((f) => `${f.emotion} (${pct(f.confidence)})`).join(", ");
      setStatus(`${faces.length} face${faces.length > 1 ? "s" : ""} found: ${names}.`, "faces");
    }
    renderScores();
  }

  function faceNodes(face, i, size) {
    const nodes = [];
    const heat = face.explanation;
    if (heat && el.explain.checked) {
      const img = document.createElement("img");
      img.className = "heatmap";
      img.alt = "";
      img.src = `data:image/png;base64,${heat.png}`;
      img.dataset.face = String(i);
      place(img, heat.box, size);
      nodes.push(img);
    }
    const box = document.createElement("button");
    box.type = "button";
    box.className = "box";
    box.dataset.emotion = face.emotion;
    box.dataset.confidence = face.confidence.toFixed(4);
    box.setAttribute("aria-pressed", String(i === state.selected));
    box.setAttribute("aria-label", `Face ${i + 1}: ${face.emotion}, ${pct(face.confidence)}. Show its scores.`);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `${i + 1} · ${face.emotion} ${pct(face.confidence)}`;
    box.append(label);
    box.addEventListener("click", () => select(i));
    place(box, face.box, size);
    nodes.push(box);
    return nodes;
  }

  function faceItem(face, i) {
    const item = document.createElement("li");
    item.textContent = `${face.emotion}, ${pct(face.confidence)}`;
    if (face.explanation) item.textContent += `; hiding its most telling region costs ${pct(face.explanation.max_drop)}`;
    if (i === state.selected) item.className = "selected";
    return item;
  }

  function select(i) {
    state.selected = i;
    el.boxes.querySelectorAll(".box").forEach((box, j) => box.setAttribute("aria-pressed", String(i === j)));
    el.faces.querySelectorAll("li").forEach((item, j) => item.classList.toggle("selected", i === j));
    renderScores();
  }

  function renderScores() {
    const face = state.result && state.result.faces[state.selected];
    el.scoresFace.textContent = face ? `(face ${state.selected + 1})` : "";
    const names = face ? Object.keys(face.scores) : CLASSES;
    el.scores.replaceChildren(
      ...names.map((name) => {
        const p = face ? face.scores[name] : 0;
        const row = document.createElement("li");
        row.dataset.class = name;
        const label = document.createElement("span");
        label.className = "name";
        label.textContent = name;
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.setAttribute("aria-hidden", "true");
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.width = pct(p);
        bar.append(fill);
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = face ? pct(p) : "–";
        row.append(label, bar, value);
        if (face && name === face.emotion) row.classList.add("top");
        return row;
      }),
    );
  }

  // --- upload -----------------------------------------------------------------------------------

  async function showPhoto(file) {
    if (!file) return;
    await stopWebcam();
    state.file = file;
    state.selected = 0;
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoUrl = URL.createObjectURL(file);
    el.photo.src = state.photoUrl;
    el.photo.hidden = false;
    el.video.hidden = true;
    el.boxes.replaceChildren();
    el.stage.hidden = false;
    try {
      await el.photo.decode();
    } catch {
      setStatus("This file is not an image the browser can show; asking the service anyway.", "busy");
    }
    await classifyPhoto();
  }

  async function classifyPhoto() {
    setStatus("Looking for faces…", "busy");
    try {
      const result = await predict(state.file, state.file.name || "photo");
      render(result, [el.photo.naturalWidth || 1, el.photo.naturalHeight || 1]);
    } catch (error) {
      el.boxes.replaceChildren();
      setStatus(`Could not classify this file: ${error.message}.`, "error");
    }
  }

  el.file.addEventListener("change", () => showPhoto(el.file.files[0]));
  el.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    el.drop.classList.add("over");
  });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    el.drop.classList.remove("over");
    showPhoto(event.dataTransfer.files[0]);
  });

  el.explain.addEventListener("change", () => {
    const explained = state.result && state.result.faces.some((face) => face.explanation);
    if (el.explain.checked && !explained && state.file && !state.cam) {
      classifyPhoto(); // the heatmaps are computed on request only
    } else if (state.result) {
      render(state.result, state.size);
    }
  });

  // --- webcam -----------------------------------------------------------------------------------

  async function startWebcam() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      setStatus("This browser gives no camera to this page (it needs https or localhost).", "error");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    } catch (error) {
      setStatus(`No camera: ${error.message}.`, "error");
      return;
    }
    state.cam = { stream, canvas: document.createElement("canvas"), running: true, done: [], frames: 0 };
    state.selected = 0;
    state.result = null;
    el.video.srcObject = stream;
    el.video.hidden = false;
    el.photo.hidden = true;
    el.boxes.replaceChildren();
    el.stage.hidden = false;
    el.webcam.textContent = "Stop webcam";
    el.webcam.setAttribute("aria-pressed", "true");
    el.stats.hidden = false;
    el.stats.textContent = "Starting…";
    el.stats.dataset.frames = "0";
    setStatus("Webcam on: looking for faces…", "busy");
    await el.video.play();
    state.cam.loop = webcamLoop(state.cam);
  }

  async function stopWebcam() {
    const cam = state.cam;
    if (!cam) return;
    cam.running = false;
    await cam.loop; // the frame in flight is answered before the camera goes
    cam.stream.getTracks().forEach((track) => track.stop());
    el.video.srcObject = null;
    state.cam = null;
    el.webcam.textContent = "Start webcam";
    el.webcam.setAttribute("aria-pressed", "false");
    setStatus("Webcam off.", "idle");
  }

  function grabFrame(cam) {
    const video = el.video;
    const scale = Math.min(1, FRAME_MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
    cam.canvas.width = Math.round(video.videoWidth * scale);
    cam.canvas.height = Math.round(video.videoHeight * scale);
    cam.canvas.getContext("2d").drawImage(video, 0, 0, cam.canvas.width, cam.canvas.height);
    return new Promise((resolve) => cam.canvas.toBlob(resolve, "image/jpeg", FRAME_QUALITY));
  }

  // One request in flight at a time: the next frame is taken when the last one is answered.
  async function webcamLoop(cam) {
    while (cam.running) {
      if (!el.video.videoWidth) {
        await new Promise((resolve) => requestAnimationFrame(resolve));
        continue;
      }
      const blob = await grabFrame(cam);
      const size = [cam.canvas.width, cam.canvas.height];
      const started = performance.now();
      try {
        const result = await predict(blob, "frame.jpg");
        if (!cam.running) break;
        showStats(cam, performance.now() - started);
        render(result, size);
      } catch (error) {
        setStatus(`Frame not classified: ${error.message}.`, "error");
        await new Promise((resolve) => setTimeout(resolve, 500)); // a busy service gets a breather
      }
    }
  }

  function showStats(cam, rttMs) {
    const now = performance.now();
    cam.frames += 1;
    cam.done.push(now);
    while (cam.done.length && now - cam.done[0] > FPS_WINDOW_MS) cam.done.shift();
    const span = cam.done.length > 1 ? (cam.done[cam.done.length - 1] - cam.done[0]) / 1000 : 0;
    const fps = span > 0 ? (cam.done.length - 1) / span : 0;
    el.stats.textContent = `${fps.toFixed(1)} frames/s · ${Math.round(rttMs)} ms round trip`;
    el.stats.dataset.frames = String(cam.frames);
    el.stats.dataset.fps = fps.toFixed(2);
    el.stats.dataset.rttMs = rttMs.toFixed(1);
  }

  el.webcam.addEventListener("click", () => (state.cam ? stopWebcam() : startWebcam()));

  renderScores();
})();
