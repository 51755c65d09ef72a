// The page behind GET /: a photo or webcam frames go to POST /predict, a video to
// POST /predict/video; each face is drawn as a box with its emotion, the selected face's seven
// scores as bars, and, when asked, the heatmap of where the model looked (explain=true). A video's
// faces get a timeline each (their smoothed emotions over time, drawn as SVG), and so does the
// webcam session. No dependencies, no inline script (the page's CSP).
"use strict";

(() => {
  const CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"];
  // Webcam frames are scaled so their longer side is at most this: detection time grows with the
  // pixels, and a face is found down to the model's 48 px, 15% of the frame's width (a person at
  // a laptop's webcam fills more). See bench/results/page.json for the frame rate it gives.
  const FRAME_MAX_SIDE = 320;
  const FRAME_QUALITY = 0.8; // JPEG
  const FPS_WINDOW_MS = 2000; // frames per second over this sliding window
  // An uploaded video's frames analysed per second: POST /predict/video's default, and within its
  // MAX_VIDEO_FRAMES (600) for a video as long as MAX_VIDEO_DURATION_S (60 s) allows.
  const VIDEO_FPS = 5;
  const VIDEO_NAME = /\.(mp4|m4v|mov|webm|mkv|avi|mpe?g|ogv|3gp|ts)$/i;
  const SESSION_WINDOW_S = 60; // the webcam session's timeline shows its last minute
  const SVG_NS = "http://www.w3.org/2000/svg";
  // The timeline chart's drawing area, in SVG units (the chart scales to its box's width).
  const CHART = { width: 640, height: 150, left: 30, right: 10, top: 8, bottom: 34 };

  const $ = (id) => document.getElementById(id);
  const el = {
    file: $("file"), drop: $("drop"), webcam: $("webcam"), explain: $("explain"), stats: $("stats"),
    status: $("status"), stage: $("stage"), photo: $("photo"), video: $("video"), boxes: $("boxes"),
    faces: $("faces"), scores: $("scores"), scoresFace: $("scores-face"), explainNote: $("explain-note"),
    timelinesSection: $("timelines-section"), timelinesTitle: $("timelines-title"), timelines: $("timelines"),
    legend: $("legend"),
  };

  const state = {
    selected: 0, // index of the face whose scores are shown
    result: null, // the last response, and the size of the image it describes
    size: null,
    file: null, // the last uploaded photo, sent again when explanations are asked for
    photoUrl: null,
    cam: null, // {stream, canvas, running, done: [timestamps], frames, startedAt, session: [points]}
    clip: null, // the last video's POST /predict/video answer, while it is shown
    shown: 0, // counts what was chosen last (a photo, a video, the webcam): a late answer is dropped
  };

  // --- talking to the service -------------------------------------------------------------------

  function predict(blob, name) {
    return post(el.explain.checked ? "predict?explain=true" : "predict", blob, name);
  }

  async function post(url, blob, name) {
    const body = new FormData();
    body.append("file", blob, name);
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

  // `quiet`: leave the status line alone (a video's boxes follow its playback).
  function render(result, size, quiet = false) {
    state.result = result;
    state.size = size;
    const faces = result.faces;
    if (state.selected >= faces.length) state.selected = 0;
    el.stage.hidden = false;
    el.boxes.replaceChildren(...faces.flatMap((face, i) => faceNodes(face, i, size)));
    el.faces.replaceChildren(...faces.map(faceItem));
    el.explainNote.hidden = !el.explain.checked;
    if (quiet) {
      // the status line says what the whole video holds
    } else if (faces.length === 0) {
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
    label.textContent = `${face.name || i + 1} · ${face.emotion} ${pct(face.confidence)}`;
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

  function showFile(file) {
    if (!file) return;
    if (file.type.startsWith("video/") || VIDEO_NAME.test(file.name)) showVideo(file);
    else showPhoto(file);
  }

  function showMedia(file, media) {
    state.shown += 1;
    state.clip = null;
    state.selected = 0;
    state.result = null;
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoUrl = URL.createObjectURL(file);
    if (media !== el.video) {
      el.video.pause();
      el.video.removeAttribute("src");
      el.video.load(); // lets go of the last video
    }
    el.photo.hidden = media !== el.photo;
    el.video.hidden = media !== el.video;
    el.boxes.replaceChildren();
    el.faces.replaceChildren();
    el.stage.hidden = false;
    el.timelinesSection.hidden = true;
    el.timelines.replaceChildren();
    return state.shown;
  }

  async function showPhoto(file) {
    await stopWebcam();
    showMedia(file, el.photo);
    state.file = file;
    el.photo.src = state.photoUrl;
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

  // --- video upload -----------------------------------------------------------------------------

  async function showVideo(file) {
    await stopWebcam();
    state.file = null;
    const shown = showMedia(file, el.video);
    el.video.srcObject = null;
    el.video.controls = true;
    el.video.src = state.photoUrl;
    setStatus("Following each face through the video…", "busy");
    try {
      const clip = await post(`predict/video?fps=${VIDEO_FPS}`, file, file.name || "video");
      if (shown !== state.shown) return; // something else was chosen meanwhile
      state.clip = clip;
      showTracks(clip);
      followPlayback();
    } catch (error) {
      if (shown === state.shown) setStatus(`Could not analyse this video: ${error.message}.`, "error");
    }
  }

  function mostly(track) {
    const counts = {};
    track.faces.forEach((f) => (counts[f.smoothed_emotion] = (counts[f.smoothed_emotion] || 0) + 1));
    const emotion = Object.keys(counts).reduce((a, b) => (counts[b] > counts[a] ? b : a));
    return { emotion, share: counts[emotion] / track.faces.length };
  }

  function showTracks({ video, tracks }) {
    const n = tracks.length;
    const span = `${video.frames_analysed} frames over ${video.duration_s.toFixed(1)} s`;
    if (n === 0) {
      setStatus(`No face found in this video (${span}).`, "no-face");
      return;
    }
    const names = tracks.map((t) => `#${t.id} mostly ${mostly(t).emotion}`).join(", ");
    setStatus(`${n} face${n > 1 ? "s" : ""} followed through ${span}: ${names}.`, "faces");
    const end = Math.max(video.duration_s, ...tracks.map((t) => t.last_s));
    el.timelinesTitle.textContent = "Each face's emotions through the video (smoothed over about 0.5 s)";
    el.timelines.replaceChildren(
      ...tracks.map((track) => {
        const { emotion, share } = mostly(track);
        const title =
          `Face #${track.id}: ${track.first_s.toFixed(1)}–${track.last_s.toFixed(1)} s, ` +
          `${track.faces.length} frames, mostly ${emotion} (${pct(share)})`;
        const points = track.faces.map((f) => ({ t: f.time_s, scores: f.smoothed_scores, top: f.emotion }));
        const figure = timeline(title, points, 0, end, true);
        figure.dataset.track = String(track.id);
        figure.dataset.mostly = emotion;
        return figure;
      }),
    );
    el.timelinesSection.hidden = false;
  }

  // The boxes over the video are the faces of the sampled frame being shown, each labelled with
  // its track and its smoothed emotion; the timelines' cursors mark the same moment.
  function followPlayback() {
    const clip = state.clip;
    if (!clip) return;
    const now = el.video.currentTime;
    const slot = 1 / (clip.video.sample_fps || VIDEO_FPS);
    const faces = clip.tracks
      .map((track) => track.faces.filter((f) => f.time_s <= now + 1e-3 && now - f.time_s < 1.5 * slot).pop())
      .filter(Boolean)
      .map((f) => ({
        box: f.box,
        name: `#${f.track_id}`,
        emotion: f.smoothed_emotion,
        confidence: f.smoothed_scores[f.smoothed_emotion],
        scores: f.smoothed_scores,
      }));
    render({ faces }, [clip.video.width, clip.video.height], true);
    el.timelines.querySelectorAll(".cursor").forEach((line) => {
      const x = chartX(now, 0, Number(line.dataset.end)).toFixed(1);
      line.setAttribute("x1", x);
      line.setAttribute("x2", x);
    });
  }

  ["timeupdate", "seeked", "loadeddata"].forEach((name) => el.video.addEventListener(name, followPlayback));

  // --- timelines (SVG, drawn here: no chart library) ----------------------------------------------

  function svg(name, attributes = {}) {
    const node = document.createElementNS(SVG_NS, name);
    Object.entries(attributes).forEach(([key, value]) => node.setAttribute(key, String(value)));
    return node;
  }

  const chartX = (t, start, end) =>
    CHART.left + ((CHART.width - CHART.left - CHART.right) * Math.max(0, t - start)) / Math.max(end - start, 1e-3);
  const chartY = (p) => CHART.top + (CHART.height - CHART.top - CHART.bottom) * (1 - p);

  function ticks(start, end) {
    const step = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600].find((s) => (end - start) / s <= 8) || 1200;
    const first = Math.ceil(start / step - 1e-9) * step;
    const out = [];
    for (let t = first; t <= end + 1e-9; t += step) out.push(Math.round(t * 1000) / 1000);
    return out;
  }

  // One face's emotions over time: a line per class (its probability), under them a strip of the
  // top class frame by frame, a time axis in seconds from `start` to `end`; `cursor`: a line that
  // marks the moment a video is at.
  function timeline(title, points, start, end, cursor = false) {
    const figure = document.createElement("figure");
    figure.className = "timeline";
    figure.dataset.points = String(points.length);
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    const chart = svg("svg", { viewBox: `0 0 ${CHART.width} ${CHART.height}`, role: "img", "aria-label": title });
    const bottom = chartY(0);
    const right = CHART.width - CHART.right;
    chart.append(svg("rect", { class: "frame", x: CHART.left, y: CHART.top, width: right - CHART.left, height: bottom - CHART.top }));
    chart.append(svg("line", { class: "grid", x1: CHART.left, x2: right, y1: chartY(0.5), y2: chartY(0.5) }));
    [1, 0.5, 0].forEach((p) => {
      const label = svg("text", { class: "axis", x: CHART.left - 4, y: chartY(p) + 3, "text-anchor": "end" });
      label.textContent = String(p);
      chart.append(label);
    });
    ticks(start, end).forEach((t) => {
      const x = chartX(t, start, end);
      chart.append(svg("line", { class: "tick", x1: x, x2: x, y1: bottom, y2: bottom + 3 }));
      const label = svg("text", { class: "axis", x, y: bottom + 26, "text-anchor": "middle" });
      label.textContent = `${t}s`;
      chart.append(label);
    });
    points.forEach((p, i) => {
      const x = chartX(p.t, start, end);
      const next = i + 1 < points.length ? chartX(points[i + 1].t, start, end) : x + 2;
      chart.append(svg("rect", { class: "strip", "data-class": p.top, x, y: bottom + 3, width: Math.max(1, next - x), height: 8 }));
    });
    CLASSES.forEach((name) => {
      const xy = points.map((p) => `${chartX(p.t, start, end).toFixed(1)},${chartY(p.scores[name] || 0).toFixed(1)}`);
      if (xy.length === 1) xy.push(`${(chartX(points[0].t, start, end) + 2).toFixed(1)},${xy[0].split(",")[1]}`);
      chart.append(svg("polyline", { class: "series", "data-class": name, points: xy.join(" ") }));
    });
    if (cursor) {
      chart.append(svg("line", { class: "cursor", "data-end": end, x1: CHART.left, x2: CHART.left, y1: CHART.top, y2: bottom }));
    }
    figure.append(caption, chart);
    return figure;
  }

  function drawLegend() {
    el.legend.replaceChildren(
      ...CLASSES.map((name) => {
        const item = document.createElement("li");
        item.dataset.class = name;
        item.textContent = name;
        return item;
      }),
    );
  }

  el.file.addEventListener("change", () => showFile(el.file.files[0]));
  el.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    el.drop.classList.add("over");
  });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    el.drop.classList.remove("over");
    showFile(event.dataTransfer.files[0]);
  });

  el.explain.addEventListener("change", () => {
    if (state.clip) return; // a video's faces have no heatmaps
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
    state.shown += 1;
    state.clip = null;
    state.cam = {
      stream, canvas: document.createElement("canvas"), running: true, done: [], frames: 0,
      startedAt: performance.now(), session: [],
    };
    state.selected = 0;
    state.result = null;
    el.video.controls = false;
    el.video.removeAttribute("src");
    el.video.srcObject = stream;
    el.video.hidden = false;
    el.photo.hidden = true;
    el.boxes.replaceChildren();
    el.stage.hidden = false;
    el.timelines.replaceChildren();
    el.timelinesTitle.textContent = "This webcam session: the largest face's emotions, frame by frame";
    el.timelinesSection.hidden = true;
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
        recordSession(cam, result.faces);
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

  // The session's timeline: the largest face of each answered frame (the faces of single frames are
  // not followed from one to the next here: for tracked and smoothed faces, upload a video), over
  // the last SESSION_WINDOW_S seconds. A frame without a face leaves a gap in the strip.
  function recordSession(cam, faces) {
    const now = (performance.now() - cam.startedAt) / 1000;
    const area = (f) => f.box[2] * f.box[3];
    const face = faces.reduce((a, b) => (a && area(a) >= area(b) ? a : b), null);
    if (face) cam.session.push({ t: now, scores: face.scores, top: face.emotion });
    while (cam.session.length && now - cam.session[0].t > SESSION_WINDOW_S) cam.session.shift();
    if (!cam.session.length) return;
    const start = Math.max(0, now - SESSION_WINDOW_S);
    const title = `Webcam session: ${cam.session.length} frames with a face in the last ${Math.round(now - start)} s`;
    const figure = timeline(title, cam.session, start, Math.max(now, start + 1));
    figure.id = "session-timeline";
    el.timelines.replaceChildren(figure);
    el.timelinesSection.hidden = false;
  }

  el.webcam.addEventListener("click", () => (state.cam ? stopWebcam() : startWebcam()));

  drawLegend();
  renderScores();
})();
