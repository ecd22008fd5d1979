// A small SVG line chart for downsampled telemetry: a min/max band, the average as a line, a
// time axis, a value axis with its unit and a hover readout. No library: the console works
// offline and under a strict Content-Security-Policy (no inline styles, no eval).
//
// Every drawn point is also a <circle data-testid="chart-point"> carrying the bucket it shows
// (data-t, data-min, data-avg, data-max, data-count), and the <svg> carries its scales
// (data-x-min/max in ms, data-y-min/max, data-plot-*), so a test can check both what the API
// returned and where it was drawn.

const SVG_NS = 'http://www.w3.org/2000/svg';
const MARGIN = { top: 22, right: 14, bottom: 26, left: 54 };
const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
const TIME_STEPS = [
  1, 2, 5, 10, 15, 30,
].map((s) => s * SECOND).concat(
  [1, 2, 5, 10, 15, 30].map((m) => m * MINUTE),
  [1, 2, 3, 6, 12].map((h) => h * HOUR),
  [1, 2, 7].map((d) => d * DAY),
);

const timeFormats = {
  seconds: new Intl.DateTimeFormat(undefined, {
    hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
  }),
  minutes: new Intl.DateTimeFormat(undefined, {
    hour: '2-digit', minute: '2-digit', hourCycle: 'h23',
  }),
  day: new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' }),
  full: new Intl.DateTimeFormat(undefined, {
    month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
    hourCycle: 'h23',
  }),
};

function svg(tag, attrs = {}) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  return el;
}

/** A "nice" step (1, 2, 2.5 or 5 times a power of ten) giving about `count` ticks over `span`. */
export function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const m = raw / power;
  const f = m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10;
  return f * power;
}

// unit spellings of the wire (ASCII, UCUM-like) and how people write them
const UNIT_NAMES = { degC: '°C', Cel: '°C', degF: '°F', '[degF]': '°F', '%RH': '% RH', ohm: 'Ω' };

/** A unit as people write it (`degC` → `°C`); unknown units unchanged. */
export function displayUnit(unit) {
  if (!unit) return '';
  return UNIT_NAMES[unit] ?? unit;
}

/** A value for people: about four significant digits, no trailing noise. */
export function formatValue(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  if (Number.isInteger(value)) return value.toLocaleString();
  const abs = Math.abs(value);
  const digits = abs >= 1000 ? 0 : abs >= 100 ? 1 : 2;
  // fixed decimals: values that update in place do not jiggle
  return value.toLocaleString(undefined, {
    minimumFractionDigits: digits, maximumFractionDigits: digits,
  });
}

function decimalsFor(step) {
  return Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
}

function timeTicks(since, until, width) {
  const want = Math.max(2, Math.floor(width / 110));
  const span = until - since;
  const step = TIME_STEPS.find((s) => span / s <= want) ?? TIME_STEPS[TIME_STEPS.length - 1];
  const ticks = [];
  if (step >= DAY) {
    const first = new Date(since);
    first.setHours(0, 0, 0, 0);
    for (let d = first; d.getTime() <= until; d = new Date(d.getTime() + step)) {
      d.setHours(0, 0, 0, 0);
      if (d.getTime() >= since) ticks.push(d.getTime());
    }
  } else {
    // align to the local clock (whole minutes and hours where the offset allows)
    const offset = -new Date(since).getTimezoneOffset() * MINUTE;
    for (let t = Math.ceil((since + offset) / step) * step - offset; t <= until; t += step) {
      ticks.push(t);
    }
  }
  const label = (t) => {
    if (step >= DAY) return timeFormats.day.format(t);
    if (step < MINUTE) return timeFormats.seconds.format(t);
    const d = new Date(t);
    if (span > DAY && d.getHours() === 0 && d.getMinutes() === 0) return timeFormats.day.format(t);
    return timeFormats.minutes.format(t);
  };
  return ticks.map((t) => ({ t, label: label(t) }));
}

