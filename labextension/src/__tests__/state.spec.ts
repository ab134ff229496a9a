import {
  budgetLevel,
  endedNotice,
  History,
  IHardware,
  ISession,
  IStatus,
  mismatch,
  optionLabel,
  runningSpec,
  sessionsFor,
  summarize,
  switchCommand,
  utilizationOf,
  unaccounted,
  untold
} from '../state';

function session(overrides: Partial<ISession> = {}): ISession {
  return {
    id: 'a1',
    hardware: 'H100',
    gpu_type: 'H100',
    count: 1,
    display: '1x H100 (simulated)',
    state: 'running',
    queue_ahead: null,
    uptime: 60,
    idle_for: null,
    cost: 0.05,
    rate_per_hour: 3.95,
    max_cost: null,
    warnings: [],
    away: null,
    stop_reason: null,
    notebook: '/home/me/work/a.ipynb',
    path: 'work/a.ipynb',
    simulated: true,
    readings: {
      simulated: true,
      source: 'the kernel process (/proc)',
      utilization: 40,
      memory_used_gb: 0.1,
      memory_total_gb: 80,
      cpu_percent: 40,
      rss_gb: 0.1,
      gpus: [{ index: 0, type: 'H100', utilization: 40, memory_used_gb: 0.1, memory_total_gb: 80 }]
    },
    ...overrides
  };
}

function status(sessions: ISession[], overrides: Partial<IStatus> = {}): IStatus {
  return {
    pool: 'local pool',
    now: 0,
    sessions,
    ended: [],
    total_cost: sessions.reduce((s, x) => s + x.cost, 0),
    total_rate_per_hour: 0,
    today: 0,
    daily_limit: null,
    ...overrides
  };
}

describe('a notebook and its sessions', () => {
  const cloudKernel = session();
  const remoteA100 = session({ id: 'b2', gpu_type: 'A100-80GB', display: '1x A100-80GB (simulated)', cost: 0.02, rate_per_hour: 1.9 });
  const other = session({ id: 'c3', path: 'other.ipynb' });

  it('finds the sessions of both front-ends by the notebook path', () => {
    const all = status([cloudKernel, remoteA100, other]);
    expect(sessionsFor(all, 'work/a.ipynb').map(s => s.id)).toEqual(['a1', 'b2']);
    expect(sessionsFor(all, null)).toEqual([]);
    expect(sessionsFor(null, 'work/a.ipynb')).toEqual([]);
  });

  it('adds up cost and rate and shows the busiest GPU', () => {
    const summary = summarize([cloudKernel, remoteA100])!;
    expect(summary.hardware).toBe('1x H100 (simulated) + 1x A100-80GB (simulated)');
    expect(summary.cost).toBeCloseTo(0.07);
    expect(summary.ratePerHour).toBeCloseTo(5.85);
    expect(summary.utilization).toBe(40);
    expect(summary.cpuLoad).toBe(true); // simulated GPUs: the load is the kernel's CPU use
    const real = session({ simulated: false, readings: { ...cloudKernel.readings!, simulated: false } });
    expect(summarize([real])!.cpuLoad).toBe(false);
    expect(summarize([])).toBeNull();
  });

  it('charts CPU use for a CPU session and nothing for a failed reading', () => {
    const cpu = session({
      gpu_type: 'cpu',
      readings: { ...cloudKernel.readings!, gpus: [], utilization: null, cpu_percent: 180 }
    });
    expect(utilizationOf(cpu)).toBe(100);
    expect(utilizationOf(session({ readings: { ...cloudKernel.readings!, error: 'host gone' } }))).toBeNull();
    expect(utilizationOf(session({ readings: null }))).toBeNull();
  });
});

