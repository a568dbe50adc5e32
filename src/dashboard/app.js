/**
 * The vdisk dashboard: plain JavaScript, no framework, no bundler; uPlot (global `uPlot`) draws the charts.
 *
 * Data: GET /v1/disks and /v1/jobs once, then the daemon's event stream /v1/events — `meta` (bucket
 * bounds), `stats` every second (a StatsSnapshot: counters are totals since the daemon started) and `jobs`
 * when they change. Rates come from two consecutive `stats` events: Δcounter / Δtime, and latency
 * quantiles from the difference of the two histograms (interpolated inside a bucket, as Prometheus'
 * histogram_quantile does). Every disk keeps the last `windowPoints` rates, so a disk page opens with
 * its recent history already drawn.
 *
 * Rendering is done once and updated in place: the disk list builds a row per disk and on each tick only
 * rewrites the cells whose text changed; the snapshot tree is rebuilt only when the image's set of
 * layers (names and parents) changes — figures alone are patched into the existing boxes. Long chains of
 * snapshots are folded ("⋯ 988 more") so a disk with 1,000 snapshots draws a few dozen boxes.
 *
 * Routes (hash): #/ the list, #/disk/NAME a disk. `#token=T` (alone or after a route, `&token=T`) stores
 * an API token in sessionStorage and removes it from the address bar; API calls then send
 * `Authorization: Bearer T`.
 */
"use strict";