export class LineChart {
  /**
   * @param {HTMLElement} host the element the chart fills (its width sets the chart's width)
   * @param {{metric: string, unit?: string|null, series?: number, height?: number}} options
   */
  constructor(host, { metric, unit = null, series = 0, height = 220 }) {
    this.host = host;
    this.metric = metric;
    this.unit = displayUnit(unit);
    this.height = height;
    this.width = Math.max(200, Math.floor(host.clientWidth || 600));
    this.points = [];
    this.since = Date.now() - HOUR;
    this.until = Date.now();
    this.rangeMs = HOUR;
    this.bucketMs = SECOND;
    this.fetchedUntil = 0;
    this.loaded = false;
    this.hoverIndex = -1;
    this.frame = 0;

    this.svg = svg('svg', {
      class: `chart series-${series % 4}`,
      'data-testid': 'chart-svg',
      'data-metric': metric,
      role: 'img',
      'aria-label': `${metric} over time`,
    });
    this.readout = document.createElement('div');
    this.readout.className = 'readout';
    this.readout.dataset.testid = 'chart-readout';
    this.readout.hidden = true;
    host.classList.add('chart-host');
    host.append(this.svg, this.readout);

    this.svg.addEventListener('mousemove', (e) => this.hover(e));
    this.svg.addEventListener('mouseleave', () => this.hover(null));
    this.resizeObserver = new ResizeObserver(() => {
      const width = Math.max(200, Math.floor(this.host.clientWidth));
      if (width !== this.width) {
        this.width = width;
        this.render();
      }
    });
    this.resizeObserver.observe(host);
  }

  /** How many points to ask the API for: about one per two pixels of plot. */
  pointsWanted() {
    const plot = this.width - MARGIN.left - MARGIN.right;
    return Math.max(2, Math.min(5000, Math.floor(plot / 2)));
  }

  /** Show one API answer (`GET .../metrics/{metric}`): its range, bucket and points. */
  setData(answer) {
    this.since = Date.parse(answer.since);
    this.until = Date.parse(answer.until);
    this.rangeMs = this.until - this.since;
    this.bucketMs = answer.bucket_s * SECOND;
    this.fetchedUntil = this.until;
    this.sinceIso = answer.since;
    this.untilIso = answer.until;
    this.points = answer.points.map((p) => ({
      iso: p.t,
      t: Date.parse(p.t),
      min: p.min,
      avg: p.avg,
      max: p.max,
      count: p.count,
      live: false,
    }));
    this.loaded = true;
    this.render();
  }

