/*
 * MedSAMix overlay for the OHIF v3 viewer that MONAI Label bundles (served by the MedSAMix server at /ohif/,
 * injected as <script src="/ohif/medsamix/overlay.js?v=1">). Version 1. Hand-written, no build step.
 *
 * It adds a small floating "MedSAMix" panel (bottom left, over the study browser) to the unchanged viewer:
 *
 *  - Box prompt: "Box" mode, drag a rectangle on an axial viewport (slices along the volume's K axis); Run sends
 *    POST /infer/<model>?image=<SeriesInstanceUID>&output=image with
 *    params {"roi": [i0, i1, j0, j1, k0, k1], "mode": "2d" | "3d", "slice": k, "result_extension": ".nrrd",
 *            "result_dtype": "uint8", "result_compress": false}
 *    in voxel indices of the viewer's volume (worldToIndex, the index space of MONAI Label's point prompts), and
 *    writes the NRRD answer into segmentation "1" (the MONAI Label panel's labelmap): on the prompted slices, every
 *    voxel that is background or already the chosen label becomes the answer (the chosen label or background);
 *    other labels are kept. "3D" propagates over k - n .. k + n.
 *  - Submit label: PUT /datastore/label?image=<SeriesInstanceUID>&tag=final with the labelmap as "label.bin" (one
 *    uint8 per voxel, I fastest, then J, then K) and params {"label_info": [{"name", "idx"}, ...]}.
 *  - Training: POST /train/merge ({}), DELETE /train/ (Stop), and a progress line from GET /info/ polled every 2 s
 *    while a run is active (train_stats.merge: status, epoch / total_epochs, best_metric, message).
 *
 * Everything goes through what the viewer exposes on window (cornerstone, cornerstoneTools, services,
 * commandsManager); when one of them is missing the panel says so instead of failing. State for tests and
 * debugging: window.__medsamixOverlay.
 */
