// slideloop's map tools: a page-wide key handler and a canvas over the review map for brush, eraser, wand and
// the picked polygon's vertex handles.
// The kernel does the geometry: this only reports keys, strokes (canvas px) and clicks, and draws the cursor.

const SKIP_IN_FIELDS = new Set(["ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight", "Home", "End", "PageUp",
  "PageDown", " ", "Enter"]);

function keyName(ev) {
  const mods = [ev.ctrlKey || ev.metaKey ? "ctrl" : "", ev.altKey ? "alt" : "", ev.shiftKey && ev.key.length > 1 ? "shift" : ""];
  return [...mods.filter(Boolean), ev.key].join("+");
}

function wantsKey(ev) {
  const t = ev.target;
  const tag = (t && t.tagName) || "";
  if (tag === "TEXTAREA" || (tag === "INPUT" && !["checkbox", "radio", "range", "button"].includes(t.type))) {
    return ev.key === "Escape";  // typing in a text field stays typing
  }
  // a focused list keeps its own arrow keys (the queue still steps), every other key is the page's
  if ((tag === "SELECT" || tag === "INPUT") && SKIP_IN_FIELDS.has(ev.key)) return false;
  return !["Shift", "Control", "Alt", "Meta"].includes(ev.key);
}

// the keys that pick a tool (as slideloop_apps.keys has them); the kernel confirms through the "tool" trait
const TOOL_KEYS = { b: "brush", e: "eraser", c: "accept", w: "wand", v: "select", Escape: "pan" };

