/**
 * The notebook toolbar's hardware picker: what the notebook asks for and runs on, with
 * its price. Choosing records `metadata.cloudgpu.hardware`; on a Cloud GPU kernel it also
 * moves the session there, variables included, by sending the kernel `%cloudgpu switch`.
 */
import { Notification } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { rate } from './format';
import { CloudGPUModel } from './model';
import { mismatch, optionLabel, runningSpec, sessionsFor, summarize, switchCommand } from './state';

/** The notebook metadata key cloudgpu owns. */
export const METADATA_KEY = 'cloudgpu';

/** Whether `kernel` is a Cloud GPU kernel (its kernelspec names the hardware it runs on). */
export async function isCloudGPUKernel(kernel: Kernel.IKernelConnection | null | undefined): Promise<boolean> {
  if (!kernel) {
    return false;
  }
  const spec = await kernel.spec;
  const metadata = (spec?.metadata ?? {}) as { cloudgpu?: unknown };
  return !!metadata.cloudgpu;
}

export class HardwarePicker extends Widget {
  constructor(
    private readonly _panel: NotebookPanel,
    private readonly _model: CloudGPUModel
  ) {
    super();
    this.addClass('jp-cloudgpu-picker');
    this._select = document.createElement('select');
    this._select.className = 'jp-cloudgpu-picker-select';
    this._select.title = 'The hardware this notebook runs on (cloudgpu)';
    this._select.setAttribute('aria-label', 'cloudgpu hardware');
    this._info = document.createElement('span');
    this._info.className = 'jp-cloudgpu-picker-info';
    this._fix = document.createElement('button');
    this._fix.className = 'jp-cloudgpu-picker-fix jp-mod-styled';
    this._fix.textContent = 'Switch';
    this._fix.hidden = true;
    this.node.append(this._select, this._info, this._fix);
    this._select.addEventListener('change', () => void this._choose(this._select.value));
    this._fix.addEventListener('click', () => void this._choose(this.requested ?? ''));
    _model.changed.connect(this._render, this);
    _panel.model?.metadataChanged.connect(this._render, this);
    _panel.sessionContext.kernelChanged.connect(this._kernelChanged, this);
    void this._kernelChanged();
  }

  /** The hardware the notebook asks for (`metadata.cloudgpu.hardware`), or null. */
  get requested(): string | null {
    const meta = this._panel.model?.getMetadata(METADATA_KEY) as { hardware?: string } | undefined;
    return meta?.hardware ?? null;
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private async _kernelChanged(): Promise<void> {
    await this._panel.sessionContext.ready;
    this._cloudKernel = await isCloudGPUKernel(this._panel.sessionContext.session?.kernel);
    this._render();
  }

  private async _choose(spec: string): Promise<void> {
    if (!spec || !this._panel.model) {
      return;
    }
    const old = (this._panel.model.getMetadata(METADATA_KEY) ?? {}) as Record<string, unknown>;
    this._panel.model.setMetadata(METADATA_KEY, { ...old, hardware: spec });
    const kernel = this._panel.sessionContext.session?.kernel;
    if (!this._cloudKernel || !kernel) {
      Notification.info(
        `This notebook now asks for ${spec} (saved in its metadata). ` +
          '%%remote cells run where their gpu= says; a Cloud GPU kernel runs every cell there.',
        { autoClose: 6000 }
      );
      this._render();
      return;
    }
    this._switching = spec;
    this._render();
    try {
      const said = await this._sendSwitch(kernel, spec);
      Notification.success(said || `Now on ${spec}.`, { autoClose: 8000 });
    } catch (error) {
      Notification.error(`cloudgpu: could not switch to ${spec}: ${error instanceof Error ? error.message : error}`, {
        autoClose: false
      });
    } finally {
      this._switching = null;
      void this._model.refreshNow().catch(() => undefined);
      this._render();
    }
  }

  /** Run `%cloudgpu switch` on the kernel; what it printed, or an Error with its message. */
  private async _sendSwitch(kernel: Kernel.IKernelConnection, spec: string): Promise<string> {
    const future = kernel.requestExecute({
      code: switchCommand(spec),
      silent: false,
      store_history: false,
      allow_stdin: false,
      stop_on_error: false
    });
    const out: string[] = [];
    let failure = '';
    future.onIOPub = (msg: KernelMessage.IIOPubMessage) => {
      if (KernelMessage.isStreamMsg(msg) && msg.content.name === 'stdout') {
        out.push(msg.content.text);
      } else if (KernelMessage.isErrorMsg(msg)) {
        failure = msg.content.evalue;
      }
    };
    const reply = await future.done;
    if (reply.content.status !== 'ok') {
      throw new Error(failure || ('evalue' in reply.content ? String(reply.content.evalue) : 'the kernel refused'));
    }
    return out.join('').trim();
  }

  private _render(): void {
    const hardware = this._model.hardware?.hardware ?? [];
    const sessions = sessionsFor(this._model.status, this._panel.sessionContext.path);
    const requested = this.requested;
    // With nothing recorded, the picker shows what the notebook's one session runs on.
    const shown = requested ?? (sessions.length === 1 ? runningSpec(sessions[0]) : null);
    const key = JSON.stringify([hardware.map(optionLabel), shown]);
    if (key !== this._optionsKey) {
      this._optionsKey = key;
      this._select.replaceChildren();
      if (!shown) {
        this._select.append(new Option('Hardware…', '', true, true));
      }
      for (const hw of hardware) {
        const option = new Option(optionLabel(hw), hw.type);
        option.disabled = !hw.available;
        this._select.append(option);
      }
      if (shown && !hardware.some(h => h.type === shown)) {
        this._select.append(new Option(shown, shown));
      }
    }
    if (shown && this._select.value !== shown) {
      this._select.value = shown;
    }
    this._select.disabled = this._switching !== null;
    const summary = summarize(sessions);
    const wrong = this._switching ? null : mismatch(requested, sessions);
    const chosen = hardware.find(h => h.type === (requested ?? ''));
    let text: string;
    if (this._switching) {
      text = `switching to ${this._switching}…`;
    } else if (summary) {
      text = `on ${summary.hardware} · ${rate(summary.ratePerHour)}`;
    } else {
      text = chosen ? rate(chosen.price_per_hour) : '';
    }
    this._info.textContent = (wrong ? '⚠ ' : '') + text;
    this._info.title = wrong
      ? `${wrong} ${this._cloudKernel ? 'Switch moves the session there.' : 'Its %%remote cells say where they run.'}`
      : summary
        ? `${summary.sessions} session(s) of this notebook: ${summary.hardware}`
        : 'No cloudgpu session for this notebook yet';
    this.toggleClass('jp-mod-mismatch', !!wrong);
    this._fix.hidden = !(wrong && this._cloudKernel);
    this._fix.title = `Move this notebook's session to ${requested}, variables included`;
    this.node.dataset.cloudKernel = String(this._cloudKernel);
  }

  private _select: HTMLSelectElement;
  private _info: HTMLSpanElement;
  private _fix: HTMLButtonElement;
  private _optionsKey = '';
  private _cloudKernel = false;
  private _switching: string | null = null;
}