(function () {
  'use strict';

  var VERSION = 1;
  if (window.__medsamixOverlay) {
    return;
  }
  var SEG_ID = '1'; // the MONAI Label panel's segmentation
  var POLL_MS = 2000;
  var ACTIVE = { preparing: 1, running: 1, finishing: 1 };

  var api = (window.__medsamixOverlay = {
    version: VERSION,
    info: null, // GET /info/
    box: null, // {viewportId, volumeId, i0, i1, j0, j1, k}
    boxMode: false,
    busy: false,
    last: null, // the last box prompt: {params, status, ms, range, changed}
    lastSubmit: null,
    train: null, // the last train_stats.merge seen
    polling: false,
    errors: [],
  });

  // ------------------------------------------------------------------ small helpers
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'text') e.textContent = attrs[k];
      else if (k === 'style') e.style.cssText = attrs[k];
      else e.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      e.appendChild(c);
    });
    return e;
  }

  function $(id) {
    return document.getElementById(id);
  }

  function missing() {
    // what the overlay needs from the viewer, or the first thing that is missing
    if (!window.cornerstone || !window.cornerstone.getRenderingEngines) return 'window.cornerstone';
    if (!window.cornerstoneTools) return 'window.cornerstoneTools';
    if (!window.services || !window.services.segmentationService) return 'window.services.segmentationService';
    if (!window.services.viewportGridService) return 'window.services.viewportGridService';
    return null;
  }

  function say(text, kind) {
    var m = $('medsamix-status');
    if (!m) return;
    m.textContent = text;
    m.className = 'medsamix-msg medsamix-' + (kind || 'info');
    if (kind === 'error') api.errors.push(text);
  }

  async function detailOf(resp) {
    // the server's reason: {"detail": "..."} (FastAPI) or the text
    var text = '';
    try {
      text = await resp.text();
    } catch (e) {
      return 'HTTP ' + resp.status;
    }
    try {
      var j = JSON.parse(text);
      var d = j && j.detail !== undefined ? j.detail : j;
      return 'HTTP ' + resp.status + ': ' + (typeof d === 'string' ? d : JSON.stringify(d));
    } catch (e) {
      return 'HTTP ' + resp.status + ': ' + text.slice(0, 500);
    }
  }

  function server(path) {
    return window.location.origin + path; // the server that serves this viewer
  }

  // ------------------------------------------------------------------ viewer access
  function engines() {
    try {
      return window.cornerstone.getRenderingEngines() || [];
    } catch (e) {
      return [];
    }
  }

  function viewportById(id) {
    var es = engines();
    for (var i = 0; i < es.length; i++) {
      var vp = es[i].getViewport(id);
      if (vp) return vp;
    }
    return null;
  }

  function allViewports() {
    var out = [];
    engines().forEach(function (e) {
      (e.getViewports ? e.getViewports() : []).forEach(function (v) {
        out.push(v);
      });
    });
    return out;
  }

  function viewportAt(target) {
    var vps = allViewports();
    for (var i = 0; i < vps.length; i++) {
      if (vps[i].element && vps[i].element.contains(target)) return vps[i];
    }
    return null;
  }

  function labelmapIds() {
    var ids = {};
    try {
      window.services.segmentationService.getSegmentations().forEach(function (s) {
        var v = labelmap(s.segmentationId);
        if (v) ids[v.volumeId] = 1;
      });
    } catch (e) {
      /* no segmentation yet */
    }
    return ids;
  }

  function imageVolume(vp) {
    // the viewport's image volume (not a labelmap), or null (stack viewports have none)
    if (!vp || !vp.getAllVolumeIds) return null;
    var skip = labelmapIds();
    var ids = vp.getAllVolumeIds().filter(function (id) {
      return !skip[id];
    });
    for (var i = 0; i < ids.length; i++) {
      var v = window.cornerstone.cache.getVolume(ids[i]);
      if (v && v.imageData && v.imageIds && v.imageIds.length) return v;
    }
    return null;
  }

  function seriesUID(vp, vol) {
    try {
      var st = window.services.viewportGridService.getState();
      var gv = st.viewports.get(vp.id);
      var ds = window.services.displaySetService.getDisplaySetByUID(gv.displaySetInstanceUIDs[0]);
      if (ds && ds.SeriesInstanceUID) return ds.SeriesInstanceUID;
    } catch (e) {
      /* fall back to the image metadata */
    }
    var m = window.cornerstone.metaData.get('generalSeriesModule', vol.imageIds[0]);
    return m && m.seriesInstanceUID;
  }

  function activeViewport() {
    try {
      var id = window.services.viewportGridService.getState().activeViewportId;
      return viewportById(id);
    } catch (e) {
      return null;
    }
  }

  function isAxial(vp, vol) {
    // the viewport looks along the volume's K axis (the slices the model segments)
    var n = vp.getCamera().viewPlaneNormal;
    var d = vol.direction;
    var dot = n[0] * d[6] + n[1] * d[7] + n[2] * d[8];
    return Math.abs(Math.abs(dot) - 1) < 1e-3;
  }

  function toIndex(vol, world) {
    return vol.imageData.worldToIndex(world);
  }

  function currentSlice(vp, vol) {
    return Math.round(toIndex(vol, vp.getCamera().focalPoint)[2]);
  }

  // ------------------------------------------------------------------ segmentation "1"
  function labelmap(id) {
    // the labelmap volume of segmentation ``id`` (default "1"), or null (the service throws for unknown ids)
    var svc = window.services.segmentationService;
    try {
      return svc.getSegmentation(id || SEG_ID) ? svc.getLabelmapVolume(id || SEG_ID) || null : null;
    } catch (e) {
      return null;
    }
  }

  function segmentsOf() {
    var s = window.services.segmentationService.getSegmentation(SEG_ID);
    return s ? s.segments || {} : null;
  }

  function segmentIndexOf(label) {
    var segs = segmentsOf();
    if (!segs) return null;
    var keys = Object.keys(segs);
    for (var i = 0; i < keys.length; i++) {
      var s = segs[keys[i]];
      if (s && s.label === label) return Number(s.segmentIndex || keys[i]);
    }
    return null;
  }

  function sleep(ms) {
    return new Promise(function (r) {
      setTimeout(r, ms);
    });
  }

  function infoLabels() {
    var info = api.info || {};
    var all = (info.labels || []).slice();
    Object.keys(info.models || {}).forEach(function (m) {
      var l = info.models[m].labels || [];
      (Array.isArray(l) ? l : Object.keys(l)).forEach(function (x) {
        all.push(x);
      });
    });
    return Array.from(new Set(all)).sort();
  }

  async function ensureSegmentation(label) {
    // segmentation "1" with a segment for ``label``: the MONAI Label panel makes it on connect; without it, made here
    // the same way (one segment per label of /info/, sorted, numbered from 1)
    var svc = window.services.segmentationService;
    if (!labelmap()) {
      if (!window.commandsManager) throw new Error('no segmentation and no window.commandsManager to make one');
      var labels = infoLabels();
      if (labels.indexOf(label) < 0) labels.push(label);
      var segments = {};
      labels.forEach(function (l, i) {
        segments[i + 1] = { segmentIndex: i + 1, label: l, active: i === 0, locked: false };
      });
      await window.commandsManager.runCommand('loadSegmentationsForViewport', {
        segmentations: [
          {
            segmentationId: SEG_ID,
            representation: { type: window.cornerstoneTools.Enums.SegmentationRepresentations.Labelmap },
            config: { label: 'Segmentations', segments: segments },
          },
        ],
      });
      for (var t = 0; t < 50 && !labelmap(); t++) await sleep(100);
      if (!labelmap()) throw new Error('the segmentation could not be created');
    }
    var idx = segmentIndexOf(label);
    if (idx === null) {
      var used = Object.keys(segmentsOf() || {}).map(Number);
      idx = 1;
      while (used.indexOf(idx) >= 0) idx++;
      svc.addSegment(SEG_ID, { segmentIndex: idx, label: label });
    }
    return idx;
  }

  function segmentationModified() {
    var ct = window.cornerstoneTools;
    var tse = ct.segmentation && ct.segmentation.triggerSegmentationEvents;
    if (tse && tse.triggerSegmentationDataModified) {
      tse.triggerSegmentationDataModified(SEG_ID);
    } else {
      window.cornerstone.triggerEvent(window.cornerstone.eventTarget,
        ct.Enums.Events.SEGMENTATION_DATA_MODIFIED, { segmentationId: SEG_ID });
    }
  }

  // ------------------------------------------------------------------ NRRD answers
  async function parseNrrd(buffer) {
    // {sizes, data: Uint8Array} of an NRRD with a uint8 body (raw or gzip); the header ends at the first blank line
    var bytes = new Uint8Array(buffer);
    var end = -1;
    for (var i = 0; i + 1 < bytes.length && i < 65536; i++) {
      if (bytes[i] === 10 && bytes[i + 1] === 10) {
        end = i;
        break;
      }
    }
    var magic = String.fromCharCode.apply(null, Array.from(bytes.subarray(0, 4)));
    if (magic !== 'NRRD' || end < 0) throw new Error('the answer is not an NRRD file');
    var header = {};
    new TextDecoder('latin1').decode(bytes.subarray(0, end)).split('\n').slice(1).forEach(function (line) {
      var m = /^([^:#][^:]*):=?\s*(.*)$/.exec(line);
      if (m) header[m[1].trim().toLowerCase()] = m[2].trim();
    });
    var type = (header.type || '').toLowerCase();
    if (['uint8', 'uchar', 'unsigned char', 'uint8_t'].indexOf(type) < 0) {
      throw new Error('the answer holds ' + (type || 'an unknown type') + ', not uint8');
    }
    var sizes = (header.sizes || '').split(/\s+/).map(Number);
    var data = bytes.subarray(end + 2);
    var enc = (header.encoding || 'raw').toLowerCase();
    if (enc === 'gzip' || enc === 'gz') {
      if (typeof DecompressionStream === 'undefined') throw new Error('this browser cannot inflate a gzip NRRD');
      var stream = new Blob([data]).stream().pipeThrough(new DecompressionStream('gzip'));
      data = new Uint8Array(await new Response(stream).arrayBuffer());
    } else if (enc !== 'raw') {
      throw new Error('NRRD encoding ' + enc + ' is not supported');
    }
    return { sizes: sizes, data: data };
  }

  function applyAnswer(answer, k0, k1, seg) {
    // write the answer into segmentation "1" on slices k0..k1 (as the MONAI Label panel's updateView does for its
    // prompted region): background or ``seg`` voxels become ``seg`` where the answer is non-zero, else background
    var lm = labelmap();
    var dims = lm.dimensions;
    var n = dims[0] * dims[1] * dims[2];
    var s = answer.sizes;
    if (s.length < 3 || s[0] !== dims[0] || s[1] !== dims[1] || s[2] !== dims[2] || answer.data.length !== n) {
      throw new Error('the answer has ' + s.join('x') + ' voxels, the labelmap ' + dims.join('x'));
    }
    var cur = lm.voxelManager.getCompleteScalarDataArray();
    var next = new Uint8Array(n);
    next.set(cur);
    var plane = dims[0] * dims[1];
    var changed = 0;
    var inside = 0;
    for (var k = k0; k <= k1; k++) {
      for (var p = k * plane, e = p + plane; p < e; p++) {
        var c = next[p];
        if (c === 0 || c === seg) {
          var v = answer.data[p] ? seg : 0;
          if (v !== c) changed++;
          if (v) inside++;
          next[p] = v;
        }
      }
    }
    lm.voxelManager.setCompleteScalarDataArray(next);
    segmentationModified();
    return { changed: changed, voxels: inside };
  }

  // ------------------------------------------------------------------ the box: drawing
  var svg = null;

  function ensureSvg() {
    if (svg) return svg;
    var ns = 'http://www.w3.org/2000/svg';
    svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('id', 'medsamix-box-svg');
    svg.style.cssText = 'position:fixed;left:0;top:0;pointer-events:none;z-index:1000;overflow:visible;';
    var poly = document.createElementNS(ns, 'polygon');
    poly.setAttribute('fill', 'rgba(255, 215, 0, 0.08)');
    poly.setAttribute('stroke', '#ffd700');
    poly.setAttribute('stroke-width', '2');
    svg.appendChild(poly);
    var text = document.createElementNS(ns, 'text');
    text.setAttribute('fill', '#ffd700');
    text.setAttribute('font-size', '12');
    text.setAttribute('font-family', 'sans-serif');
    svg.appendChild(text);
    document.body.appendChild(svg);
    return svg;
  }

  function drawBox() {
    var b = api.box;
    var s = ensureSvg();
    var vp = b && viewportById(b.viewportId);
    var vol = vp && window.cornerstone.cache.getVolume(b.volumeId);
    if (!vp || !vol || !vp.element.isConnected || !isAxial(vp, vol)) {
      s.style.display = 'none';
      return;
    }
    var k = currentSlice(vp, vol);
    var r = range(b, vol);
    if (k < r[0] || k > r[1]) {
      s.style.display = 'none';
      return;
    }
    var rect = vp.element.getBoundingClientRect();
    s.style.display = '';
    s.style.left = rect.left + 'px';
    s.style.top = rect.top + 'px';
    s.setAttribute('width', rect.width);
    s.setAttribute('height', rect.height);
    var corners = [
      [b.i0 - 0.5, b.j0 - 0.5], [b.i1 + 0.5, b.j0 - 0.5], [b.i1 + 0.5, b.j1 + 0.5], [b.i0 - 0.5, b.j1 + 0.5],
    ].map(function (ij) {
      return vp.worldToCanvas(vol.imageData.indexToWorld([ij[0], ij[1], k]));
    });
    s.firstChild.setAttribute('points', corners.map(function (c) {
      return c[0].toFixed(1) + ',' + c[1].toFixed(1);
    }).join(' '));
    s.firstChild.setAttribute('stroke-dasharray', k === b.k ? '' : '6 4');
    var minY = Math.min.apply(null, corners.map(function (c) { return c[1]; }));
    var minX = Math.min.apply(null, corners.map(function (c) { return c[0]; }));
    s.lastChild.setAttribute('x', minX.toFixed(1));
    s.lastChild.setAttribute('y', (minY - 4).toFixed(1));
    s.lastChild.textContent = threeD() ? 'box, 3D: slices ' + r[0] + '-' + r[1] : 'box, slice ' + b.k;
  }

  function threeD() {
    var c = $('medsamix-3d');
    return !!(c && c.checked);
  }

  function halfRange() {
    var v = parseInt(($('medsamix-range') || {}).value, 10);
    return isFinite(v) && v >= 0 ? Math.min(v, 1000) : 0;
  }

  function range(b, vol) {
    // the slices the prompt covers: k (2D) or k - n .. k + n clipped to the volume (3D)
    if (!threeD()) return [b.k, b.k];
    var n = halfRange();
    return [Math.max(0, b.k - n), Math.min(vol.dimensions[2] - 1, b.k + n)];
  }

  // ------------------------------------------------------------------ the box: mouse
  var drag = null;

  function canvasXY(vp, ev) {
    var r = vp.element.getBoundingClientRect();
    return [ev.clientX - r.left, ev.clientY - r.top];
  }

  function boxFrom(vp, vol, a, b) {
    var p = toIndex(vol, vp.canvasToWorld(a));
    var q = toIndex(vol, vp.canvasToWorld(b));
    var d = vol.dimensions;
    var clamp = function (x, hi) {
      return Math.max(0, Math.min(hi - 1, Math.round(x)));
    };
    return {
      viewportId: vp.id, volumeId: vol.volumeId,
      i0: clamp(Math.min(p[0], q[0]), d[0]), i1: clamp(Math.max(p[0], q[0]), d[0]),
      j0: clamp(Math.min(p[1], q[1]), d[1]), j1: clamp(Math.max(p[1], q[1]), d[1]),
      k: clamp((p[2] + q[2]) / 2, d[2]),
    };
  }

  function onDown(ev) {
    if (!api.boxMode || ev.button !== 0 || (ev.target.closest && ev.target.closest('#medsamix-panel'))) return;
    var vp = viewportAt(ev.target);
    if (!vp) return;
    ev.preventDefault();
    ev.stopImmediatePropagation();
    if (ev.type !== 'pointerdown' || drag) return;
    var vol = imageVolume(vp);
    if (!vol) {
      say('this viewport shows no volume; use an MPR (axial) viewport', 'error');
      return;
    }
    if (!isAxial(vp, vol)) {
      say('draw the box on the axial viewport (the slices along the volume\'s K axis)', 'error');
      return;
    }
    drag = { vp: vp, vol: vol, a: canvasXY(vp, ev) };
  }

  function onMove(ev) {
    if (!drag) return;
    ev.preventDefault();
    ev.stopImmediatePropagation();
    if (ev.type !== 'pointermove') return;
    api.box = boxFrom(drag.vp, drag.vol, drag.a, canvasXY(drag.vp, ev));
    drawBox();
  }

  function onUp(ev) {
    if (!drag) {
      if (api.boxMode && ev.button === 0 && viewportAt(ev.target) &&
          !(ev.target.closest && ev.target.closest('#medsamix-panel'))) {
        ev.preventDefault();
        ev.stopImmediatePropagation();
      }
      return;
    }
    ev.preventDefault();
    ev.stopImmediatePropagation();
    if (ev.type !== 'pointerup') return;
    var b = boxFrom(drag.vp, drag.vol, drag.a, canvasXY(drag.vp, ev));
    drag = null;
    if (b.i1 - b.i0 < 1 || b.j1 - b.j0 < 1) {
      say('the box is empty: drag a rectangle around the structure', 'error');
      return;
    }
    api.box = b;
    drawBox();
    say('box on slice ' + b.k + ': I ' + b.i0 + '-' + b.i1 + ', J ' + b.j0 + '-' + b.j1 + '. Press Run.', 'info');
    updateButtons();
  }

  ['pointerdown', 'mousedown', 'touchstart'].forEach(function (t) {
    window.addEventListener(t, onDown, true);
  });
  ['pointermove', 'mousemove'].forEach(function (t) {
    window.addEventListener(t, onMove, true);
  });
  ['pointerup', 'mouseup', 'click'].forEach(function (t) {
    window.addEventListener(t, onUp, true);
  });

  // ------------------------------------------------------------------ actions
  function chosen(id) {
    var s = $(id);
    return s && s.value ? s.value : null;
  }

  async function runBox() {
    var why = missing();
    if (why) return say('the viewer does not expose ' + why + '; box prompts are unavailable', 'error');
    var b = api.box;
    var vp = b && viewportById(b.viewportId);
    var vol = vp && window.cornerstone.cache.getVolume(b.volumeId);
    if (!b || !vp || !vol) return say('draw a box first (Box, then drag on the axial view)', 'error');
    var model = chosen('medsamix-model');
    var label = chosen('medsamix-label');
    if (!model || !label) return say('connect first: no model / label (press the refresh button)', 'error');
    var series = seriesUID(vp, vol);
    if (!series) return say('the series of this viewport is unknown', 'error');
    var r = range(b, vol);
    var params = {
      roi: [b.i0, b.i1, b.j0, b.j1, r[0], r[1]], mode: threeD() ? '3d' : '2d', slice: b.k,
      result_extension: '.nrrd', result_dtype: 'uint8', result_compress: false,
    };
    api.busy = true;
    updateButtons();
    var t0 = Date.now();
    say('running ' + model + ' (' + params.mode.toUpperCase() + ', slices ' + r[0] + '-' + r[1] + ') ...', 'info');
    try {
      var seg = await ensureSegmentation(label);
      var form = new FormData();
      form.append('params', JSON.stringify(params));
      var url = server('/infer/' + encodeURIComponent(model) + '?image=' + encodeURIComponent(series) +
        '&output=image');
      var resp = await fetch(url, { method: 'POST', body: form, credentials: 'same-origin' });
      if (!resp.ok) throw new Error(await detailOf(resp));
      var answer = await parseNrrd(await resp.arrayBuffer());
      var got = applyAnswer(answer, r[0], r[1], seg);
      api.last = { params: params, series: series, status: resp.status, ms: Date.now() - t0, range: r,
                   segment: seg, changed: got.changed, voxels: got.voxels };
      say(label + ': ' + got.voxels + ' voxels on slices ' + r[0] + '-' + r[1] + ' (' +
        ((Date.now() - t0) / 1000).toFixed(1) + ' s)', got.voxels ? 'ok' : 'warn');
    } catch (e) {
      api.last = { params: params, error: String(e.message || e) };
      say('box prompt failed: ' + (e.message || e), 'error');
    } finally {
      api.busy = false;
      updateButtons();
      drawBox();
    }
  }

  async function submitLabel() {
    var why = missing();
    if (why) return say('the viewer does not expose ' + why + '; cannot read the labelmap', 'error');
    var vp = activeViewport();
    var vol = imageVolume(vp) || (api.box && window.cornerstone.cache.getVolume(api.box.volumeId));
    if (!vp || !vol) return say('open a study in a volume (MPR) viewport first', 'error');
    var series = seriesUID(vp, vol);
    var lm = labelmap();
    if (!lm) return say('no labelmap to submit: segment something first', 'error');
    var data = lm.voxelManager.getCompleteScalarDataArray();
    var bytes = data instanceof Uint8Array ? data : Uint8Array.from(data);
    var seen = new Uint8Array(256);
    for (var i = 0; i < bytes.length; i++) seen[bytes[i]] = 1;
    var segs = segmentsOf() || {};
    var info = [];
    for (var v = 1; v < 256; v++) {
      if (!seen[v]) continue;
      var s = segs[v];
      info.push({ name: s && s.label ? s.label : 'label_' + v, idx: v });
    }
    if (!info.length) return say('the labelmap is empty: nothing to submit', 'error');
    var form = new FormData();
    form.append('params', JSON.stringify({ label_info: info }));
    form.append('label', new Blob([bytes], { type: 'application/octet-stream' }), 'label.bin');
    api.busy = true;
    updateButtons();
    say('submitting ' + info.map(function (x) { return x.name; }).join(', ') + ' ...', 'info');
    try {
      var resp = await fetch(server('/datastore/label?image=' + encodeURIComponent(series) + '&tag=final'),
        { method: 'PUT', body: form, credentials: 'same-origin' });
      if (!resp.ok) throw new Error(await detailOf(resp));
      var res = await resp.json();
      api.lastSubmit = { series: series, label_info: info, result: res };
      say('label submitted (' + info.map(function (x) { return x.name; }).join(', ') + '); stored as ' +
        (res.label || '?'), 'ok');
    } catch (e) {
      api.lastSubmit = { series: series, label_info: info, error: String(e.message || e) };
      say('submit failed: ' + (e.message || e), 'error');
    } finally {
      api.busy = false;
      updateButtons();
    }
  }

  async function readInfo() {
    var resp = await fetch(server('/info/'), { credentials: 'same-origin' });
    if (!resp.ok) throw new Error(await detailOf(resp));
    api.info = await resp.json();
    return api.info;
  }

  function fillSelect(id, values, keep) {
    var s = $(id);
    var old = keep !== undefined ? keep : s.value;
    s.innerHTML = '';
    values.forEach(function (v) {
      s.appendChild(el('option', { value: v, text: v }));
    });
    if (values.indexOf(old) >= 0) s.value = old;
  }

  function modelLabels(model) {
    var m = (api.info && api.info.models && api.info.models[model]) || {};
    var l = m.labels || [];
    return Array.isArray(l) ? l.slice() : Object.keys(l);
  }

  async function connect() {
    try {
      var info = await readInfo();
      var models = Object.keys(info.models || {});
      fillSelect('medsamix-model', models);
      fillSelect('medsamix-label', modelLabels(chosen('medsamix-model')));
      showTrain(info);
      if (runActive(info)) startPolling();
      var why = missing();
      say(why ? 'connected, but the viewer does not expose ' + why : 'connected: ' + models.length + ' models', why ? 'error' : 'ok');
    } catch (e) {
      say('cannot read /info/: ' + (e.message || e), 'error');
    }
    updateButtons();
  }

  // ------------------------------------------------------------------ training
  function mergeStats(info) {
    var ts = (info && info.train_stats) || {};
    return ts.merge || ts[Object.keys(ts)[0]] || null;
  }

  function startOf(st) {
    return st && st.start_ts !== undefined && st.start_ts !== null ? st.start_ts : null;
  }

  function runActive(info) {
    var tr = info && info.server && info.server.training;
    var st = mergeStats(info);
    return !!((tr && tr.running) || (st && ACTIVE[st.status]));
  }

  function showTrain(info) {
    var line = $('medsamix-train-status');
    if (!line) return;
    var st = mergeStats(info);
    api.train = st;
    var tr = (info && info.server && info.server.training) || {};
    if (!st) {
      line.textContent = 'no train task';
      line.className = 'medsamix-msg medsamix-info';
      return;
    }
    var status = st.status || (tr.running ? 'running' : 'idle');
    if (tr.running && !ACTIVE[status] && api.trainPrev !== undefined && startOf(st) === api.trainPrev) {
      // the worker has started but not written this run's progress yet (the entry is still the last run's)
      trainLine('starting: waiting for the train worker\'s first progress', 'info', 'starting');
      return;
    }
    var text = status + ': trial ' + (st.epoch || 0) + '/' + (st.total_epochs || 0) +
      ', best calibration Dice ' + Number(st.best_metric || 0).toFixed(3);
    var kind = 'info';
    if (status === 'failed') {
      text = 'failed: ' + (st.message || 'no reason given');
      kind = 'error';
    } else if (status === 'idle') {
      text = 'idle: ' + (st.message || 'no run yet') + ' (trials ' + (st.total_epochs || 0) + ')';
    } else if (status === 'done' || status === 'stopped') {
      text += (st.message ? ' - ' + st.message : '');
      kind = status === 'done' ? 'ok' : 'warn';
    } else if (st.message) {
      text += ' - ' + st.message;
    }
    line.textContent = text;
    line.className = 'medsamix-msg medsamix-' + kind;
    line.setAttribute('data-status', status);
  }

  var pollTimer = null;
  var pollUntil = 0;

  function startPolling(graceMs) {
    pollUntil = Math.max(pollUntil, Date.now() + (graceMs || 0));
    if (api.polling) return;
    api.polling = true;
    var tick = async function () {
      var info = null;
      try {
        info = await readInfo();
        showTrain(info);
      } catch (e) {
        var line = $('medsamix-train-status');
        if (line) line.textContent = 'cannot read the training progress: ' + (e.message || e);
      }
      if (info && !runActive(info) && Date.now() > pollUntil) {
        api.polling = false;
        pollTimer = null;
        updateButtons();
        return;
      }
      pollTimer = setTimeout(tick, POLL_MS);
    };
    tick();
    updateButtons();
  }

  function trainLine(text, kind, status) {
    var line = $('medsamix-train-status');
    if (!line) return;
    line.textContent = text;
    line.className = 'medsamix-msg medsamix-' + kind;
    line.setAttribute('data-status', status);
  }

  async function trainStart() {
    say('starting the merge training ...', 'info');
    trainLine('starting: POST /train/merge', 'info', 'starting');
    api.trainPrev = startOf(mergeStats(api.info)); // this run's progress is the entry with another start time
    try {
      var resp = await fetch(server('/train/merge'), {
        method: 'POST', body: '{}', headers: { 'Content-Type': 'application/json' }, credentials: 'same-origin',
      });
      if (!resp.ok) throw new Error(await detailOf(resp));
      say('merge training started', 'ok');
      startPolling(6000); // the worker writes its first progress a moment later
    } catch (e) {
      say('train merge failed: ' + (e.message || e), 'error');
      showTrain(api.info);
    }
  }

  async function trainStop() {
    try {
      var resp = await fetch(server('/train/'), { method: 'DELETE', credentials: 'same-origin' });
      if (!resp.ok) throw new Error(await detailOf(resp));
      say('training stopped', 'warn');
      startPolling(2000);
    } catch (e) {
      say('stop failed: ' + (e.message || e), 'error');
    }
  }

  // ------------------------------------------------------------------ the panel
  var CSS = [
    '#medsamix-panel{position:fixed;left:8px;bottom:8px;width:252px;z-index:1001;background:#090c29;',
    'border:1px solid #3a3f99;border-radius:6px;color:#d6e3ff;font:12px/1.35 Inter,Arial,sans-serif;',
    'box-shadow:0 2px 10px rgba(0,0,0,.6)}',
    '#medsamix-panel .msx-head{display:flex;align-items:center;justify-content:space-between;padding:4px 8px;',
    'background:#1d205a;border-radius:6px 6px 0 0;cursor:pointer;font-weight:600;color:#5acce6}',
    '#medsamix-panel .msx-body{padding:6px 8px;display:flex;flex-direction:column;gap:5px}',
    '#medsamix-panel.collapsed .msx-body{display:none}',
    '#medsamix-panel .msx-row{display:flex;align-items:center;gap:5px;flex-wrap:wrap;margin:0;padding:0;border:0;height:auto;min-height:0}',
    '#medsamix-panel select,#medsamix-panel input[type=number]{background:#151a3f;color:#d6e3ff;',
    'border:1px solid #3a3f99;border-radius:3px;font-size:12px;padding:1px 3px}',
    '#medsamix-panel select{flex:1;min-width:0}',
    '#medsamix-panel input[type=number]{width:42px}',
    '#medsamix-panel button{background:#1d205a;color:#d6e3ff;border:1px solid #3a3f99;border-radius:3px;',
    'padding:2px 7px;font-size:12px;cursor:pointer}',
    '#medsamix-panel button:hover{background:#2b3080}',
    '#medsamix-panel button:disabled{opacity:.45;cursor:default}',
    '#medsamix-panel button[aria-pressed=true]{background:#ffd700;color:#090c29;border-color:#ffd700}',
    '#medsamix-panel .msx-sec{border-top:1px solid #262a66;padding-top:5px}',
    '#medsamix-panel .medsamix-msg{word-break:break-word;white-space:pre-wrap}',
    '#medsamix-panel .medsamix-error{color:#ff6b6b}',
    '#medsamix-panel .medsamix-ok{color:#7ee787}',
    '#medsamix-panel .medsamix-warn{color:#f0c36d}',
    '#medsamix-panel .medsamix-info{color:#a9b4d6}',
    'body.medsamix-box-mode .viewport-element,body.medsamix-box-mode canvas{cursor:crosshair!important}',
  ].join('');

  function button(id, text, title, onclick) {
    var b = el('button', { id: id, type: 'button', text: text, title: title });
    b.addEventListener('click', function (e) {
      e.preventDefault();
      onclick();
    });
    return b;
  }

  function setBoxMode(on) {
    api.boxMode = !!on;
    var b = $('medsamix-box');
    if (b) b.setAttribute('aria-pressed', api.boxMode ? 'true' : 'false');
    document.body.classList.toggle('medsamix-box-mode', api.boxMode);
    if (api.boxMode) say('Box: drag a rectangle on the axial view', 'info');
  }

  function updateButtons() {
    var set = function (id, off) {
      var b = $(id);
      if (b) b.disabled = !!off;
    };
    var connected = !!api.info;
    set('medsamix-run', api.busy || !api.box || !connected);
    set('medsamix-submit', api.busy || !connected);
    set('medsamix-train', !connected || api.polling);
    set('medsamix-stop', !connected || !api.polling);
  }

  function buildPanel() {
    if ($('medsamix-panel')) return;
    document.head.appendChild(el('style', { id: 'medsamix-style', text: CSS }));
    var rangeInput = el('input', { id: 'medsamix-range', type: 'number', min: '0', max: '200', value: '2',
                                   title: 'slices above and below the box\'s slice' });
    var three = el('input', { id: 'medsamix-3d', type: 'checkbox', title: 'propagate the box over the slices' });
    var header = el('div', { class: 'msx-head' }, [el('span', { text: 'MedSAMix' }),
      el('span', { id: 'medsamix-version', text: 'v' + VERSION + ' \u25be', title: 'collapse / expand' })]);
    var panel = el('div', { id: 'medsamix-panel' }, [
      header,
      el('div', { class: 'msx-body' }, [
        el('div', { class: 'msx-row' }, [el('span', { text: 'Model' }),
          el('select', { id: 'medsamix-model', title: 'infer model (GET /info/)' }),
          button('medsamix-refresh', '\u21bb', 'reconnect: read /info/ again', connect)]),
        el('div', { class: 'msx-row' }, [el('span', { text: 'Label' }),
          el('select', { id: 'medsamix-label', title: 'the label the box segments' })]),
        el('div', { class: 'msx-row msx-sec' }, [
          button('medsamix-box', 'Box', 'drag a rectangle on the axial view', function () { setBoxMode(!api.boxMode); }),
          button('medsamix-run', 'Run', 'segment the box', runBox),
          button('medsamix-clear', 'Clear', 'remove the box', function () {
            api.box = null;
            drawBox();
            updateButtons();
          }),
        ]),
        el('div', { class: 'msx-row' }, [el('label', { for: 'medsamix-3d' }, [three, document.createTextNode(' 3D: \u00b1')]),
          rangeInput, el('span', { text: 'slices' })]),
        el('div', { class: 'msx-row msx-sec' }, [button('medsamix-submit', 'Submit label',
          'store the labelmap as this series\' final label (DICOM SEG in the PACS)', submitLabel)]),
        el('div', { class: 'msx-row msx-sec' }, [
          button('medsamix-train', 'Train merge', 'POST /train/merge: search a merged model on the labelled studies',
            trainStart),
          button('medsamix-stop', 'Stop', 'DELETE /train/', trainStop),
        ]),
        el('div', { id: 'medsamix-train-status', class: 'medsamix-msg medsamix-info', text: 'training: not read yet' }),
        el('div', { id: 'medsamix-status', class: 'medsamix-msg medsamix-info', text: '' }),
      ]),
    ]);
    header.addEventListener('click', function () {
      panel.classList.toggle('collapsed');
    });
    document.body.appendChild(panel);
    $('medsamix-model').addEventListener('change', function () {
      fillSelect('medsamix-label', modelLabels(chosen('medsamix-model')));
    });
    [three, rangeInput].forEach(function (x) {
      x.addEventListener('change', drawBox);
      x.addEventListener('input', drawBox);
    });
    updateButtons();
    var why = missing();
    if (why) say('the viewer does not expose ' + why + '; the MedSAMix tools are unavailable', 'error');
    connect();
  }

  // ------------------------------------------------------------------ start
  var renderHooked = {};

  function hookViewports() {
    // redraw the box when a viewport renders (scroll, zoom, pan, resize)
    var evt = window.cornerstone && window.cornerstone.Enums && window.cornerstone.Enums.Events.IMAGE_RENDERED;
    allViewports().forEach(function (vp) {
      if (!evt || !vp.element || renderHooked[vp.id] === vp.element) return;
      renderHooked[vp.id] = vp.element;
      vp.element.addEventListener(evt, function () {
        if (api.box) drawBox();
      });
    });
  }

  function tick() {
    // the panel shows while a study is open (a cornerstone viewport exists); hidden on the study list
    try {
      var open = !!(window.cornerstone && allViewports().length);
      var p = $('medsamix-panel');
      if (open && !p) buildPanel();
      else if (p) p.style.display = open ? '' : 'none';
      if (open) hookViewports();
      if (svg && !open) svg.style.display = 'none';
    } catch (e) {
      api.errors.push('overlay: ' + (e.message || e));
    }
  }

  setInterval(tick, 1000);
  window.addEventListener('resize', function () {
    if (api.box) drawBox();
  });
})();