function render({ model, el }) {
  el.classList.add("slideloop-tools");
  const status = document.createElement("div");
  status.className = "slideloop-tools-status";
  el.appendChild(status);

  const onKey = (ev) => {
    if (!model.get("keys_enabled") || !wantsKey(ev)) return;
    const name = keyName(ev);
    if (!model.get("keymap").includes(name)) return;
    ev.preventDefault();
    ev.stopPropagation();
    // switch the canvas at once: a click right after the key must not wait for the kernel's round trip
    // (class keys are left to the kernel: with a polygon picked they change its class, not the tool)
    if (TOOL_KEYS[name]) { localTool = TOOL_KEYS[name]; sync(); }
    model.send({ kind: "key", key: name });
  };
  document.addEventListener("keydown", onKey, true);

  // --- the canvas over the map -------------------------------------------------------------------
  const canvas = document.createElement("canvas");
  canvas.className = "slideloop-tools-canvas";
  Object.assign(canvas.style, { position: "absolute", left: "0", top: "0", zIndex: "650", pointerEvents: "none" });
  const ctx = canvas.getContext("2d");
  let host = null, stroke = null, cursor = null, spaceHeld = false, localTool = null;
  // a vertex being dragged: {op: "move" | "insert", index, at: [x, y]}
  let drag = null;
  const tool = () => localTool || model.get("tool");

  const attach = () => {
    const found = document.querySelector(model.get("map_selector"));
    if (!found || found === host) return;
    host = found;
    if (getComputedStyle(host).position === "static") host.style.position = "relative";
    host.appendChild(canvas);
    new ResizeObserver(fit).observe(host);
    fit();
  };
  const fit = () => {
    if (!host) return;
    canvas.width = host.clientWidth;
    canvas.height = host.clientHeight;
    draw();
  };
  const active = () => tool() !== "pan" && !spaceHeld;
  const painting = () => ["brush", "eraser", "accept"].includes(tool());
  const colour = () => model.get("colour");

  // the picked polygon's vertices on screen (the kernel sends them as offsets from the map's centre)
  const handles = () => (tool() === "select" ? model.get("handles") : []).map(
    ([dx, dy]) => [canvas.width / 2 + dx, canvas.height / 2 + dy]);
  const midpoints = (pts) => pts.map((p, i) => {
    const q = pts[(i + 1) % pts.length];
    return [(p[0] + q[0]) / 2, (p[1] + q[1]) / 2];
  });
  const near = (pts, p, r) => {
    let best = -1, bestD = r;
    pts.forEach((q, i) => {
      const d = Math.hypot(q[0] - p[0], q[1] - p[1]);
      if (d <= bestD) { best = i; bestD = d; }
    });
    return best;
  };
  const drawHandles = () => {
    const pts = handles();
    canvas.dataset.handles = String(pts.length);  // what the page shows, for tests and for a screen reader's probe
    if (!pts.length) return;
    if (drag) {  // the edited outline follows the mouse until the kernel has saved it
      const ring = pts.slice();
      if (drag.op === "move") ring[drag.index] = drag.at; else ring.splice(drag.index + 1, 0, drag.at);
      ctx.strokeStyle = "#f0e442";
      ctx.lineWidth = 2;
      ctx.setLineDash([5, 4]);
      ctx.beginPath();
      ring.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
      ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.lineWidth = 1.5;
    for (const [x, y] of midpoints(pts)) {
      ctx.fillStyle = "rgba(255,255,255,0.7)";
      ctx.strokeStyle = "#333";
      ctx.beginPath();
      ctx.arc(x, y, 3.5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
    }
    pts.forEach(([x, y], i) => {
      const [hx, hy] = drag && drag.op === "move" && drag.index === i ? drag.at : [x, y];
      ctx.fillStyle = "#fff";
      ctx.strokeStyle = "#000";
      ctx.fillRect(hx - 4.5, hy - 4.5, 9, 9);
      ctx.strokeRect(hx - 4.5, hy - 4.5, 9, 9);
    });
  };

  const draw = () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    drawHandles();
    const r = model.get("radius_px");
    if (stroke && stroke.length) {
      ctx.strokeStyle = colour();
      ctx.globalAlpha = 0.45;
      ctx.lineWidth = 2 * r;
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(stroke[0][0], stroke[0][1]);
      for (const [x, y] of stroke) ctx.lineTo(x, y);
      if (stroke.length === 1) ctx.lineTo(stroke[0][0] + 0.01, stroke[0][1]);
      ctx.stroke();
      ctx.globalAlpha = 1;
    }
    if (cursor && active() && painting()) {
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#000";
      ctx.beginPath();
      ctx.arc(cursor[0], cursor[1], r, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.strokeStyle = colour();
      ctx.setLineDash([4, 3]);
      ctx.beginPath();
      ctx.arc(cursor[0], cursor[1], r, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.setLineDash([]);
    }
  };
  const sync = () => {
    canvas.style.pointerEvents = active() ? "auto" : "none";
    canvas.style.cursor = ["wand", "select"].includes(tool()) ? "crosshair" : (painting() ? "none" : "");
    status.textContent = model.get("status");
    draw();
  };
  const at = (ev) => {
    const b = canvas.getBoundingClientRect();
    return [ev.clientX - b.left, ev.clientY - b.top];
  };
  const size = () => [canvas.width, canvas.height];

  canvas.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0) return;
    ev.preventDefault();
    const pts = handles();
    const v = pts.length ? near(pts, at(ev), 8) : -1;
    const m = pts.length && v < 0 ? near(midpoints(pts), at(ev), 7) : -1;
    if (painting()) {
      stroke = [at(ev)];
      canvas.setPointerCapture(ev.pointerId);
    } else if (v >= 0 && ev.altKey) {
      model.send({ kind: "vertex", op: "delete", index: v, point: at(ev), size: size() });
    } else if (v >= 0 || m >= 0) {
      drag = { op: v >= 0 ? "move" : "insert", index: v >= 0 ? v : m, at: at(ev), from: at(ev) };
      canvas.setPointerCapture(ev.pointerId);
    } else {
      model.send({ kind: "click", tool: tool(), point: at(ev), size: size(), shift: ev.shiftKey, alt: ev.altKey });
    }
    draw();
  });
  canvas.addEventListener("pointermove", (ev) => {
    cursor = at(ev);
    if (stroke) stroke.push(cursor);
    if (drag) drag.at = cursor;
    draw();
  });
  canvas.addEventListener("pointerup", (ev) => {
    if (drag) {
      const moved = Math.hypot(drag.at[0] - drag.from[0], drag.at[1] - drag.from[1]);
      if (moved >= 2) model.send({ kind: "vertex", op: drag.op, index: drag.index, point: drag.at, size: size() });
      drag = null;
      draw();
      return;
    }
    if (!stroke) return;
    model.send({ kind: "stroke", tool: tool(), points: stroke, size: size(), shift: ev.shiftKey, alt: ev.altKey });
    stroke = null;
    draw();
  });
  canvas.addEventListener("pointerleave", () => { cursor = null; draw(); });
  // the canvas sits inside Leaflet's container: wheel events bubble on and zoom the map; presses must not
  // (they would start a pan or a click on the map under the brush)
  for (const type of ["pointerdown", "mousedown", "click", "dblclick"]) {
    canvas.addEventListener(type, (ev) => { if (active()) ev.stopPropagation(); });
  }
  // Space held: pan with the mouse while a tool is on
  const onSpace = (ev) => {
    if (ev.key !== " " || !wantsKey(ev)) return;
    const held = ev.type === "keydown";
    if (held !== spaceHeld) { spaceHeld = held; sync(); }
    ev.preventDefault();
  };
  document.addEventListener("keydown", onSpace, true);
  document.addEventListener("keyup", onSpace, true);

  model.on("change:tool", () => { localTool = null; sync(); });
  model.on("change:radius_px", draw);
  model.on("change:status", sync);
  model.on("change:colour", draw);
  model.on("change:handles", draw);
  const timer = setInterval(attach, 500);
  attach();
  sync();
  return () => {
    clearInterval(timer);
    document.removeEventListener("keydown", onKey, true);
    document.removeEventListener("keydown", onSpace, true);
    document.removeEventListener("keyup", onSpace, true);
    canvas.remove();
  };
}

export default { render };
