/*
 * The status page of one sequencer node. It polls the serving node's JSON API about once a
 * second (GET /v1/cluster, /v1/stats, /v1/groups, same origin) and draws what it answers:
 * plain JavaScript, no dependencies, nothing fetched from anywhere else (works offline).
 *
 * Hooks that tests rely on -- keep them stable (server/tests/page.rs reads them):
 *
 *   body                  data-updated = how many refreshes succeeded so far ("0" at first);
 *                         data-failed  = how many failed (a fetch failed, a 503, bad JSON).
 *   #primary              text: the primary's node id, or "none";
 *                         data-primary = that id as a number, "0" while no primary is known.
 *   #nodes-body > tr      one row per node: <tr data-node-id="N" data-reachable="true|false">.
 *   #ids-rate             data-rate = the latest ids/s (a float, "0" at first); text "1234 ids/s".
 *   #msgs-rate            data-rate = the latest messages/s, likewise; text "12 msgs/s".
 *
 * Informative, not relied on: #lat-p50, #lat-p90, #lat-p99 carry data-seconds (empty when no
 * id request was served in the last interval, and the text is then "—"); #banner is hidden
 * unless the last refresh failed.
 *
 * Rates are counter differences between successive polls divided by the real time between
 * the two answers. Latency quantiles are computed from the differences of the cumulative
 * histogram's buckets over the same interval, as PromQL's histogram_quantile does (linear
 * interpolation inside a bucket; a rank that falls in +Inf gives the highest finite bound).
 */
"use strict";