  /** A live value from the stream: merged into its bucket, the window slides to keep it. */
  append(timeIso, value) {
    const t = Date.parse(timeIso);
    if (!this.loaded || !Number.isFinite(t) || typeof value !== 'number') return;
    if (t < this.fetchedUntil) return; // the fetch already counted it
    const last = this.points[this.points.length - 1];
    if (last && t < last.t) return; // out of order: the next fetch will have it
    if (last && t < last.t + this.bucketMs) {
      const n = last.count + 1;
      last.avg = (last.avg * last.count + value) / n;
      last.min = Math.min(last.min, value);
      last.max = Math.max(last.max, value);
      last.count = n;
      last.live = true;
    } else {
      // same grid as the API's buckets when there is one to continue
      const start = last ? last.t + Math.floor((t - last.t) / this.bucketMs) * this.bucketMs : t;
      this.points.push({
        iso: new Date(start).toISOString(), t: start, min: value, avg: value, max: value,
        count: 1, live: true,
      });
    }
    if (t > this.until) {
      this.until = t;
      this.since = t - this.rangeMs;
      while (this.points.length && this.points[0].t + this.bucketMs <= this.since) {
        this.points.shift();
      }
    }
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }
  }

  x(t) {
    const plot = this.width - MARGIN.left - MARGIN.right;
    return MARGIN.left + ((t - this.since) / (this.until - this.since || 1)) * plot;
  }

  y(v) {
    const plot = this.height - MARGIN.top - MARGIN.bottom;
    return MARGIN.top + (1 - (v - this.yMin) / (this.yMax - this.yMin || 1)) * plot;
  }

  scaleY() {
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of this.points) {
      lo = Math.min(lo, p.min);
      hi = Math.max(hi, p.max);
    }
    if (!Number.isFinite(lo)) {
      lo = 0;
      hi = 1;
    }
    if (hi - lo < 1e-9) {
      const pad = Math.abs(lo) * 0.05 || 1;
      lo -= pad;
      hi += pad;
    }
    const ticks = Math.max(2, Math.floor((this.height - MARGIN.top - MARGIN.bottom) / 42));
    const step = niceStep(hi - lo, ticks);
    this.yStep = step;
    this.yMin = Math.floor(lo / step) * step;
    this.yMax = Math.ceil(hi / step) * step;
  }

  render() {
    const { width, height } = this;
    const plotW = width - MARGIN.left - MARGIN.right;
    const plotH = height - MARGIN.top - MARGIN.bottom;
    this.scaleY();
    const s = this.svg;
    s.setAttribute('viewBox', `0 0 ${width} ${height}`);
    s.setAttribute('width', String(width));
    s.setAttribute('height', String(height));
    const data = {
      since: this.sinceIso ?? '', until: this.untilIso ?? '',
      'bucket-s': this.bucketMs / SECOND,
      'x-min': this.since, 'x-max': this.until, 'y-min': this.yMin, 'y-max': this.yMax,
      'plot-left': MARGIN.left, 'plot-top': MARGIN.top, 'plot-width': plotW, 'plot-height': plotH,
      points: this.points.length, loaded: this.loaded ? '1' : '0',
    };
    for (const [k, v] of Object.entries(data)) s.setAttribute(`data-${k}`, String(v));

    const grid = svg('g', { class: 'grid' });
    const decimals = decimalsFor(this.yStep);
    for (let v = this.yMin; v <= this.yMax + this.yStep / 2; v += this.yStep) {
      const y = this.y(v);
      grid.append(svg('line', { x1: MARGIN.left, x2: width - MARGIN.right, y1: y, y2: y }));
      const label = svg('text', { x: MARGIN.left - 8, y: y + 4, class: 'tick-y' });
      label.textContent = v.toLocaleString(undefined, {
        minimumFractionDigits: decimals, maximumFractionDigits: decimals,
      });
      grid.append(label);
    }
    const unit = svg('text', { x: MARGIN.left - 8, y: 12, class: 'unit', 'data-testid': 'chart-unit' });
    unit.textContent = this.unit;
    grid.append(unit);

    const axis = svg('g', { class: 'axis-x' });
    axis.append(svg('line', {
      x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH,
    }));
    for (const { t, label } of timeTicks(this.since, this.until, plotW)) {
      const x = this.x(t);
      axis.append(svg('line', {
        x1: x, x2: x, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH + 4, class: 'tick',
      }));
      const text = svg('text', { x, y: height - 8, class: 'tick-x' });
      text.textContent = label;
      axis.append(text);
    }

    const band = svg('path', { class: 'band', d: this.bandPath() });
    const line = svg('path', { class: 'line', d: this.linePath() });
    const marks = svg('g', { class: 'points' });
    const spacing = this.points.length > 1 ? plotW / Math.max(1, this.rangeMs / this.bucketMs) : plotW;
    s.classList.toggle('sparse', spacing >= 7);
    // a point with no neighbour draws no line: show it as a dot
    const solo = new Set(this.segments().filter((run) => run.length === 1).map((run) => run[0]));
    for (const p of this.points) {
      marks.append(svg('circle', {
        class: solo.has(p) ? 'pt solo' : 'pt', r: 2.2, cx: this.x(p.t).toFixed(2), cy: this.y(p.avg).toFixed(2),
        'data-testid': 'chart-point', 'data-t': p.iso, 'data-min': p.min, 'data-avg': p.avg,
        'data-max': p.max, 'data-count': p.count, 'data-live': p.live ? '1' : '0',
      }));
    }
    const children = [grid, axis, band, line, marks];
    if (this.loaded && this.points.length === 0) {
      const empty = svg('text', {
        x: MARGIN.left + plotW / 2, y: MARGIN.top + plotH / 2, class: 'empty',
        'data-testid': 'chart-empty',
      });
      empty.textContent = 'No data in this range';
      children.push(empty);
    }
    this.hoverLayer = svg('g', { class: 'hover' });
    children.push(this.hoverLayer);
    s.replaceChildren(...children);
    if (this.hoverIndex >= 0) this.showHover(Math.min(this.hoverIndex, this.points.length - 1));
  }

  // runs of points with no gap longer than 2.5 buckets: a gap in data is a gap in the line
  segments() {
    const runs = [];
    let run = [];
    for (const p of this.points) {
      const prev = run[run.length - 1];
      if (prev && p.t - prev.t > 2.5 * this.bucketMs) {
        runs.push(run);
        run = [];
      }
      run.push(p);
    }
    if (run.length) runs.push(run);
    return runs;
  }

  linePath() {
    return this.segments().map((run) => run.map((p, i) =>
      `${i ? 'L' : 'M'}${this.x(p.t).toFixed(2)},${this.y(p.avg).toFixed(2)}`).join('')).join('');
  }

  bandPath() {
    return this.segments().filter((run) => run.length > 1).map((run) => {
      const top = run.map((p, i) =>
        `${i ? 'L' : 'M'}${this.x(p.t).toFixed(2)},${this.y(p.max).toFixed(2)}`).join('');
      const bottom = run.slice().reverse().map((p) =>
        `L${this.x(p.t).toFixed(2)},${this.y(p.min).toFixed(2)}`).join('');
      return `${top}${bottom}Z`;
    }).join('');
  }

  hover(event) {
    if (!event || this.points.length === 0) {
      this.hoverIndex = -1;
      this.readout.hidden = true;
      this.hoverLayer?.replaceChildren();
      return;
    }
    const box = this.svg.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * this.width;
    // nearest point by x: binary search on time
    const t = this.since + ((x - MARGIN.left) / (this.width - MARGIN.left - MARGIN.right))
      * (this.until - this.since);
    let lo = 0;
    let hi = this.points.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.points[mid].t < t) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && Math.abs(this.points[lo - 1].t - t) < Math.abs(this.points[lo].t - t)) lo -= 1;
    this.showHover(lo);
  }

  showHover(index) {
    if (index < 0 || !this.points[index]) return;
    this.hoverIndex = index;
    const p = this.points[index];
    const x = this.x(p.t);
    const y = this.y(p.avg);
    this.hoverLayer.replaceChildren(
      svg('line', {
        class: 'guide', x1: x, x2: x, y1: MARGIN.top, y2: this.height - MARGIN.bottom,
      }),
      svg('circle', { class: 'dot', cx: x, cy: y, r: 4 }),
    );
    const unit = this.unit ? ` ${this.unit}` : '';
    const r = this.readout;
    r.replaceChildren();
    const time = document.createElement('div');
    time.className = 'readout-time';
    time.textContent = timeFormats.full.format(p.t);
    const avg = document.createElement('div');
    avg.className = 'readout-value';
    avg.textContent = `${formatValue(p.avg)}${unit}`;
    const spread = document.createElement('div');
    spread.className = 'readout-spread';
    spread.textContent = `min ${formatValue(p.min)} · max ${formatValue(p.max)} · ${p.count} `
      + (p.count === 1 ? 'sample' : 'samples');
    r.append(time, avg, spread);
    r.dataset.t = p.iso;
    r.dataset.avg = String(p.avg);
    r.dataset.min = String(p.min);
    r.dataset.max = String(p.max);
    r.hidden = false;
    // CSSOM positioning is allowed by the CSP (only style attributes in markup are not)
    const flip = x > this.width - 190;
    r.style.left = `${flip ? x - 12 : x + 12}px`;
    r.classList.toggle('flip', flip);
    // beside the point, on the side of the plot away from it: the line stays visible
    const plotMid = MARGIN.top + (this.height - MARGIN.top - MARGIN.bottom) / 2;
    const height = r.offsetHeight;
    const top = y < plotMid ? y + 14 : y - height - 14;
    r.style.top = `${Math.max(0, Math.min(this.height - height, top))}px`;
  }

  destroy() {
    this.resizeObserver.disconnect();
    if (this.frame) cancelAnimationFrame(this.frame);
  }
}
