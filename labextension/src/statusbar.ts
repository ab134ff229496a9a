/**
 * The status bar item: the active notebook's hardware, what it has cost and its GPU load;
 * on hover, the total across every session and today's spending against the budget. It
 * takes the theme's warning colour near a budget and its error colour past one.
 */
import { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { liveMoney, money, percent, rate } from './format';
import { CloudGPUModel } from './model';
import { budgetLevel, sessionsFor, summarize } from './state';

export class CostStatus extends Widget {
  constructor(private readonly _model: CloudGPUModel) {
    super();
    this.addClass('jp-cloudgpu-status');
    this.node.setAttribute('role', 'status');
    _model.changed.connect(this.update, this);
  }

  /** The notebook whose figures are shown; null shows the totals. */
  set notebook(panel: NotebookPanel | null) {
    this._notebook = panel;
    this.update();
  }

  /** The fraction of a budget at which the item turns to the warning colour. */
  set warnAt(fraction: number) {
    this._warnAt = fraction;
    this.update();
  }

  protected onUpdateRequest(): void {
    const status = this._model.status;
    const mine = sessionsFor(status, this._notebook?.sessionContext.path ?? null);
    const summary = summarize(mine);
    let text: string;
    if (this._model.error && !status) {
      text = 'cloudgpu: no pool';
    } else if (summary) {
      const load = summary.cpuLoad ? 'CPU' : 'GPU';
      text = `${summary.hardware} · ${liveMoney(summary.cost)} · ${load} ${percent(summary.utilization)}`;
    } else if (status?.sessions.length) {
      text = `cloudgpu: ${status.sessions.length} session(s) · ${liveMoney(status.total_cost)}`;
    } else {
      text = 'cloudgpu: no session';
    }
    const level = budgetLevel(status, status?.sessions ?? [], this._warnAt);
    this.node.textContent = text;
    this.node.dataset.level = level;
    this.node.dataset.cost = String(summary?.cost ?? status?.total_cost ?? 0);
    const lines: string[] = [];
    if (status) {
      lines.push(
        `All sessions: ${status.sessions.length}, ${money(status.total_cost)} so far, ` +
          `${rate(status.total_rate_per_hour)} now`
      );
      lines.push(
        `Today: ${money(status.today)}` +
          (status.daily_limit ? ` of a ${money(status.daily_limit)} daily limit` : ' (no daily limit)')
      );
      for (const s of status.sessions) {
        lines.push(`• ${s.display}, ${s.state}: ${liveMoney(s.cost)}${s.path ? ` (${s.path})` : ''}`);
        lines.push(...s.warnings.map(w => `  ⚠ ${w}`));
        if (s.away) {
          lines.push(`  ${s.away}`);
        }
      }
      lines.push(`Pool: ${status.pool}`);
      if (summary?.cpuLoad) {
        lines.push('Load: the kernel process\'s CPU use (simulated GPUs have nothing to read).');
      }
    }
    if (this._model.error) {
      lines.push(`Last poll failed: ${this._model.error}`);
    }
    this.node.title = lines.join('\n');
  }

  private _notebook: NotebookPanel | null = null;
  private _warnAt = 0.8;
}