describe('hardware asked for and hardware running', () => {
  it('names canonical specs', () => {
    expect(runningSpec(session())).toBe('H100');
    expect(runningSpec(session({ count: 2 }))).toBe('H100:2');
    expect(runningSpec(session({ gpu_type: 'cpu' }))).toBe('cpu');
  });

  it('says so when no session runs on the requested hardware', () => {
    const cpu = session({ gpu_type: 'cpu', display: 'CPU' });
    expect(mismatch('H100', [cpu])).toBe('This notebook asks for H100 but runs on CPU.');
    expect(mismatch('h100', [session()])).toBeNull();
    expect(mismatch('H100:1', [session()])).toBeNull();
    expect(mismatch(null, [cpu])).toBeNull();
    expect(mismatch('H100', [])).toBeNull();
    expect(mismatch('H100', [session({ state: 'queued', gpu_type: null })])).toBeNull();
  });

  it('builds the switch command and refuses what is not a spec', () => {
    expect(switchCommand('A100-80GB:2')).toBe('%cloudgpu switch gpu=A100-80GB:2');
    expect(switchCommand('H100|A100-80GB')).toBe('%cloudgpu switch gpu=H100|A100-80GB');
    expect(() => switchCommand('H100\nimport os')).toThrow();
  });

  it('labels picker options with memory, price, availability and queue', () => {
    const h100: IHardware = {
      type: 'H100', aliases: [], memory_gb: 80, price_per_hour: 3.95, total: 2, free: 1,
      queued: 3, simulated: true, available: true
    };
    expect(optionLabel(h100)).toBe('H100 · 80 GB · $3.95/h · 1 of 2 free · 3 queued (simulated)');
    expect(optionLabel({ ...h100, total: 0, free: 0, queued: 0, simulated: false })).toBe(
      'H100 · 80 GB · $3.95/h · none here'
    );
    expect(optionLabel({ ...h100, type: 'cpu' })).toBe('CPU · free');
  });
});

describe('budgets', () => {
  it('warns at the fraction set, and past the daily limit says over', () => {
    expect(budgetLevel(status([], { today: 7, daily_limit: 10 }), [], 0.8)).toBe('ok');
    expect(budgetLevel(status([], { today: 8, daily_limit: 10 }), [], 0.8)).toBe('warning');
    expect(budgetLevel(status([], { today: 10, daily_limit: 10 }), [], 0.8)).toBe('over');
    expect(budgetLevel(null, [], 0.8)).toBe('ok');
  });

  it("counts a session's max_cost and the pool's warnings", () => {
    const near = session({ cost: 0.9, max_cost: 1 });
    expect(budgetLevel(status([near]), [near], 0.8)).toBe('warning');
    const warned = session({ warnings: ['80% of your daily budget used'] });
    expect(budgetLevel(status([warned]), [warned], 0.8)).toBe('warning');
  });
});

describe('History', () => {
  it('keeps the last readings per session and forgets ended sessions', () => {
    const history = new History(3);
    for (const u of [10, 20, 30, 40]) {
      history.record([session({ readings: { ...session().readings!, utilization: u } })]);
    }
    expect(history.values('a1')).toEqual([20, 30, 40]);
    history.record([session({ readings: null })]);
    expect(history.values('a1')).toEqual([20, 30, 40]);
    history.record([]);
    expect(history.values('a1')).toEqual([]);
  });
});

describe('sessions the pool stopped', () => {
  it('are each told of once, though statuses overlap', () => {
    const ended = (id: string) => ({ id, display: 'CPU', path: null, stop_reason: 'x', ended: 1 });
    const told = new Set<string>();
    expect(untold([ended('a'), ended('b')], told).map(e => e.id)).toEqual(['a', 'b']);
    expect(untold([ended('b'), ended('c')], told).map(e => e.id)).toEqual(['c']);
    expect(untold([], told)).toEqual([]);
    expect([...told]).toEqual(['a', 'b', 'c']);
  });

  it('are asked for when they left the list without showing as ended', () => {
    const [a, b, c] = [session({ id: 'a' }), session({ id: 'b' }), session({ id: 'c' })];
    const ended = { id: 'b', display: 'CPU', path: null, stop_reason: 'x', ended: 1 };
    expect(unaccounted([a, b, c], status([c], { ended: [ended] }), new Set()).map(s => s.id))
      .toEqual(['a']);
    expect(unaccounted([a, b, c], status([c]), new Set(['a']))).toEqual([b]);
    expect(unaccounted([], status([a]), new Set())).toEqual([]);
  });

  it("say why, unless the owner stopped it or it did not end", () => {
    const idle = session({ stop_reason: 'idle: nothing ran for 15 min (idle_timeout 15 min)' });
    expect(endedNotice(idle)).toBe(
      'cloudgpu: the 1x H100 (simulated) session (work/a.ipynb) was stopped: idle: nothing ' +
        'ran for 15 min (idle_timeout 15 min).'
    );
    expect(endedNotice(session({ path: null, stop_reason: 'its machine was lost' }))).toBe(
      'cloudgpu: the 1x H100 (simulated) session was stopped: its machine was lost.'
    );
    expect(endedNotice(session({ stop_reason: 'stopped by its owner' }))).toBeNull();
    expect(endedNotice(session())).toBeNull();
  });
});
