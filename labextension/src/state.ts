/**
 * What the UI knows and decides, with no DOM and no JupyterLab: the shapes the server
 * extension answers, which sessions belong to a notebook, budgets, utilization history.
 */

/** Live readings of one session (`GET /cloudgpu/api/metrics`). */
export interface IReadings {
  simulated: boolean;
  /** Where the GPU figures come from, in words (NVML, or the kernel process for simulated GPUs). */
  source: string;
  utilization: number | null;
  memory_used_gb: number | null;
  memory_total_gb: number;
  cpu_percent: number | null;
  rss_gb: number | null;
  execution_state?: string | null;
  gpus: {
    index: number;
    type: string;
    utilization: number | null;
    memory_used_gb: number | null;
    memory_total_gb: number;
  }[];
  error?: string;
}

/** One session as `GET /cloudgpu/api/status` shows it. */
export interface ISession {
  id: string;
  hardware: string;
  gpu_type: string | null;
  count: number | null;
  display: string;
  state: 'queued' | 'starting' | 'running' | 'idle';
  queue_ahead: number | null;
  uptime: number;
  idle_for: number | null;
  cost: number;
  rate_per_hour: number;
  max_cost: number | null;
  warnings: string[];
  /** No notebook is connected to it: for how long, and what the pool does about it. */
  away: string | null;
  /** Why it ended, once it did (null while it is active). */
  stop_reason: string | null;
  notebook: string | null;
  /** The notebook's path as JupyterLab names it, or null. */
  path: string | null;
  simulated: boolean;
  readings: IReadings | null;
}

/** A session that ended since the last status (`IStatus.ended`). */
export interface IEnded {
  id: string;
  display: string;
  path: string | null;
  stop_reason: string | null;
  ended: number;
}

/** `GET /cloudgpu/api/status`. */
export interface IStatus {
  pool: string;
  now: number;
  sessions: ISession[];
  /** The sessions that ended since the `now` it was asked with (`ended_since`). */
  ended: IEnded[];
  total_cost: number;
  total_rate_per_hour: number;
  today: number;
  daily_limit: number | null;
}

/** One hardware type (`GET /cloudgpu/api/hardware`). */
export interface IHardware {
  type: string;
  aliases: string[];
  memory_gb: number;
  price_per_hour: number;
  total: number | null;
  free: number | null;
  queued: number;
  simulated: boolean;
  available: boolean;
}

/** `GET /cloudgpu/api/hardware`. */
export interface IHardwareList {
  pool: string;
  hardware: IHardware[];
  simulated: boolean;
}

/** The sessions of the notebook at `path` (both its Cloud GPU kernel's and its `%%remote` cells'). */
/** What the pool says when a session is stopped at its owner's word, by hand or by a
 * notebook that released it: nothing to tell its owner about. */
export const OWNER_STOP = 'stopped by its owner';

/** The sessions of `ended` not yet in `told`, now added to it: each is told of once,
 * though the next status may list it again. */
export function untold(ended: IEnded[], told: Set<string>): IEnded[] {
  const fresh = ended.filter(e => !told.has(e.id));
  fresh.forEach(e => told.add(e.id));
  return fresh;
}

/** The sessions `before` listed that `now` neither lists nor says ended: their end was
 * billed before `ended_since` (a host judged lost bills to when it was last seen), and
 * each must be asked for. */
export function unaccounted(before: ISession[], now: IStatus, told: Set<string>): ISession[] {
  const known = new Set([...now.sessions, ...now.ended].map(s => s.id));
  return before.filter(s => !known.has(s.id) && !told.has(s.id));
}

/** What to tell the user about a session that ended: why the pool stopped it, or null
 * when its owner did, or when it did not end. */
export function endedNotice(ended: Pick<IEnded, 'display' | 'path' | 'stop_reason'>): string | null {
  const reason = ended.stop_reason;
  if (!reason || reason === OWNER_STOP) {
    return null;
  }
  const where = ended.path ? ` (${ended.path})` : '';
  return `cloudgpu: the ${ended.display} session${where} was stopped: ${reason}.`;
}

export function sessionsFor(status: IStatus | null, path: string | null): ISession[] {
  if (!status || !path) {
    return [];
  }
  return status.sessions.filter(s => s.path === path);
}

/** What a notebook's sessions add up to. */
export interface ISummary {
  hardware: string;
  cost: number;
  ratePerHour: number;
  utilization: number | null;
  /** True when the load shown is a kernel process's CPU use (simulated GPUs, or CPU sessions). */
  cpuLoad: boolean;
  sessions: number;
}

