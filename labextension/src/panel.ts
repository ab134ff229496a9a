/**
 * The sessions panel in the left sidebar: every session of the user, with its hardware,
 * state, uptime, cost, a line when no notebook is connected, and a small live utilization
 * chart, each with a stop button.
 * Cards are updated in place (keyed by session id), so a click is never lost to a redraw.
 */
import { Notification } from '@jupyterlab/apputils';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { liveMoney, memory, money, percent, rate, sparkline, uptime } from './format';
import { CloudGPUModel } from './model';
import { ISession, utilizationOf } from './state';

const CLOUD_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
  '<path class="jp-icon3" fill="#616161" d="M19.35 10.04A7.49 7.49 0 0 0 12 4C9.11 4 6.6 5.64 5.35 ' +
  '8.04A5.994 5.994 0 0 0 0 14c0 3.31 2.69 6 6 6h13c2.76 0 5-2.24 5-5 0-2.64-2.05-4.78-4.65-4.96z' +
  'M11 17H9v-5h2v5zm4 0h-2V9h2v8z"/></svg>';

/** The panel's icon: a cloud with a small bar chart. */
export const cloudIcon = new LabIcon({ name: 'cloudgpu:cloud', svgstr: CLOUD_SVG });

const CHART_W = 120;
const CHART_H = 24;
const SVG_NS = 'http://www.w3.org/2000/svg';

export class SessionsPanel extends Widget {
  constructor(private readonly _model: CloudGPUModel) {
    super();
    this.id = 'cloudgpu-sessions';
    this.addClass('jp-cloudgpu-panel');
    this.title.icon = cloudIcon;
    this.title.caption = 'Cloud GPU sessions';
    const header = document.createElement('header');
    header.className = 'jp-cloudgpu-panel-header';
    header.textContent = 'Cloud GPU sessions';
    this._summary = document.createElement('div');
    this._summary.className = 'jp-cloudgpu-panel-summary';
    this._list = document.createElement('ul');
    this._list.className = 'jp-cloudgpu-session-list';
    this._empty = document.createElement('p');
    this._empty.className = 'jp-cloudgpu-panel-empty';
    this.node.append(header, this._summary, this._list, this._empty);
    _model.changed.connect(this.update, this);
  }

  protected onUpdateRequest(): void {
    const status = this._model.status;
    const sessions = status?.sessions ?? [];
    if (status) {
      this._summary.textContent =
        `${sessions.length} session(s) · ${money(status.total_cost)} so far · ` +
        `${rate(status.total_rate_per_hour)} · today ${money(status.today)}` +
        (status.daily_limit ? ` of ${money(status.daily_limit)}` : '') +
        ` · ${status.pool}`;
    }
    this._empty.textContent = this._model.error
      ? `Cannot read the pool: ${this._model.error}`
      : sessions.length
        ? ''
        : 'No sessions. Run a cell on a Cloud GPU kernel, or a %%remote cell.';
    const seen = new Set<string>();
    for (const session of sessions) {
      seen.add(session.id);
      let card = this._cards.get(session.id);
      if (!card) {
        card = this._card(session.id);
        this._cards.set(session.id, card);
        this._list.append(card.node);
      }
      this._fill(card, session);
    }
    for (const [id, card] of this._cards) {
      if (!seen.has(id)) {
        card.node.remove();
        this._cards.delete(id);
      }
    }
  }