(function () {
  const POLL_MS = 1000;
  const WINDOW_MS = 60 * 1000;
  const FETCH_TIMEOUT_MS = 3000;
  // Points further apart than this are not joined by a line (polls that failed in between).
  const GAP_MS = 2.5 * POLL_MS;

  const $ = (id) => document.getElementById(id);
  const body = document.body;

  // {t, v} points of the last minute (v null: nothing to show at t).
  const series = { ids: [], msgs: [], p50: [], p90: [], p99: [] };
  // The previous stats answer: {t, ids, msgs, hist}.
  let prev = null;
  let updated = 0;
  let failed = 0;

  // ---------------------------------------------------------------- fetching

  async function getJson(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      let resp;
      try {
        resp = await fetch(path, {
          cache: "no-store",
          signal: ctl.signal,
          headers: { accept: "application/json" },
        });
      } catch (e) {
        throw new Error(
          e.name === "AbortError" ? `${path}: no answer within ${FETCH_TIMEOUT_MS / 1000} s` : `${path}: unreachable`
        );
      }
      if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
      const json = await resp.json();
      return { json, t: performance.now() };
    } finally {
      clearTimeout(timer);
    }
  }

  async function refresh() {
    const paths = ["/v1/cluster", "/v1/stats", "/v1/groups"];
    const renders = [renderCluster, renderStats, renderGroups];
    const answers = await Promise.allSettled(paths.map(getJson));
    const errors = [];
    answers.forEach((a, i) => {
      if (a.status === "rejected") {
        errors.push(a.reason && a.reason.message ? a.reason.message : String(a.reason));
        return;
      }
      try {
        renders[i](a.value.json, a.value.t);
      } catch (e) {
        console.error(e);
        errors.push(`${paths[i]}: unexpected answer (${e.message})`);
      }
    });
    if (answers[1].status === "rejected") {
      // A hole in the charts where this node did not answer.
      const t = performance.now();
      for (const k of Object.keys(series)) series[k].push({ t, v: null });
    }
    if (errors.length === 0) {
      updated += 1;
      body.dataset.updated = String(updated);
      $("updated-at").textContent = new Date().toLocaleTimeString("en-GB");
      $("banner").hidden = true;
      body.classList.remove("stale");
    } else {
      failed += 1;
      body.dataset.failed = String(failed);
      $("banner-detail").textContent = "(" + errors.join("; ") + ")";
      $("banner").hidden = false;
      body.classList.add("stale");
    }
    drawCharts();
  }

  function loop() {
    const started = performance.now();
    refresh()
      .catch((e) => console.error(e))
      .finally(() => {
        const spent = performance.now() - started;
        setTimeout(loop, Math.max(0, POLL_MS - spent));
      });
  }

  // ---------------------------------------------------------------- formatting

  const group = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));

  function fmtRate(r) {
    if (!(r > 0)) return "0";
    if (r >= 10) return String(Math.round(r));
    return r.toFixed(1);
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    if (s < 1e-3) return `${(s * 1e6).toFixed(s < 1e-5 ? 1 : 0)} µs`;
    if (s < 1) return `${(s * 1e3).toFixed(s < 1e-2 ? 2 : 1)} ms`;
    return `${s.toFixed(2)} s`;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function badge(text, kind) {
    return el("span", `badge ${kind || ""}`.trim(), text);
  }

  // ---------------------------------------------------------------- cluster

  function renderCluster(c) {
    const self = Number(c.node_id);
    const primary = Number(c.primary) || 0;
    $("node-id").textContent = String(self);
    $("seen-by").textContent = String(self);
    const role = $("node-role");
    const selfPrimary = primary !== 0 && primary === self;
    role.textContent = selfPrimary ? "primary" : c.role || "?";
    role.className = `badge ${selfPrimary ? "primary" : roleKind(c.role)}`;

    const p = $("primary");
    p.dataset.primary = String(primary);
    p.textContent = primary ? String(primary) : "none";
    p.classList.toggle("none", !primary);

    $("term").textContent = group(c.term);
    $("commit").textContent = group(c.commit_index);
    $("applied").textContent = group(c.applied_index);

    const tbody = $("nodes-body");
    const rows = [];
    const nodes = Array.isArray(c.nodes) ? c.nodes.slice() : [];
    nodes.sort((a, b) => a.id - b.id);
    for (const n of nodes) {
      const tr = el("tr");
      const reachable = !!n.reachable;
      tr.dataset.nodeId = String(n.id);
      tr.dataset.reachable = String(reachable);
      if (!reachable) tr.classList.add("unreachable");
      if (n.primary) tr.classList.add("is-primary");
      if (n.id === self) tr.classList.add("self");

      const id = el("td", "num r");
      id.append(el("span", "", String(n.id)));
      tr.append(id);

      const addr = el("td", "num");
      addr.append(el("span", "", n.addr || "—"));
      if (n.id === self) addr.append(" ", badge("this node", "self"));
      tr.append(addr);
      tr.append(el("td", "num muted", n.peer_addr || "—"));

      const roleCell = el("td");
      if (n.primary) roleCell.append(badge("primary", "primary"));
      else roleCell.append(badge(n.role || "?", roleKind(n.role)));
      tr.append(roleCell);

      tr.append(el("td", "num r", group(n.term)));
      tr.append(el("td", "num r", group(n.commit_index)));
      tr.append(el("td", "num r", group(n.applied_index)));
      const lag = el("td", `num r ${lagKind(n.lag)}`, group(n.lag));
      tr.append(lag);

      const reach = el("td");
      reach.append(reachable ? badge("reachable", "ok") : badge("unreachable", "bad"));
      tr.append(reach);
      rows.push(tr);
    }
    if (rows.length === 0) {
      const tr = el("tr", "empty");
      const td = el("td", "", "this node lists no members");
      td.colSpan = 9;
      tr.append(td);
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  function roleKind(role) {
    switch (role) {
      case "leader":
        return "primary";
      case "voter":
      case "follower":
        return "voter";
      case "learner":
        return "learner";
      case "candidate":
        return "warn";
      default:
        return "muted";
    }
  }

  function lagKind(lag) {
    if (lag === null || lag === undefined) return "muted";
    if (lag === 0) return "good";
    if (lag > 1000) return "bad-text";
    return "warn-text";
  }

  // ---------------------------------------------------------------- stats

  function renderStats(s, t) {
    const hist = s.id_latency_seconds || null;
    $("ids-total").textContent = group(s.ids_total);
    $("msgs-total").textContent = group(s.messages_total);
    if (prev && t > prev.t) {
      const dt = (t - prev.t) / 1000;
      const ids = counterRate(s.ids_total, prev.ids, dt);
      const msgs = counterRate(s.messages_total, prev.msgs, dt);
      showRate("ids-rate", ids, "ids/s");
      showRate("msgs-rate", msgs, "msgs/s");
      series.ids.push({ t, v: ids });
      series.msgs.push({ t, v: msgs });

      const qs = quantiles(hist, prev.hist, [0.5, 0.9, 0.99]);
      showQuantile("lat-p50", qs[0]);
      showQuantile("lat-p90", qs[1]);
      showQuantile("lat-p99", qs[2]);
      series.p50.push({ t, v: qs[0] });
      series.p90.push({ t, v: qs[1] });
      series.p99.push({ t, v: qs[2] });
      const n = hist && prev.hist ? hist.count - prev.hist.count : null;
      $("lat-count").textContent = n === null || n < 0 ? "—" : group(n);
    }
    prev = { t, ids: s.ids_total, msgs: s.messages_total, hist };
  }

  // The per-second rate of a cumulative counter; null when it went back (the node restarted).
  function counterRate(cur, old, dt) {
    if (typeof cur !== "number" || typeof old !== "number" || !(dt > 0)) return null;
    if (cur < old) return null;
    return (cur - old) / dt;
  }

  function showRate(id, rate, unit) {
    const e = $(id);
    const r = rate === null ? 0 : rate;
    e.dataset.rate = String(r);
    e.textContent = `${fmtRate(r)} ${unit}`;
  }

  function showQuantile(id, v) {
    const e = $(id);
    e.dataset.seconds = v === null ? "" : String(v);
    e.textContent = fmtSeconds(v);
  }

  // Quantiles `phis` of the observations between histogram snapshots `old` and `cur`, each
  // null when there were none. Buckets are cumulative with ascending `le`; observations past
  // the last bucket are in +Inf (count minus the last bucket's count).
  function quantiles(cur, old, phis) {
    const none = phis.map(() => null);
    if (!cur || !old || !Array.isArray(cur.buckets) || !Array.isArray(old.buckets)) return none;
    const total = cur.count - old.count;
    if (!(total > 0)) return none;
    const before = new Map(old.buckets.map((b) => [Number(b.le), b.count]));
    const buckets = cur.buckets
      .map((b) => ({ le: Number(b.le), count: b.count - (before.get(Number(b.le)) || 0) }))
      .sort((a, b) => a.le - b.le);
    if (buckets.some((b) => b.count < 0)) return none; // a reset
    buckets.push({ le: Infinity, count: total });
    return phis.map((phi) => histogramQuantile(phi, buckets, total));
  }

  function histogramQuantile(phi, buckets, total) {
    const rank = phi * total;
    let i = buckets.findIndex((b) => b.count >= rank);
    if (i < 0) i = buckets.length - 1;
    if (i === buckets.length - 1) {
      // In +Inf: the highest finite bound is all that is known.
      return buckets.length >= 2 ? buckets[buckets.length - 2].le : null;
    }
    const upper = buckets[i].le;
    if (i === 0 && upper <= 0) return upper;
    const lower = i === 0 ? 0 : buckets[i - 1].le;
    const below = i === 0 ? 0 : buckets[i - 1].count;
    const inside = buckets[i].count - below;
    if (inside <= 0) return upper;
    return lower + ((upper - lower) * (rank - below)) / inside;
  }

  // ---------------------------------------------------------------- groups

  function renderGroups(g) {
    const groups = Array.isArray(g.groups) ? g.groups.slice() : [];
    groups.sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const rows = groups.map((x) => {
      const tr = el("tr");
      tr.dataset.group = String(x.name);
      tr.append(el("td", "num", String(x.name)));
      tr.append(el("td", "num r", group(x.members)));
      tr.append(el("td", "num r", group(x.next_seq)));
      return tr;
    });
    if (rows.length === 0) {
      const tr = el("tr", "empty");
      const td = el("td", "", "no groups yet");
      td.colSpan = 3;
      tr.append(td);
      rows.push(tr);
    }
    $("groups-body").replaceChildren(...rows);
    $("groups-hint").textContent = groups.length === 1 ? "1 group" : `${groups.length} groups`;
  }

  // ---------------------------------------------------------------- charts

  function cssVar(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  function drawCharts() {
    const now = performance.now();
    for (const k of Object.keys(series)) {
      const s = series[k];
      while (s.length && s[0].t < now - WINDOW_MS - 2 * POLL_MS) s.shift();
    }
    const accent = cssVar("--accent", "#4c8dff");
    const accent2 = cssVar("--accent-2", "#3fb950");
    const warm = cssVar("--warm", "#e3a13b");
    const hot = cssVar("--hot", "#f0616d");
    drawChart($("ids-chart"), now, [{ points: series.ids, color: accent, fill: true }], {
      min: 1,
      format: (v) => fmtRate(v) + "/s",
    });
    drawChart($("msgs-chart"), now, [{ points: series.msgs, color: accent2, fill: true }], {
      min: 1,
      format: (v) => fmtRate(v) + "/s",
    });
    drawChart(
      $("lat-chart"),
      now,
      [
        { points: series.p99, color: hot, fill: false },
        { points: series.p90, color: warm, fill: false, thin: true },
        { points: series.p50, color: accent, fill: true },
      ],
      // Log scale: one slow request must not flatten the rest of the minute.
      { min: 1e-4, format: fmtSeconds, log: true }
    );
  }

  // A round bound at or above v (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten).
  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v * 0.999999) return m * p;
    return 10 * p;
  }

  function drawChart(canvas, now, lines, opts) {
    if (!canvas || !canvas.getContext) return;
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 300;
    const h = canvas.clientHeight || 80;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const top = 16;
    const bottom = h - 3;
    const start = now - WINDOW_MS;
    let max = 0;
    let min = Infinity;
    for (const l of lines) {
      for (const p of l.points) {
        if (p.v === null || p.t < start) continue;
        if (p.v > max) max = p.v;
        if (p.v > 0 && p.v < min) min = p.v;
      }
    }
    const x = (t) => ((t - start) / WINDOW_MS) * (w - 4);
    let y;
    let yMax;
    let yMin = 0;
    let grid;
    if (opts.log) {
      // Whole decades, from the lowest value seen to the highest.
      const hiExp = Math.ceil(Math.log10(Math.max(max, opts.min)) + 1e-9);
      const loExp = Math.min(hiExp - 1, Math.floor(Math.log10(isFinite(min) ? min : opts.min / 10)));
      yMax = Math.pow(10, hiExp);
      yMin = Math.pow(10, loExp);
      const span = hiExp - loExp;
      y = (v) => bottom - ((Math.log10(Math.max(v, yMin)) - loExp) / span) * (bottom - top);
      grid = [];
      for (let e = loExp + 1; e <= hiExp; e++) grid.push(Math.pow(10, e));
    } else {
      yMax = niceCeil(Math.max(max * 1.08, opts.min));
      y = (v) => bottom - (v / yMax) * (bottom - top);
      grid = [yMax, yMax / 2];
    }

    // Grid: the top bound, the middle (or each decade) and the base line.
    ctx.strokeStyle = cssVar("--grid", "rgba(255,255,255,0.07)");
    ctx.lineWidth = 1;
    ctx.setLineDash([2, 3]);
    for (const v of grid) {
      ctx.beginPath();
      ctx.moveTo(0, Math.round(y(v)) + 0.5);
      ctx.lineTo(w, Math.round(y(v)) + 0.5);
      ctx.stroke();
    }
    ctx.setLineDash([]);
    ctx.beginPath();
    ctx.moveTo(0, Math.round(bottom) + 0.5);
    ctx.lineTo(w, Math.round(bottom) + 0.5);
    ctx.stroke();

    const mono = cssVar("--mono", "monospace");
    ctx.font = `10px ${mono}`;
    ctx.fillStyle = cssVar("--muted", "#8b93a1");
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(opts.format(yMax), 2, top - 4);
    if (opts.log) ctx.fillText(opts.format(yMin), 2, bottom - 3);

    for (const l of lines) {
      // Runs of consecutive points with values, split at holes.
      const runs = [];
      let run = [];
      let last = null;
      for (const p of l.points) {
        if (p.v === null || (last && p.t - last.t > GAP_MS)) {
          if (run.length) runs.push(run);
          run = [];
        }
        if (p.v !== null) run.push(p);
        last = p;
      }
      if (run.length) runs.push(run);

      for (const r of runs) {
        if (l.fill && r.length > 1) {
          ctx.beginPath();
          ctx.moveTo(x(r[0].t), bottom);
          for (const p of r) ctx.lineTo(x(p.t), y(p.v));
          ctx.lineTo(x(r[r.length - 1].t), bottom);
          ctx.closePath();
          ctx.globalAlpha = 0.16;
          ctx.fillStyle = l.color;
          ctx.fill();
          ctx.globalAlpha = 1;
        }
        ctx.beginPath();
        r.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
        ctx.strokeStyle = l.color;
        ctx.lineWidth = l.thin ? 1 : 1.6;
        ctx.lineJoin = "round";
        ctx.stroke();
        if (r.length === 1) {
          ctx.fillStyle = l.color;
          ctx.fillRect(x(r[0].t) - 1, y(r[0].v) - 1, 2, 2);
        }
      }
      const end = l.points.length ? l.points[l.points.length - 1] : null;
      if (end && end.v !== null) {
        ctx.beginPath();
        ctx.arc(x(end.t), y(end.v), 2.5, 0, 2 * Math.PI);
        ctx.fillStyle = l.color;
        ctx.fill();
      }
    }
  }

  window.addEventListener("resize", drawCharts);
  loop();
})();