(() => {
  // ---- Limits -------------------------------------------------------------------------------------------

  /** Points per chart: two minutes at one point a second. */
  const windowPoints = 120;
  /** A chain of single-child snapshots this long or longer is folded, showing its first and last few. */
  const chainFoldMin = 14;
  const chainShownHead = 3;
  const chainShownTail = 6;
  /** Clients of one disk that get their own row of charts (the others are in the table only). */
  const clientChartsMax = 6;
  /** A disconnected client's charts stay this long. */
  const goneClientKeepMs = 60_000;
  /** The tree's figures (mapped, exclusive bytes) are re-read at most this often while the disk writes. */
  const treeFiguresRefreshMs = 5_000;
  /** Without the event stream, the list and jobs are polled this often. */
  const pollIntervalMs = 5_000;
  const streamRetryMs = 5_000;
  /** Finished jobs stay in the progress table this long. */
  const finishedJobsShownMs = 30_000;
  const tokenKey = "vdisk.apiToken";

  // ---- DOM helpers --------------------------------------------------------------------------------------

  const $ = (id) => {
    const node = document.getElementById(id);
    if (node === null) throw new Error(`the page has no #${id}`);
    return node;
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** Sets a node's text only when it changed (no layout work for unchanged cells). */
  const shownText = new WeakMap();
  function setText(node, text) {
    if (shownText.get(node) === text) return;
    shownText.set(node, text);
    node.textContent = text;
  }

  const encode = encodeURIComponent;

  // ---- Formatting ---------------------------------------------------------------------------------------

  const byteUnits = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

  function formatBytes(bytes) {
    if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) return "–";
    let value = bytes;
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < byteUnits.length - 1) {
      value /= 1024;
      unit++;
    }
    if (unit === 0) return `${Math.round(value)} B`;
    return `${value.toFixed(value < 10 ? 2 : value < 100 ? 1 : 0)} ${byteUnits[unit]}`;
  }

  const formatRate = (bytesPerSecond) =>
    bytesPerSecond === null || bytesPerSecond === undefined ? "–" : `${formatBytes(bytesPerSecond)}/s`;

  function formatCount(count) {
    if (count === null || count === undefined || !Number.isFinite(count)) return "–";
    if (count < 10) return count === 0 ? "0" : count.toFixed(count < 1 ? 2 : 1).replace(/\.0+$/, "");
    if (count < 1000) return String(Math.round(count));
    if (count < 1e6) return `${(count / 1e3).toFixed(count < 1e4 ? 1 : 0)}k`;
    return `${(count / 1e6).toFixed(2)}M`;
  }

  function formatLatency(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
    if (seconds < 1e-3) return `${Math.round(seconds * 1e6)} µs`;
    if (seconds < 1) return `${(seconds * 1e3).toFixed(seconds < 0.01 ? 2 : 1)} ms`;
    return `${seconds.toFixed(2)} s`;
  }

  function formatDuration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "–";
    const s = Math.round(seconds);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function formatDate(iso, short = false) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "–";
    return short
      ? date.toLocaleString([], { dateStyle: "medium", timeStyle: "short" })
      : date.toLocaleString();
  }

  function formatShortDate(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "";
    const sameDay = date.toDateString() === new Date().toDateString();
    return sameDay
      ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
      : date.toLocaleDateString([], { month: "short", day: "numeric" });
  }

  function formatAgo(iso) {
    const ms = Date.now() - new Date(iso).getTime();
    return Number.isFinite(ms) ? `${formatDuration(Math.max(ms, 0) / 1000)} ago` : "";
  }

  // ---- API ----------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, hint, code, status) {
      super(message);
      this.hint = hint ?? null;
      this.code = code ?? null;
      this.status = status ?? 0;
    }
  }

  /** Takes `token=T` out of the address bar into sessionStorage. */
  function adoptTokenFromHash() {
    const match = /(?:^#|[&?])token=([^&]*)/.exec(location.hash);
    if (!match) return;
    try {
      sessionStorage.setItem(tokenKey, decodeURIComponent(match[1]));
    } catch {
      // storage refused (private mode): the token is used for this page only
      memoryToken = decodeURIComponent(match[1]);
    }
    let rest = location.hash.replace(/([&?]|^#)token=[^&]*&?/, "$1").replace(/[&?]$/, "");
    if (rest === "#" || rest === "") rest = "#/";
    history.replaceState(null, "", location.pathname + location.search + rest);
  }

  let memoryToken = null;
  function apiToken() {
    try {
      return sessionStorage.getItem(tokenKey) ?? memoryToken;
    } catch {
      return memoryToken;
    }
  }

  async function api(method, path, body) {
    const headers = { accept: "application/json" };
    if (body !== undefined) headers["content-type"] = "application/json";
    const token = apiToken();
    if (token) headers.authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "same-origin",
      });
    } catch (err) {
      throw new ApiError(`cannot reach the daemon: ${err.message}`, "is vdisk serve still running?");
    }
    const text = await response.text();
    let json = null;
    try {
      json = text === "" ? null : JSON.parse(text);
    } catch {
      json = null;
    }
    if (!response.ok) {
      const error = json && typeof json === "object" ? json.error : null;
      throw new ApiError(
        error?.message ?? `${method} ${path}: HTTP ${response.status}`,
        error?.hint ?? (response.status === 401 ? "open the dashboard with #token=YOUR_TOKEN" : null),
        error?.code,
        response.status,
      );
    }
    return json;
  }

  // ---- Messages -----------------------------------------------------------------------------------------

  function showError(err) {
    setText($("error-message"), err?.message ?? String(err));
    const hint = err?.hint ?? "";
    setText($("error-hint"), hint ? `hint: ${hint}` : "");
    $("error-banner").hidden = false;
  }

  function hideError() {
    $("error-banner").hidden = true;
  }

  let noticeTimer = 0;
  function showNotice(text) {
    const notice = $("notice");
    setText(notice, text);
    notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => (notice.hidden = true), 6000);
  }

  // ---- Dialog -------------------------------------------------------------------------------------------

  /**
   * One <dialog> for every question. `run(value, force)` does the work: when it throws, the error is shown
   * in the dialog, which stays open (a bad name can be corrected); when it resolves, the dialog closes.
   */
  let dialogTask = null;
  let dialogBusy = false;

  function ask(options) {
    const dialog = $("dialog");
    dialogTask = options;
    setText($("dialog-title"), options.title);
    setText($("dialog-message"), options.message ?? "");
    const input = $("dialog-input");
    $("dialog-input-label").hidden = !options.input;
    if (options.input) {
      setText($("dialog-input-caption"), options.input.caption);
      input.value = options.input.value ?? "";
      input.placeholder = options.input.placeholder ?? "";
    }
    $("dialog-force-label").hidden = !options.force;
    $("dialog-force").checked = false;
    if (options.force) setText($("dialog-force-caption"), options.force);
    $("dialog-error").hidden = true;
    const confirm = $("dialog-confirm");
    confirm.textContent = options.confirmLabel ?? "OK";
    confirm.classList.toggle("danger", Boolean(options.danger));
    confirm.classList.toggle("primary", !options.danger);
    confirm.disabled = false;
    dialog.showModal();
    if (options.input) {
      input.focus();
      input.select();
    } else {
      $("dialog-cancel").focus();
    }
  }

  async function submitDialog(event) {
    event.preventDefault();
    if (dialogBusy || dialogTask === null) return;
    const task = dialogTask;
    const value = $("dialog-input").value.trim();
    const errorBox = $("dialog-error");
    if (task.input && value === "") {
      errorBox.textContent = `${task.input.caption} is needed.`;
      errorBox.hidden = false;
      return;
    }
    dialogBusy = true;
    const confirm = $("dialog-confirm");
    const label = confirm.textContent;
    confirm.disabled = true;
    confirm.textContent = "Working…";
    errorBox.hidden = true;
    try {
      await task.run(value, $("dialog-force").checked);
      dialogTask = null;
      $("dialog").close();
    } catch (err) {
      errorBox.textContent = err.hint ? `${err.message} — hint: ${err.hint}` : String(err.message ?? err);
      errorBox.hidden = false;
    } finally {
      dialogBusy = false;
      confirm.disabled = false;
      confirm.textContent = label;
    }
  }

  // ---- Rates from two snapshots -------------------------------------------------------------------------

  let meta = {
    latencyBucketsSeconds: [
      0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
      0.5, 1,
    ],
  };
  const otherKinds = ["zero", "trim", "flush", "cache", "blockStatus"];

  /** The latency below which a fraction q of the requests fall, from per-bucket counts (not cumulative). */
  function quantile(counts, total, q) {
    const bounds = meta.latencyBucketsSeconds;
    const rank = q * total;
    let below = 0;
    for (let i = 0; i < counts.length; i++) {
      const count = counts[i];
      if (count > 0 && below + count >= rank) {
        if (i >= bounds.length) return bounds[bounds.length - 1];
        const lower = i === 0 ? 0 : bounds[i - 1];
        return lower + (bounds[i] - lower) * Math.min(Math.max((rank - below) / count, 0), 1);
      }
      below += count;
    }
    return null;
  }

  const counter = (ops, kind, field) => ops?.[kind]?.[field] ?? 0;

  /**
   * Rates between two `ops` records `seconds` apart; null when a counter went backwards (a daemon restart)
   * or the interval is empty.
   */
  function rates(current, previous, seconds) {
    if (!current || !previous || !(seconds > 0)) return null;
    const delta = (kind, field) => counter(current, kind, field) - counter(previous, kind, field);
    const readOps = delta("read", "ops");
    const writeOps = delta("write", "ops");
    let otherOps = 0;
    for (const kind of otherKinds) otherOps += delta(kind, "ops");
    const readBytes = delta("read", "bytes");
    const writeBytes = delta("write", "bytes");
    if (readOps < 0 || writeOps < 0 || otherOps < 0 || readBytes < 0 || writeBytes < 0) return null;
    const counts = [];
    let total = 0;
    for (const kind of Object.keys(current)) {
      const now = current[kind]?.latencyBuckets ?? [];
      const before = previous[kind]?.latencyBuckets ?? [];
      for (let i = 0; i < now.length; i++) {
        const count = Math.max((now[i] ?? 0) - (before[i] ?? 0), 0);
        counts[i] = (counts[i] ?? 0) + count;
        total += count;
      }
    }
    return {
      readIops: readOps / seconds,
      writeIops: writeOps / seconds,
      otherIops: otherOps / seconds,
      readBps: readBytes / seconds,
      writeBps: writeBytes / seconds,
      p50: total > 0 ? quantile(counts, total, 0.5) : null,
      p99: total > 0 ? quantile(counts, total, 0.99) : null,
    };
  }

  const seriesFields = ["readIops", "writeIops", "otherIops", "readBps", "writeBps", "p50", "p99"];

  /** The last windowPoints rates of one disk or client, as uPlot's column arrays. */
  class Series {
    constructor() {
      this.x = [];
      for (const field of seriesFields) this[field] = [];
    }

    push(timeSeconds, rate) {
      this.x.push(timeSeconds);
      for (const field of seriesFields) this[field].push(rate ? rate[field] : null);
      if (this.x.length > windowPoints) {
        this.x.shift();
        for (const field of seriesFields) this[field].shift();
      }
    }

    peakIops() {
      let peak = 0;
      for (const field of ["readIops", "writeIops", "otherIops"]) {
        for (const value of this[field]) if (value !== null && value > peak) peak = value;
      }
      return peak;
    }
  }

  // ---- Charts -------------------------------------------------------------------------------------------

  const colors = {
    read: "#2563eb",
    write: "#ea580c",
    other: "#94a3b8",
    p50: "#059669",
    p99: "#dc2626",
  };

  /** Axis steps for bytes: powers of two, so ticks read 256 KiB/s, 512 KiB/s, 768 KiB/s. */
  const binaryIncrements = [];
  for (let exponent = 0; exponent <= 42; exponent++) binaryIncrements.push(2 ** exponent);

  /** Axis tick text: like the legend, but a plain 0. */
  const tickText = (format) => (value) => (value === 0 ? "0" : format(value));

  const chartKinds = [
    {
      title: "IOPS",
      format: formatCount,
      idleMax: 10,
      series: [
        ["read", "readIops", colors.read],
        ["write", "writeIops", colors.write],
        ["other", "otherIops", colors.other],
      ],
    },
    {
      title: "Throughput",
      format: formatRate,
      idleMax: 1024 * 1024,
      increments: binaryIncrements,
      series: [
        ["read", "readBps", colors.read],
        ["write", "writeBps", colors.write],
      ],
    },
    {
      title: "Latency",
      format: formatLatency,
      idleMax: 0.001,
      series: [
        ["p50", "p50", colors.p50],
        ["p99", "p99", colors.p99],
      ],
    },
  ];
  const chartHeight = 150;

  /** Three charts (IOPS, throughput, latency) of one Series. */
  class ChartRow {
    constructor(key, title, series) {
      this.key = key;
      this.series = series;
      this.element = el("div", "chart-row");
      this.element.dataset.chartRow = key;
      this.title = el("h4", "chart-title", title);
      const grid = el("div", "chart-grid");
      this.element.append(this.title, grid);
      this.cells = chartKinds.map(() => grid.appendChild(el("div", "chart")));
      this.charts = [];
    }

    /** Creates the uPlot instances; called once the row is in the document (widths are known). */
    mount() {
      if (typeof window.uPlot !== "function") {
        for (const cell of this.cells) setText(cell, "charts unavailable (uPlot did not load)");
        return;
      }
      chartKinds.forEach((kind, index) => {
        const cell = this.cells[index];
        const options = {
          title: kind.title,
          width: Math.max(cell.clientWidth, 200),
          height: chartHeight,
          scales: {
            x: { time: true },
            y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : kind.idleMax] },
          },
          series: [
            { value: (_u, v) => (v === null ? "–" : new Date(v * 1000).toLocaleTimeString()) },
            ...kind.series.map(([label, , color]) => ({
              label,
              stroke: color,
              width: 1.5,
              points: { show: false },
              value: (_u, v) => (v === null || v === undefined ? "–" : kind.format(v)),
            })),
          ],
          axes: [
            { stroke: "#64748b", grid: { stroke: "#eef2f7" }, ticks: { stroke: "#e2e8f0" } },
            {
              stroke: "#64748b",
              size: 84,
              grid: { stroke: "#eef2f7" },
              ticks: { stroke: "#e2e8f0" },
              values: (_u, splits) => splits.map(tickText(kind.format)),
              ...(kind.increments ? { incrs: kind.increments } : {}),
            },
          ],
          cursor: { drag: { x: false, y: false } },
          legend: { live: false },
        };
        this.charts.push(new window.uPlot(options, this.data(kind), cell));
      });
      this.update();
    }

    data(kind) {
      return [this.series.x, ...kind.series.map(([, field]) => this.series[field])];
    }

    update() {
      this.charts.forEach((chart, index) => chart.setData(this.data(chartKinds[index])));
      this.element.dataset.points = String(this.series.x.length);
      this.element.dataset.peakIops = String(this.series.peakIops());
    }

    setTitle(title) {
      setText(this.title, title);
    }

    resize() {
      this.charts.forEach((chart, index) => {
        const width = Math.max(this.cells[index].clientWidth, 200);
        if (Math.abs(chart.width - width) > 2) chart.setSize({ width, height: chartHeight });
      });
    }

    destroy() {
      for (const chart of this.charts) chart.destroy();
      this.charts = [];
      this.element.remove();
    }
  }

  // ---- State --------------------------------------------------------------------------------------------

  const state = {
    /** The latest StatsSnapshot, and its disks by name. */
    stats: null,
    disks: new Map(),
    /** name → latest rates (null until two snapshots were seen). */
    rates: new Map(),
    /** name → Series: every disk's recent history. */
    history: new Map(),
    /** name → {size, allocatedBytes, format, snapshots, clients} for the list. */
    list: new Map(),
    jobs: [],
    streamLive: false,
  };

  // ---- The disk list ------------------------------------------------------------------------------------

  const listColumns = ["size", "allocated", "format", "snapshots", "clients", "iops", "throughput"];
  /** name → {tr, cells} */
  const diskRows = new Map();
  let listFilter = "";

  function diskRow(name) {
    let row = diskRows.get(name);
    if (row) return row;
    const tr = el("tr");
    tr.dataset.disk = name;
    const nameCell = el("td", "name");
    const link = el("a", "", name);
    link.href = `#/disk/${encode(name)}`;
    nameCell.append(link);
    tr.append(nameCell);
    const cells = {};
    for (const column of listColumns) {
      const cell = el("td", column === "format" ? "" : "num", "–");
      cell.dataset.col = column;
      cells[column] = cell;
      tr.append(cell);
    }
    row = { tr, cells };
    diskRows.set(name, row);
    return row;
  }

  /** Makes the table's rows exactly `names`, in name order, moving only what changed. */
  function syncDiskRows(names) {
    const wanted = new Set(names);
    let changed = false;
    for (const [name, row] of diskRows) {
      if (!wanted.has(name)) {
        row.tr.remove();
        diskRows.delete(name);
        state.list.delete(name);
        changed = true;
      }
    }
    for (const name of names) {
      if (!diskRows.has(name)) {
        diskRow(name);
        changed = true;
      }
    }
    if (changed) {
      const body = $("disk-rows");
      const sorted = [...diskRows.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      const fragment = document.createDocumentFragment();
      for (const name of sorted) fragment.append(diskRows.get(name).tr);
      body.append(fragment);
      applyFilter();
    }
    setText($("disk-count"), String(diskRows.size));
    $("disks-empty").hidden = diskRows.size > 0;
  }

  function applyFilter() {
    for (const [name, row] of diskRows) row.tr.hidden = listFilter !== "" && !name.includes(listFilter);
  }

  function renderListRow(name) {
    const row = diskRows.get(name);
    const facts = state.list.get(name);
    if (!row || !facts) return;
    const rate = state.rates.get(name);
    setText(row.cells.size, formatBytes(facts.size));
    setText(row.cells.allocated, formatBytes(facts.allocatedBytes));
    setText(row.cells.format, facts.format ?? "–");
    setText(row.cells.snapshots, facts.snapshots === null ? "–" : String(facts.snapshots));
    setText(row.cells.clients, String(facts.clients ?? 0));
    setText(row.cells.iops, rate ? formatCount(rate.readIops + rate.writeIops + rate.otherIops) : "–");
    setText(row.cells.throughput, rate ? formatRate(rate.readBps + rate.writeBps) : "–");
  }

  async function loadDisks() {
    const answer = await api("GET", "/v1/disks");
    for (const disk of answer.disks) {
      const known = state.list.get(disk.name);
      state.list.set(disk.name, {
        size: disk.size,
        allocatedBytes: disk.allocatedBytes,
        format: disk.format,
        snapshots: state.disks.get(disk.name)?.snapshots ?? known?.snapshots ?? null,
        clients: disk.connections,
      });
    }
    syncDiskRows(answer.disks.map((disk) => disk.name));
    for (const disk of answer.disks) renderListRow(disk.name);
  }

  // ---- The disk page ------------------------------------------------------------------------------------

  const page = {
    /** Bumped on every navigation: answers for an older page are dropped. */
    generation: 0,
    name: null,
    info: null,
    tree: null,
    treeSignature: "",
    /** layer name → tree node; layer name → parent's name. */
    nodes: new Map(),
    parents: new Map(),
    /** layer name → {button, meta} of the drawn tree. */
    boxes: new Map(),
    selected: null,
    /** Chains unfolded by the user, by their first layer's name. */
    unfolded: new Set(),
    /** What the stream last said about the image's layer set, and when the tree was last fetched. */
    layerHint: "",
    allocatedHint: -1,
    treeFetchedMs: 0,
    treeRunning: null,
    treeQueued: null,
    missing: false,
    totalRow: null,
    /** client id → {series, previous, previousMs, goneMs, row, tr, cells} */
    clients: new Map(),
  };

  function showDisk(name) {
    if (page.name === name && !$("view-disk").hidden) return;
    leaveDisk();
    page.generation++;
    page.name = name;
    $("view-list").hidden = true;
    $("view-disk").hidden = false;
    document.title = `${name} — vdisk`;
    setText($("disk-name"), name);
    $("disk-missing").hidden = true;
    $("snapshot-button").hidden = true;
    $("tree").replaceChildren(el("p", "empty", "Loading…"));
    setText($("tree-summary"), "");
    for (const dd of document.querySelectorAll("#disk-facts dd")) setText(dd, "–");
    selectLayer(null);
    const series = historyOf(name);
    page.totalRow = new ChartRow("total", "All clients of this disk", series);
    $("charts").append(page.totalRow.element);
    page.totalRow.mount();
    updateDiskLive(null);
    void loadDisk(page.generation, name);
  }

  function leaveDisk() {
    page.generation++;
    page.name = null;
    page.info = null;
    page.tree = null;
    page.treeSignature = "";
    page.nodes = new Map();
    page.parents = new Map();
    page.boxes = new Map();
    page.selected = null;
    page.unfolded = new Set();
    page.layerHint = "";
    page.allocatedHint = -1;
    page.missing = false;
    page.totalRow?.destroy();
    page.totalRow = null;
    for (const client of page.clients.values()) {
      client.row?.destroy();
      client.tr.remove();
    }
    page.clients.clear();
    $("charts").replaceChildren();
  }

  async function loadDisk(generation, name) {
    let info;
    try {
      info = await api("GET", `/v1/disks/${encode(name)}`);
    } catch (err) {
      if (generation !== page.generation) return;
      if (err.status === 404) markMissing(name);
      else showError(err);
      $("tree").replaceChildren();
      return;
    }
    if (generation !== page.generation) return;
    page.info = info;
    const facts = $("disk-facts");
    const fact = (key) => facts.querySelector(`[data-fact="${key}"]`);
    setText(fact("format"), info.format);
    setText(fact("created"), formatDate(info.created, true));
    const file = info.image ? info.image.file : info.file;
    setText(fact("image"), file.split("/").pop());
    fact("image").title = file;
    setText(fact("size"), formatBytes(info.size));
    setText(fact("allocated"), formatBytes(info.allocatedBytes));
    setText(fact("clients"), String(info.connections));
    if (info.format === "vdisk") {
      setText(fact("snapshots"), String(info.image?.snapshots ?? "–"));
      $("snapshot-button").hidden = false;
      await refreshTree();
    } else {
      setText(fact("snapshots"), "–");
      $("tree").replaceChildren(
        el("p", "empty", `${name} is a ${info.format} disk: it has no snapshots (vdisk disks do).`),
      );
    }
  }

  function markMissing(name) {
    page.missing = true;
    const missing = $("disk-missing");
    missing.textContent = `There is no disk named ${name} (any more).`;
    missing.hidden = false;
    $("snapshot-button").hidden = true;
  }

  // ---- The snapshot tree --------------------------------------------------------------------------------

  /** Fetches the tree; at most one fetch runs and one waits, so bursts of triggers cost two fetches. */
  function refreshTree() {
    if (page.treeQueued) return page.treeQueued;
    const start = () => {
      page.treeRunning = fetchTree(page.generation, page.name).finally(() => (page.treeRunning = null));
      return page.treeRunning;
    };
    if (!page.treeRunning) return start();
    page.treeQueued = page.treeRunning.then(() => {
      page.treeQueued = null;
      return start();
    });
    return page.treeQueued;
  }

  async function fetchTree(generation, name) {
    if (name === null) return;
    page.treeFetchedMs = Date.now();
    let tree;
    try {
      tree = await api("GET", `/v1/disks/${encode(name)}/tree`);
    } catch (err) {
      if (generation !== page.generation) return;
      if (err.status === 404) markMissing(name);
      else showError(err);
      return;
    }
    if (generation !== page.generation) return;
    applyTree(tree);
  }

  function applyTree(tree) {
    page.tree = tree;
    const nodes = new Map();
    const parents = new Map();
    const signature = [];
    // Iterative walk: a chain of 1,000 snapshots is 1,000 levels deep.
    const stack = tree.roots.map((root) => [root, null]).reverse();
    while (stack.length > 0) {
      const [node, parent] = stack.pop();
      nodes.set(node.name, node);
      parents.set(node.name, parent);
      signature.push(`${node.name}<${parent ?? ""}`);
      for (let i = node.children.length - 1; i >= 0; i--) stack.push([node.children[i], node.name]);
    }
    page.nodes = nodes;
    page.parents = parents;
    const text = signature.join("\n");
    if (text !== page.treeSignature) {
      page.treeSignature = text;
      renderTree();
    } else {
      for (const [name, box] of page.boxes) {
        const node = nodes.get(name);
        if (node) setText(box.meta, nodeMeta(node));
      }
    }
    const family = tree.disks.length;
    setText(
      $("tree-summary"),
      `${tree.snapshots} snapshot${tree.snapshots === 1 ? "" : "s"} · ${family} disk${family === 1 ? "" : "s"} in ${tree.file} (${formatBytes(tree.fileBytes)})`,
    );
    if (page.selected !== null && !nodes.has(page.selected)) selectLayer(null);
    else if (page.selected !== null) renderDetails();
  }

  function nodeTitle(node) {
    return node.kind === "snapshot" ? node.snapshot : node.disk;
  }

  function nodeMeta(node) {
    const parts = [];
    if (node.kind === "snapshot") parts.push(formatShortDate(node.created));
    parts.push(`${formatBytes(node.mappedBytes)} mapped`);
    if (node.connections > 0) parts.push(`${node.connections} client${node.connections === 1 ? "" : "s"}`);
    return parts.join(" · ");
  }

  function nodeBox(node) {
    const button = el("button", "node");
    button.type = "button";
    button.dataset.layer = node.name;
    button.dataset.kind = node.kind;
    if (node.current) button.classList.add("current");
    if (node.name === page.selected) button.classList.add("selected");
    // Heads carry a badge; a snapshot only when it belongs to another disk of the family.
    const badgeText =
      node.kind === "head"
        ? node.current
          ? "this disk"
          : "disk"
        : node.disk === page.name
          ? ""
          : `${node.disk}@`;
    if (badgeText !== "") button.append(el("span", "badge", badgeText));
    const title = el("span", "node-title", nodeTitle(node));
    const meta = el("span", "node-meta", nodeMeta(node));
    button.append(title, meta);
    button.title = node.name;
    page.boxes.set(node.name, { button, meta });
    return button;
  }

  /** A layer, the chain of single children below it, then (at a fork) each child's branch side by side. */
  function renderBranch(first) {
    const branch = el("div", "branch");
    const chain = [first];
    let last = first;
    while (last.children.length === 1) {
      last = last.children[0];
      chain.push(last);
    }
    const chainBox = el("div", "chain");
    const folded =
      chain.length >= chainFoldMin &&
      !page.unfolded.has(first.name) &&
      !chain.slice(chainShownHead, -chainShownTail).some((node) => node.name === page.selected);
    if (folded) {
      for (const node of chain.slice(0, chainShownHead)) chainBox.append(nodeBox(node));
      const hidden = chain.length - chainShownHead - chainShownTail;
      const more = el("button", "chain-more", `⋯ ${hidden} more snapshots`);
      more.type = "button";
      more.dataset.unfold = first.name;
      chainBox.append(more);
      for (const node of chain.slice(-chainShownTail)) chainBox.append(nodeBox(node));
    } else {
      for (const node of chain) chainBox.append(nodeBox(node));
    }
    branch.append(chainBox);
    if (last.children.length > 1) branch.append(renderFork(last.children));
    return branch;
  }

  function renderFork(children) {
    const fork = el("div", "fork");
    for (const child of children) {
      const arm = el("div", "fork-child");
      arm.append(renderBranch(child));
      fork.append(arm);
    }
    return fork;
  }

  function renderTree() {
    const tree = page.tree;
    const container = $("tree");
    page.boxes = new Map();
    if (!tree || tree.roots.length === 0) {
      container.replaceChildren(el("p", "empty", "This image has no layers."));
      return;
    }
    const content = tree.roots.length === 1 ? renderBranch(tree.roots[0]) : renderFork(tree.roots);
    content.classList.add("tree-root");
    container.replaceChildren(content);
    container.dataset.layers = String(page.nodes.size);
  }

  function onTreeClick(event) {
    const unfold = event.target.closest("[data-unfold]");
    if (unfold) {
      page.unfolded.add(unfold.dataset.unfold);
      renderTree();
      return;
    }
    const box = event.target.closest(".node");
    if (box) selectLayer(box.dataset.layer);
  }

  // ---- Details and actions ------------------------------------------------------------------------------

  function selectLayer(name) {
    if (page.selected !== null) page.boxes.get(page.selected)?.button.classList.remove("selected");
    page.selected = name;
    if (name !== null) page.boxes.get(name)?.button.classList.add("selected");
    renderDetails();
  }

  /** The disks whose head descends from `node`. */
  function dependentsOf(node) {
    const heads = [];
    const stack = [...node.children];
    while (stack.length > 0) {
      const next = stack.pop();
      if (next.kind === "head") heads.push(next.disk);
      stack.push(...next.children);
    }
    return heads.sort();
  }

  function renderDetails() {
    const node = page.selected === null ? null : page.nodes.get(page.selected);
    $("details-empty").hidden = Boolean(node);
    $("details-content").hidden = !node;
    setText($("details-title"), node ? (node.kind === "snapshot" ? "Snapshot" : "Disk") : "Details");
    if (!node) return;
    const detail = (key, text) => setText($("details-content").querySelector(`[data-detail="${key}"]`), text);
    setText($("details-name"), node.name);
    detail(
      "kind",
      node.kind === "snapshot"
        ? `snapshot of ${node.disk}`
        : node.current
          ? "this disk (head)"
          : "disk (head)",
    );
    detail("created", `${formatDate(node.created)} (${formatAgo(node.created)})`);
    detail("size", formatBytes(node.size));
    detail("mapped", formatBytes(node.mappedBytes));
    detail("exclusive", formatBytes(node.exclusiveBytes));
    detail("index", formatBytes(node.indexBytes));
    detail("parent", page.parents.get(node.name) ?? "—");
    detail("clients", String(node.connections));
    const dependents = node.kind === "snapshot" ? dependentsOf(node) : [];
    detail("dependents", dependents.length > 0 ? dependents.join(", ") : "—");
    const isSnapshot = node.kind === "snapshot";
    $("details-actions").hidden = !isSnapshot;
    const rollback = $("rollback-button");
    rollback.hidden = !isSnapshot || !(page.tree?.disks ?? []).includes(node.disk);
    rollback.textContent = `Roll back ${node.disk}…`;
    const open = $("details-open");
    open.hidden = isSnapshot || node.current;
    if (!open.hidden) {
      open.href = `#/disk/${encode(node.disk)}`;
      open.textContent = `Open ${node.disk} →`;
    }
  }

  function selectedSnapshot() {
    const node = page.selected === null ? null : page.nodes.get(page.selected);
    return node && node.kind === "snapshot" ? node : null;
  }

  function snapshotSuggestion() {
    const now = new Date();
    const pad = (n) => String(n).padStart(2, "0");
    return `snap-${now.getFullYear()}${pad(now.getMonth() + 1)}${pad(now.getDate())}-${pad(now.getHours())}${pad(now.getMinutes())}${pad(now.getSeconds())}`;
  }

  function onSnapshot() {
    const disk = page.name;
    if (disk === null) return;
    ask({
      title: `Snapshot ${disk}`,
      message: "Freeze the disk as it is now. It takes no time and clients keep writing.",
      input: { caption: "Snapshot name", value: snapshotSuggestion() },
      confirmLabel: "Create snapshot",
      run: async (name) => {
        const snapshot = await api("POST", `/v1/disks/${encode(disk)}/snapshots`, { name });
        showNotice(`Snapshot ${snapshot.name} created.`);
        if (page.name === disk) {
          page.selected = snapshot.name;
          await refreshTree();
        }
      },
    });
  }

  function onClone() {
    const node = selectedSnapshot();
    if (!node) return;
    ask({
      title: `Clone ${node.name}`,
      message:
        "A new disk that starts as this snapshot. It shares the snapshot's data and costs nothing until written.",
      input: { caption: "New disk name", value: "", placeholder: `${node.disk}-clone` },
      confirmLabel: "Create disk",
      run: async (name) => {
        const disk = await api(
          "POST",
          `/v1/disks/${encode(node.disk)}/snapshots/${encode(node.snapshot)}/clone`,
          {
            name,
          },
        );
        showNotice(`Disk ${disk.name} created from ${node.name}.`);
        await Promise.all([refreshTree(), loadDisks().catch(showError)]);
      },
    });
  }

  function onRollback() {
    const node = selectedSnapshot();
    if (!node) return;
    ask({
      title: `Roll back ${node.disk} to ${node.snapshot}?`,
      message: `Every change made to ${node.disk} since ${node.name} is thrown away. This cannot be undone.`,
      force: `Disconnect ${node.disk}'s clients first (needed while it is in use)`,
      confirmLabel: "Roll back",
      danger: true,
      run: async (_value, force) => {
        await api("POST", `/v1/disks/${encode(node.disk)}/snapshots/${encode(node.snapshot)}/rollback`, {
          force,
        });
        showNotice(`${node.disk} rolled back to ${node.name}.`);
        await refreshTree();
      },
    });
  }

  function onDelete() {
    const node = selectedSnapshot();
    if (!node) return;
    const dependents = dependentsOf(node);
    ask({
      title: `Delete snapshot ${node.name}?`,
      message:
        `Deleting it frees about ${formatBytes(node.exclusiveBytes)}.` +
        (dependents.length > 0 ? ` The disks built on it (${dependents.join(", ")}) keep their data.` : ""),
      force: "Disconnect clients reading this snapshot first",
      confirmLabel: "Delete",
      danger: true,
      run: async (_value, force) => {
        const query = force ? "?force=1" : "";
        const result = await api(
          "DELETE",
          `/v1/disks/${encode(node.disk)}/snapshots/${encode(node.snapshot)}${query}`,
        );
        showNotice(`Snapshot ${result.deleted} deleted; ${formatBytes(result.freedBytes)} freed.`);
        if (page.selected === node.name) selectLayer(null);
        await refreshTree();
      },
    });
  }

  // ---- Live figures of the disk page --------------------------------------------------------------------

  function historyOf(name) {
    let series = state.history.get(name);
    if (!series) {
      series = new Series();
      state.history.set(name, series);
    }
    return series;
  }

  function sumField(ops, field) {
    let total = 0;
    for (const kind of Object.keys(ops ?? {})) total += ops[kind]?.[field] ?? 0;
    return total;
  }

  function setStat(key, value, text) {
    const node = $("totals").querySelector(`[data-stat="${key}"]`);
    node.dataset.value = String(value);
    setText(node, text);
  }

  /** Called on every `stats` event while a disk page is open (and once when it opens). */
  function updateDiskLive(previousStats) {
    const name = page.name;
    const stats = state.stats;
    if (name === null || stats === null) return;
    const disk = state.disks.get(name);
    const facts = $("disk-facts");
    const fact = (key) => facts.querySelector(`[data-fact="${key}"]`);
    if (!disk) {
      if (!page.missing && page.info !== null) markMissing(name);
      return;
    }
    setText(fact("size"), formatBytes(disk.sizeBytes));
    setText(fact("allocated"), formatBytes(disk.allocatedBytes));
    setText(fact("clients"), String(disk.clients.length));
    if (disk.format === "vdisk") setText(fact("snapshots"), String(disk.snapshots));

    setStat("readOps", counter(disk.ops, "read", "ops"), formatCount(counter(disk.ops, "read", "ops")));
    setStat("writeOps", counter(disk.ops, "write", "ops"), formatCount(counter(disk.ops, "write", "ops")));
    setStat("readBytes", counter(disk.ops, "read", "bytes"), formatBytes(counter(disk.ops, "read", "bytes")));
    setStat(
      "writeBytes",
      counter(disk.ops, "write", "bytes"),
      formatBytes(counter(disk.ops, "write", "bytes")),
    );
    const errors = sumField(disk.ops, "errors");
    setStat("errors", errors, formatCount(errors));
    setStat("inflight", disk.inflight, String(disk.inflight));
    page.totalRow?.update();

    updateClients(disk, previousStats);
    watchLayers(disk, stats);

    const tiers = Array.isArray(stats.tiers) && stats.tiers.length > 0;
    $("tiers").hidden = !tiers;
  }

  /** Re-fetches the tree when the image's layer set may have changed, or (at most every few s) its figures. */
  function watchLayers(disk, stats) {
    if (disk.format !== "vdisk" || page.info === null) return;
    const image = (stats.images ?? []).find((entry) => entry.disks.includes(disk.name));
    const family = image ? image.disks : (page.tree?.disks ?? [disk.name]);
    let hint = image ? `${image.file}:` : `${stats.disks.length}:`;
    let allocated = 0;
    for (const member of family) {
      const stat = state.disks.get(member);
      hint += `${member}=${stat ? stat.snapshots : "gone"},`;
      allocated += stat ? stat.allocatedBytes : 0;
    }
    if (page.layerHint === "") {
      page.layerHint = hint;
      page.allocatedHint = allocated;
      return;
    }
    if (hint !== page.layerHint) {
      page.layerHint = hint;
      page.allocatedHint = allocated;
      void refreshTree();
    } else if (allocated !== page.allocatedHint && Date.now() - page.treeFetchedMs >= treeFiguresRefreshMs) {
      page.allocatedHint = allocated;
      void refreshTree();
    }
  }

  function clientTitle(client, gone) {
    return `Client #${client.id} · ${client.export} · ${client.peer}${gone ? " (disconnected)" : ""}`;
  }

  function updateClients(disk, previousStats) {
    const stats = state.stats;
    const nowMs = stats.timeMs;
    const seen = new Set();
    const body = $("client-rows");
    for (const client of disk.clients) {
      seen.add(client.id);
      let entry = page.clients.get(client.id);
      if (!entry) {
        const tr = el("tr");
        tr.dataset.client = String(client.id);
        const cells = {};
        for (const column of ["id", "export", "peer", "connected", "inflight", "iops", "throughput", "p99"]) {
          cells[column] = tr.appendChild(el("td", ["id", "export", "peer"].includes(column) ? "" : "num"));
        }
        body.append(tr);
        entry = { series: new Series(), previous: null, previousMs: 0, goneMs: 0, row: null, tr, cells };
        page.clients.set(client.id, entry);
        const charted = [...page.clients.values()].filter((other) => other.row !== null).length;
        if (charted < clientChartsMax) {
          entry.row = new ChartRow(`client-${client.id}`, clientTitle(client, false), entry.series);
          $("charts").append(entry.row.element);
          entry.row.mount();
        }
      }
      const rate =
        entry.previous && previousStats
          ? rates(client.ops, entry.previous, (nowMs - entry.previousMs) / 1000)
          : null;
      if (entry.previous) entry.series.push(nowMs / 1000, rate);
      entry.previous = client.ops;
      entry.previousMs = nowMs;
      entry.goneMs = 0;
      entry.row?.update();
      const cells = entry.cells;
      setText(cells.id, `#${client.id}`);
      setText(cells.export, client.export);
      setText(cells.peer, client.peer);
      setText(cells.connected, formatDuration((nowMs - client.connectedMs) / 1000));
      setText(cells.inflight, String(client.inflight));
      setText(cells.iops, rate ? `${formatCount(rate.readIops)} / ${formatCount(rate.writeIops)}` : "–");
      setText(cells.throughput, rate ? `${formatRate(rate.readBps)} / ${formatRate(rate.writeBps)}` : "–");
      setText(cells.p99, rate ? formatLatency(rate.p99) : "–");
    }
    for (const [id, entry] of page.clients) {
      if (seen.has(id)) continue;
      if (entry.goneMs === 0) {
        entry.goneMs = Date.now();
        entry.tr.remove();
        entry.row?.setTitle(`${entry.row.title.textContent} (disconnected)`);
      } else if (Date.now() - entry.goneMs > goneClientKeepMs) {
        entry.row?.destroy();
        page.clients.delete(id);
      }
    }
    $("clients-empty").hidden = disk.clients.length > 0;
  }

  // ---- Jobs ---------------------------------------------------------------------------------------------

  /** job id → {tr, cells, fill} */
  const jobRows = new Map();

  function renderJobs() {
    const now = Date.now();
    const shown = state.jobs.filter(
      (job) =>
        job.state === "running" ||
        (job.finishedAt !== null && now - new Date(job.finishedAt).getTime() < finishedJobsShownMs),
    );
    $("jobs").hidden = shown.length === 0;
    const ids = new Set(shown.map((job) => job.id));
    for (const [id, row] of jobRows) {
      if (!ids.has(id)) {
        row.tr.remove();
        jobRows.delete(id);
      }
    }
    for (const job of shown) {
      let row = jobRows.get(job.id);
      if (!row) {
        const tr = el("tr");
        tr.dataset.job = String(job.id);
        const cells = {};
        for (const column of ["job", "disk", "file", "progress", "done", "rate", "eta"]) {
          cells[column] = tr.appendChild(el("td", ["done", "rate", "eta"].includes(column) ? "num" : ""));
        }
        const bar = el("div", "bar");
        const fill = el("div", "bar-fill");
        const label = el("span", "bar-label");
        bar.append(fill, label);
        cells.progress.append(bar);
        row = { tr, cells, fill, label, bar };
        jobRows.set(job.id, row);
        $("jobs-body").append(tr);
      }
      const fraction =
        job.bytesTotal > 0 ? Math.min(job.bytesDone / job.bytesTotal, 1) : job.state === "done" ? 1 : 0;
      row.fill.style.width = `${(fraction * 100).toFixed(1)}%`;
      row.bar.dataset.state = job.state;
      setText(row.label, `${Math.floor(fraction * 100)}%`);
      setText(row.cells.job, `${job.kind} #${job.id}`);
      setText(row.cells.disk, job.disk);
      setText(row.cells.file, `${job.file} (${job.format})`);
      setText(row.cells.done, `${formatBytes(job.bytesDone)} / ${formatBytes(job.bytesTotal)}`);
      setText(row.cells.rate, formatRate(job.rateBytesPerSecond));
      const remaining = job.bytesTotal - job.bytesDone;
      setText(
        row.cells.eta,
        job.state === "running"
          ? job.rateBytesPerSecond > 0
            ? formatDuration(remaining / job.rateBytesPerSecond)
            : "–"
          : job.state === "done"
            ? "done"
            : `failed: ${job.error?.message ?? "unknown error"}`,
      );
    }
  }

  // ---- The event stream ---------------------------------------------------------------------------------

  function onStats(stats) {
    const started = performance.now();
    const previous = state.stats;
    const seconds = previous ? (stats.timeMs - previous.timeMs) / 1000 : 0;
    const previousDisks = state.disks;
    state.stats = stats;
    state.disks = new Map(stats.disks.map((disk) => [disk.name, disk]));
    for (const disk of stats.disks) {
      const before = previousDisks.get(disk.name);
      const rate = before ? rates(disk.ops, before.ops, seconds) : null;
      state.rates.set(disk.name, rate);
      if (before) historyOf(disk.name).push(stats.timeMs / 1000, rate);
      state.list.set(disk.name, {
        size: disk.sizeBytes,
        allocatedBytes: disk.allocatedBytes,
        format: disk.format,
        snapshots: disk.format === "vdisk" ? disk.snapshots : null,
        clients: disk.clients.length,
      });
    }
    for (const name of [...state.history.keys()]) {
      if (!state.disks.has(name)) {
        state.history.delete(name);
        state.rates.delete(name);
      }
    }
    syncDiskRows(stats.disks.map((disk) => disk.name));
    for (const disk of stats.disks) renderListRow(disk.name);
    let clients = 0;
    for (const disk of stats.disks) clients += disk.clients.length;
    setText(
      $("summary"),
      `${stats.disks.length} disk${stats.disks.length === 1 ? "" : "s"} · ${clients} client${clients === 1 ? "" : "s"} · up ${formatDuration(stats.uptimeSeconds)}`,
    );
    if (page.name !== null) updateDiskLive(previous);
    renderJobs();
    const connection = $("connection");
    connection.dataset.tickMs = (performance.now() - started).toFixed(1);
    connection.dataset.ticks = String(Number(connection.dataset.ticks ?? "0") + 1);
  }

  function setConnection(stateName, text) {
    const connection = $("connection");
    connection.dataset.state = stateName;
    setText(connection, text);
  }

  let pollTimer = 0;
  function startPolling() {
    if (pollTimer !== 0) return;
    pollTimer = setInterval(() => {
      loadDisks().catch(() => undefined);
      loadJobs().catch(() => undefined);
    }, pollIntervalMs);
  }

  function stopPolling() {
    clearInterval(pollTimer);
    pollTimer = 0;
  }

  function connectStream() {
    const source = new EventSource("/v1/events");
    source.addEventListener("meta", (event) => {
      meta = { ...meta, ...JSON.parse(event.data) };
    });
    source.addEventListener("stats", (event) => onStats(JSON.parse(event.data)));
    source.addEventListener("jobs", (event) => {
      state.jobs = JSON.parse(event.data).jobs ?? [];
      renderJobs();
    });
    source.onopen = () => {
      state.streamLive = true;
      stopPolling();
      setConnection("live", "live");
    };
    source.onerror = () => {
      state.streamLive = false;
      if (source.readyState === EventSource.CLOSED) {
        // Refused (not a stream, or too many tabs): poll, and try the stream again later.
        source.close();
        setConnection("offline", "no live stream");
        startPolling();
        setTimeout(connectStream, streamRetryMs);
      } else {
        setConnection("connecting", "reconnecting…");
      }
    };
  }

  async function loadJobs() {
    const answer = await api("GET", "/v1/jobs");
    state.jobs = answer.jobs ?? [];
    renderJobs();
  }

  // ---- Routing and start --------------------------------------------------------------------------------

  function showList() {
    leaveDisk();
    $("view-disk").hidden = true;
    $("view-list").hidden = false;
    document.title = "vdisk";
    loadDisks().catch(showError);
  }

  function route() {
    const match = /^#\/disk\/([^/?&]+)/.exec(location.hash);
    let name = null;
    if (match) {
      try {
        name = decodeURIComponent(match[1]);
      } catch {
        name = null;
      }
    }
    if (name !== null) showDisk(name);
    else showList();
  }

  let resizeFrame = 0;
  function onResize() {
    cancelAnimationFrame(resizeFrame);
    resizeFrame = requestAnimationFrame(() => {
      page.totalRow?.resize();
      for (const client of page.clients.values()) client.row?.resize();
    });
  }

  function start() {
    adoptTokenFromHash();
    $("error-close").addEventListener("click", hideError);
    $("dialog-form").addEventListener("submit", (event) => void submitDialog(event));
    $("dialog-cancel").addEventListener("click", () => {
      if (!dialogBusy) $("dialog").close();
    });
    $("dialog").addEventListener("cancel", (event) => {
      if (dialogBusy) event.preventDefault();
    });
    $("dialog").addEventListener("close", () => (dialogTask = null));
    $("disk-filter").addEventListener("input", (event) => {
      listFilter = event.target.value.trim();
      applyFilter();
    });
    $("tree").addEventListener("click", onTreeClick);
    $("snapshot-button").addEventListener("click", onSnapshot);
    $("clone-button").addEventListener("click", onClone);
    $("rollback-button").addEventListener("click", onRollback);
    $("delete-button").addEventListener("click", onDelete);
    window.addEventListener("hashchange", route);
    if (typeof ResizeObserver === "function") new ResizeObserver(onResize).observe($("charts"));
    else window.addEventListener("resize", onResize);
    connectStream();
    loadJobs().catch(() => undefined);
    route();
  }

  start();
})();