  private _card(id: string): ICard {
    const node = document.createElement('li');
    node.className = 'jp-cloudgpu-session';
    node.dataset.sessionId = id;
    const title = document.createElement('div');
    title.className = 'jp-cloudgpu-session-title';
    const hardware = document.createElement('span');
    hardware.className = 'jp-cloudgpu-session-hardware';
    const state = document.createElement('span');
    state.className = 'jp-cloudgpu-session-state';
    const stop = document.createElement('button');
    stop.className = 'jp-cloudgpu-session-stop jp-mod-styled jp-mod-warn';
    stop.textContent = 'Stop';
    stop.addEventListener('click', () => void this._stop(id, stop));
    title.append(hardware, state, stop);
    const notebook = document.createElement('div');
    notebook.className = 'jp-cloudgpu-session-notebook';
    const figures = document.createElement('div');
    figures.className = 'jp-cloudgpu-session-figures';
    const away = document.createElement('div');
    away.className = 'jp-cloudgpu-session-away';
    const chart = document.createElementNS(SVG_NS, 'svg');
    chart.setAttribute('class', 'jp-cloudgpu-chart');
    chart.setAttribute('width', String(CHART_W));
    chart.setAttribute('height', String(CHART_H));
    chart.setAttribute('viewBox', `0 0 ${CHART_W} ${CHART_H}`);
    const line = document.createElementNS(SVG_NS, 'polyline');
    chart.append(line);
    const load = document.createElement('span');
    load.className = 'jp-cloudgpu-session-load';
    const gauge = document.createElement('div');
    gauge.className = 'jp-cloudgpu-session-gauge';
    gauge.append(chart, load);
    node.append(title, notebook, figures, away, gauge);
    return { node, hardware, state, stop, notebook, figures, away, chart, line, load };
  }

  private _fill(card: ICard, s: ISession): void {
    card.hardware.textContent = s.display;
    card.state.textContent = s.state === 'queued' && s.queue_ahead ? `queued (${s.queue_ahead} ahead)` : s.state;
    card.state.dataset.state = s.state;
    card.notebook.textContent = s.path ?? s.notebook ?? '(no notebook)';
    card.notebook.title = s.notebook ?? '';
    const parts = [`up ${uptime(s.uptime)}`];
    if (s.idle_for !== null) {
      parts.push(`idle ${uptime(s.idle_for)}`);
    }
    parts.push(liveMoney(s.cost), rate(s.rate_per_hour));
    if (s.max_cost) {
      parts.push(`max ${money(s.max_cost)}`);
    }
    card.figures.textContent = parts.join(' · ');
    card.figures.title = s.warnings.join('\n');
    card.node.classList.toggle('jp-mod-warn', s.warnings.length > 0);
    card.away.textContent = s.away ?? '';
    card.away.hidden = !s.away;
    const value = utilizationOf(s);
    const r = s.readings;
    const what = r?.gpus.length && !r.simulated ? 'GPU' : 'CPU';
    let load = `${what} ${percent(value)}`;
    if (r?.simulated) {
      load += ` · RSS ${memory(r.rss_gb, 0)} (simulated GPU)`;
    } else if (r?.gpus.length) {
      load += ` · ${memory(r.memory_used_gb, r.memory_total_gb)}`;
    }
    card.load.textContent = r?.error ? 'no readings' : load;
    const source = r?.error ?? r?.source ?? 'no readings yet';
    card.chart.querySelector('title')?.remove();
    const tip = document.createElementNS(SVG_NS, 'title');
    tip.textContent = `${what} utilization, last ${this._model.history.length} readings: ${source}`;
    card.chart.prepend(tip);
    card.load.title = source;
    card.line.setAttribute('points', sparkline(this._model.history.values(s.id), CHART_W, CHART_H));
    card.node.dataset.state = s.state;
    card.node.classList.toggle('jp-mod-simulated', s.simulated);
  }

  private async _stop(id: string, button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    button.textContent = 'Stopping…';
    try {
      await this._model.stop(id);
    } catch (error) {
      button.disabled = false;
      button.textContent = 'Stop';
      Notification.error(`cloudgpu: could not stop the session: ${error instanceof Error ? error.message : error}`, {
        autoClose: false
      });
    }
  }

  private _summary: HTMLDivElement;
  private _list: HTMLUListElement;
  private _empty: HTMLParagraphElement;
  private _cards = new Map<string, ICard>();
}

interface ICard {
  node: HTMLLIElement;
  hardware: HTMLSpanElement;
  state: HTMLSpanElement;
  stop: HTMLButtonElement;
  notebook: HTMLDivElement;
  figures: HTMLDivElement;
  away: HTMLDivElement;
  chart: SVGSVGElement;
  line: SVGPolylineElement;
  load: HTMLSpanElement;
}
