/**
 * The one poller behind the status bar, the picker and the panel: it asks the server
 * extension for the status every `interval` and for the hardware list less often, and
 * tells its views when either changed.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { fetchHardware, fetchSession, fetchStatus, stopSession } from './api';
import {
  endedNotice,
  History,
  IHardwareList,
  ISession,
  IStatus,
  unaccounted,
  untold
} from './state';

/** Hardware changes rarely (prices, free counts): asked at most this often, in ms. */
const HARDWARE_EVERY = 10_000;

export class CloudGPUModel {
  constructor(intervalSeconds: number) {
    this._poll = new Poll({
      auto: true,
      factory: () => this.refresh(),
      frequency: { interval: intervalSeconds * 1000, backoff: true, max: 60_000 },
      name: 'cloudgpu:status',
      standby: 'when-hidden'
    });
  }

  /** The last status, or null before the first answer. */
  get status(): IStatus | null {
    return this._status;
  }

  /** The last hardware list, or null before the first answer. */
  get hardware(): IHardwareList | null {
    return this._hardware;
  }

  /** Why the last poll failed (the server's message), or null. */
  get error(): string | null {
    return this._error;
  }

  /** Each session's recent utilization, for charts. */
  readonly history = new History(60);

  /** Emitted after every poll, answered or failed. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Emitted with a sentence when the pool stopped one of the user's sessions (a budget,
   * idleness, a lost machine, no notebook connected), not when the user did. */
  get ended(): ISignal<this, string> {
    return this._ended;
  }

  /** Poll every `seconds` from now on. */
  setInterval(seconds: number): void {
    this._poll.frequency = { ...this._poll.frequency, interval: seconds * 1000 };
  }

  /** Ask now (after a stop, a switch) instead of at the next tick. */
  async refreshNow(): Promise<void> {
    this._hardwareAt = 0; // free counts changed too
    await this._poll.refresh();
    await this._poll.tick;
  }

  /** One round: the status, and the hardware when it is due. Throws so the Poll backs off. */
  async refresh(): Promise<void> {
    try {
      const due = Date.now() - this._hardwareAt > HARDWARE_EVERY;
      // What ended since the last answer: sessions it listed, and any that began and ended
      // in between, or while the tab was hidden (no polls then). The first answer lists
      // what ended earlier today, to be left untold.
      const first = this._status === null;
      const [status, hardware] = await Promise.all([
        fetchStatus(this._status?.now ?? 0),
        due ? fetchHardware() : Promise.resolve(this._hardware)
      ]);
      if (due) {
        this._hardwareAt = Date.now();
      }
      const missing = first ? [] : unaccounted(this._status?.sessions ?? [], status, this._told);
      this._status = status;
      this._hardware = hardware;
      for (const ended of untold(status.ended, this._told)) {
        this._tell(first ? null : endedNotice(ended));
      }
      void this._askWhy(missing);
      this._error = null;
      this.history.record(status.sessions);
    } catch (error) {
      this._error = error instanceof Error ? error.message : String(error);
      throw error;
    } finally {
      this._changed.emit();
    }
  }

  /** Stop a session at the pool (not announced: its reason is its owner's), then refresh. */
  async stop(id: string): Promise<void> {
    await stopSession(id);
    await this.refreshNow();
  }

  /** Ask why each session that left the list, though not as ended since, ended. */
  private async _askWhy(missing: ISession[]): Promise<void> {
    for (const session of missing) {
      this._told.add(session.id);
      try {
        const ended = await fetchSession(session.id);
        this._tell(endedNotice({ ...ended, path: ended.path ?? session.path }));
      } catch {
        // not found any more, or the server is away: nothing sure to say
      }
    }
  }

  private _tell(notice: string | null): void {
    if (notice) {
      this._ended.emit(notice);
    }
  }

  dispose(): void {
    this._poll.dispose();
  }

  private _poll: Poll;
  private _status: IStatus | null = null;
  private _hardware: IHardwareList | null = null;
  private _hardwareAt = 0;
  private _error: string | null = null;
  private _changed = new Signal<this, void>(this);
  private _ended = new Signal<this, string>(this);
  private _told = new Set<string>(); // ended sessions already looked at
}