/** The status bar's figures for one notebook's sessions; null when it has none. */
export function summarize(sessions: ISession[]): ISummary | null {
  if (!sessions.length) {
    return null;
  }
  const busy = sessions
    .map(s => utilizationOf(s))
    .filter((u): u is number => u !== null);
  return {
    hardware: sessions.map(s => s.display).join(' + '),
    cost: sessions.reduce((sum, s) => sum + s.cost, 0),
    ratePerHour: sessions.reduce((sum, s) => sum + s.rate_per_hour, 0),
    utilization: busy.length ? Math.max(...busy) : null,
    cpuLoad: sessions.every(s => !s.readings || s.readings.simulated || !s.readings.gpus.length),
    sessions: sessions.length
  };
}

/** The figure a session's chart draws: GPU utilization, or CPU use for a CPU session. */
export function utilizationOf(session: ISession): number | null {
  const r = session.readings;
  if (!r || r.error) {
    return null;
  }
  if (r.gpus.length) {
    return r.utilization;
  }
  return r.cpu_percent === null ? null : Math.min(r.cpu_percent, 100);
}

/** How near a budget the user is. */
export type BudgetLevel = 'ok' | 'warning' | 'over';

/**
 * `warning` once `warnAt` (0.8: 80%) of the daily limit or of a session's `max_cost` is
 * spent, or the pool warned about a session; `over` at 100%.
 */
export function budgetLevel(status: IStatus | null, sessions: ISession[], warnAt: number): BudgetLevel {
  if (!status) {
    return 'ok';
  }
  const fractions: number[] = [];
  if (status.daily_limit) {
    fractions.push(status.today / status.daily_limit);
  }
  for (const s of sessions) {
    if (s.max_cost) {
      fractions.push(s.cost / s.max_cost);
    }
  }
  const worst = fractions.length ? Math.max(...fractions) : 0;
  if (worst >= 1) {
    return 'over';
  }
  const warned = sessions.some(s => s.warnings.length > 0);
  return worst >= warnAt || warned ? 'warning' : 'ok';
}

/** The canonical spec a session runs on: `H100`, `H100:2`, `cpu`. */
export function runningSpec(session: ISession): string {
  if (!session.gpu_type || session.gpu_type === 'cpu') {
    return 'cpu';
  }
  return session.count && session.count > 1 ? `${session.gpu_type}:${session.count}` : session.gpu_type;
}

/** Same hardware, whatever the case of the names (`h100` is `H100`; `H100:1` is `H100`). */
export function sameHardware(a: string, b: string): boolean {
  const norm = (s: string) => s.trim().toLowerCase().replace(/:1$/, '');
  return norm(a) === norm(b);
}

/**
 * What to tell a notebook that asks for `requested` hardware: null when one of its sessions
 * runs on it (or it has none yet), else a sentence naming what it does run on.
 */
export function mismatch(requested: string | null, sessions: ISession[]): string | null {
  const live = sessions.filter(s => s.state !== 'queued' && s.state !== 'starting');
  if (!requested || !live.length) {
    return null;
  }
  if (live.some(s => sameHardware(runningSpec(s), requested))) {
    return null;
  }
  return `This notebook asks for ${requested} but runs on ${live.map(s => s.display).join(' and ')}.`;
}

/** The `%cloudgpu` line that moves a Cloud GPU kernel to `spec`, keeping its variables. */
export function switchCommand(spec: string): string {
  if (!/^[A-Za-z0-9._:|-]+$/.test(spec)) {
    throw new Error(`Not a hardware spec: ${JSON.stringify(spec)}`);
  }
  return `%cloudgpu switch gpu=${spec}`;
}

/** A picker option's text: `H100 · 80 GB · $3.95/h · 1 of 2 free · 3 queued (simulated)`. */
export function optionLabel(hw: IHardware): string {
  if (hw.type === 'cpu') {
    return 'CPU · free';
  }
  const parts = [hw.type, `${hw.memory_gb} GB`, `$${hw.price_per_hour.toFixed(2)}/h`];
  if (hw.total) {
    parts.push(`${hw.free ?? 0} of ${hw.total} free`);
  } else {
    parts.push('none here');
  }
  if (hw.queued) {
    parts.push(`${hw.queued} queued`);
  }
  return parts.join(' · ') + (hw.simulated ? ' (simulated)' : '');
}

/** Bounded histories of each session's utilization, for the panel's charts. */
export class History {
  constructor(readonly length = 60) {}

  /** Add the current readings; sessions that are gone are forgotten. */
  record(sessions: ISession[]): void {
    const seen = new Set<string>();
    for (const s of sessions) {
      seen.add(s.id);
      const value = utilizationOf(s);
      if (value === null) {
        continue;
      }
      const values = this._values.get(s.id) ?? [];
      values.push(value);
      if (values.length > this.length) {
        values.splice(0, values.length - this.length);
      }
      this._values.set(s.id, values);
    }
    for (const id of [...this._values.keys()]) {
      if (!seen.has(id)) {
        this._values.delete(id);
      }
    }
  }

  /** The recorded values of a session, oldest first. */
  values(id: string): number[] {
    return this._values.get(id) ?? [];
  }

  private _values = new Map<string, number[]>();
}
